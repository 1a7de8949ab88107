"""Canned-response backend for parsing and plumbing tests."""

from typing import Callable, List, Sequence

from spacy_llmner.backends.base import BackendBase
from spacy_llmner.ty import Generation, GenerationRequest, ScoreRequest, Scores


class FakeBackend(BackendBase):
    """Canned answers for parsing and plumbing tests: ``answer(prompt_query_text) -> completion``."""

    def __init__(self, answer: Callable[[str], str]):
        self.answer = answer
        self.requests: List[GenerationRequest] = []

    def identity(self):
        return {"backend": "fake"}

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        self.requests.extend(requests)
        out = []
        for r in requests:
            query = r.prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
            out.append(Generation(self.answer(query), prompt_tokens=len(r.prompt) // 4, completion_tokens=5))
        return out


def add_fake_ner(nlp, answer, name="llm_lar_ner", **config):
    cfg = {
        "labels": ["person", "location", "organisation"],
        "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1"},
        "zero_shot": True,
    }  # canned answers: no demonstrations needed unless a test gives some
    cfg.update(config)
    ner = nlp.add_pipe("llm_lar_ner", name=name, config=cfg)
    ner.backend = FakeBackend(answer)
    ner.constrained = False
    return ner


class FakeScorer(FakeBackend):
    """Also scores fixed continuations: ``logprobs(context, options) -> [float per option]``."""

    supports_scoring = True

    def __init__(self, answer: Callable[[str], str], logprobs: Callable[[str, Sequence[str]], List[float]]):
        super().__init__(answer)
        self.logprobs = logprobs
        self.score_requests: List[ScoreRequest] = []

    def score(self, requests: Sequence[ScoreRequest]) -> List[Scores]:
        self.score_requests.extend(requests)
        return [Scores(list(self.logprobs(r.context, r.options)), prompt_tokens=len(r.context) // 4) for r in requests]
