"""Any model registered in spacy-llm's ``llm_models`` registry as a backend (no grammar support: spacy-llm models
take plain prompts). The model object is built by spacy-llm from its own config block."""

import time
from typing import Any, Callable, Dict, List, Sequence

from ..ty import Generation, GenerationRequest
from .base import BackendBase


class SpacyLLMBackend(BackendBase):
    """Registered as ``spacy_llmner.SpacyLLM.v1``.

    model (Callable): a spacy-llm model, built from its own config block (``[...backend.model]``).
    name (str): what the cache key calls it (default: the model's class name).
    """

    remote = True  # spacy-llm's models are API clients: an ensemble may run them beside local members

    def __init__(self, model: Callable, name: str = ""):
        self.model = model
        self.name = name or type(model).__name__

    def identity(self) -> Dict[str, Any]:
        return {"backend": "spacy-llm", "model": self.name}

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        t0 = time.perf_counter()
        responses = list(self.model([[r.prompt] for r in requests]))
        per = (time.perf_counter() - t0) / max(len(requests), 1)
        out = []
        for req, resp in zip(requests, responses):
            text = list(resp)[0] if not isinstance(resp, str) else resp
            # spacy-llm models know no stop sequences: cut the answer where ours would have stopped.
            for stop in req.stop:
                if stop in text:
                    text = text[: text.index(stop)]
            out.append(Generation(text=text, seconds=per))
        return out
