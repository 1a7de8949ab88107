import functools
import os

import pytest
import spacy

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _kernel_overrides():
    """SPACY_LLMNER_TEST_THREADS / SPACY_LLMNER_TEST_PARALLEL change the llama.cpp backend's defaults for a run of
    the suite (``scripts/cross_kernel_tests.sh``): other thread counts and batch shapes run other kernel paths and
    round differently, as another CPU would. Arguments a test passes itself are kept."""
    threads, parallel = os.environ.get("SPACY_LLMNER_TEST_THREADS"), os.environ.get("SPACY_LLMNER_TEST_PARALLEL")
    if not threads and not parallel:
        return
    from spacy_llmner.backends.llamacpp import LlamaCppBackend

    init = LlamaCppBackend.__init__

    @functools.wraps(init)  # keeps the signature: the registry validates configs against it
    def patched(self, *args, **kwargs):
        if threads:
            kwargs.setdefault("n_threads", int(threads))
        if parallel:
            kwargs.setdefault("parallel", int(parallel))
        init(self, *args, **kwargs)

    LlamaCppBackend.__init__ = patched


_kernel_overrides()


@pytest.fixture
def nlp():
    return spacy.blank("en")
