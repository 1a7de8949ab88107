"""What every backend shares: the defaults of the ``Backend`` protocol (``ty.py``), and the spacy-llm model calling
convention, so our backends also serve spacy-llm's own ``llm`` component (a spacy-llm model maps an iterable of
per-doc prompt lists to per-doc response lists)."""

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from ..calibration import Calibrations
from ..ty import Generation, GenerationRequest, ScoreRequest, Scores


def answer_in_groups(
    generate: Callable[[Sequence[GenerationRequest]], List[Generation]],
    group: int,
    requests: Sequence[GenerationRequest],
    on_answer: Callable[[int, Generation], None],
) -> None:
    """``on_answer(i, generation)`` for each request, ``group`` requests per ``generate`` call (as many as the
    backend decodes at once: their answers arrive together)."""
    group = max(1, group)
    for start in range(0, len(requests), group):
        for i, gen in enumerate(generate(requests[start : start + group]), start):
            on_answer(i, gen)


class BackendBase:
    """The defaults of every ``Backend`` member: no grammar, no scoring, one request at a time, in-process, token
    counts estimated from characters. Subclasses implement ``identity`` and ``generate`` and override the rest
    where they can do better."""

    supports_grammar = False
    supports_scoring = False
    parallel = 1
    remote = False
    calibration: Optional[Calibrations] = None
    max_tokens_for_spacy_llm = 512

    def identity(self) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement identity()")

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        raise NotImplementedError(f"{type(self).__name__} must implement generate()")

    def generate_each(
        self, requests: Sequence[GenerationRequest], on_answer: Callable[[int, Generation], None]
    ) -> None:
        """Calls ``on_answer(i, generation)`` as each answer arrives (the cache commits it at once). By default in
        groups of ``parallel``; backends that answer one by one (HTTP) call it per request."""
        answer_in_groups(self.generate, self.parallel, requests, on_answer)

    def score(self, requests: Sequence[ScoreRequest]) -> List[Scores]:
        raise NotImplementedError(
            f"{type(self).__name__} cannot score continuations (supports_scoring is False): constrained choices "
            "are asked with a grammar-restricted generation instead"
        )

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1  # about four characters per token in English BPE vocabularies

    # spacy-llm checks these annotations: both must be Iterable[Iterable[str]]
    def __call__(self, prompts: Iterable[Iterable[str]]) -> Iterable[Iterable[str]]:
        per_doc = [list(p) for p in prompts]
        flat = [GenerationRequest(p, max_tokens=self.max_tokens_for_spacy_llm) for doc in per_doc for p in doc]
        answers = iter(self.generate(flat))
        return [[next(answers).text for _ in doc] for doc in per_doc]
