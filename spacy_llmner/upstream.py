"""The one helper that runs a pipeline's earlier components on docs the pipeline did not make itself: a LAR
component learning its alignment from its source's predictions, an ensemble preparing its members' input."""

from typing import Iterable, List

from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.tokens import Doc

from .ty import LLMComponent


def is_llm_component(proc) -> bool:
    """Ours (``LLMComponent``) or spacy-llm's ``llm`` component: members or baselines, never a source."""
    return isinstance(proc, LLMComponent) or type(proc).__module__.split(".")[0] == "spacy_llm"


def run_upstream(nlp: Language, name: str, docs: Iterable[Doc], skip: Iterable[str] = ()) -> List[Doc]:
    """``docs`` through the components before ``name`` that may feed it: disabled ones too (``spacy assemble``
    disables sourced components while initializing), never LLM components, never those named in ``skip``."""
    docs, skip = list(docs), set(skip)
    for other, proc in nlp.components:
        if other == name:
            break
        if other in skip or is_llm_component(proc):
            continue
        docs = list(proc.pipe(docs)) if isinstance(proc, Pipe) else [proc(doc) for doc in docs]
    return docs
