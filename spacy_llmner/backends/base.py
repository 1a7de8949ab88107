"""What every backend shares: the spacy-llm model calling convention, so our backends also serve spacy-llm's own
``llm`` component (a spacy-llm model maps an iterable of per-doc prompt lists to per-doc response lists)."""

from typing import Iterable

from ..ty import GenerationRequest


class SpacyLLMCallable:
    max_tokens_for_spacy_llm = 512

    # spacy-llm checks these annotations: both must be Iterable[Iterable[str]]
    def __call__(self, prompts: Iterable[Iterable[str]]) -> Iterable[Iterable[str]]:
        per_doc = [list(p) for p in prompts]
        flat = [GenerationRequest(p, max_tokens=self.max_tokens_for_spacy_llm) for doc in per_doc for p in doc]
        answers = iter(self.generate(flat))
        return [[next(answers).text for _ in doc] for doc in per_doc]
