"""A backend session: one batch of docs through a component's backend. It makes the calls, applies the error
policy, and books what each call cost to the doc that asked (``Usage``), with the prompts and answers when asked
to save them.

Error policy: with ``on_error = "raise"`` a failed call goes to the component's error handler (spaCy's
``Pipe.get_error_handler`` convention: by default it raises; ``nlp.set_error_handler`` can replace it); with
``"skip"``, or when the handler returns, the batch's later calls are skipped, its docs come back without these
entities and with the error noted in ``doc.user_data["llm_ner_errors"]``: nothing already processed is lost.
"""

from typing import Callable, Dict, List, Optional, Sequence

from .lar.choice import choose
from .ty import Backend, BackendError, Generation, GenerationRequest, ScoreRequest
from .usage import Usage

ErrorHandler = Callable[[str, object, list, Exception], None]


class Run:
    def __init__(
        self,
        name: str,
        backend: Backend,
        n_docs: int,
        *,
        on_error: str,
        error_handler: ErrorHandler,
        component=None,
        docs: Sequence = (),
        save_io: bool = False,
    ):
        self.name = name
        self.backend = backend
        self.on_error = on_error
        self.error_handler = error_handler
        self.component = component
        self.docs = list(docs)
        self.save_io = save_io
        self.usage = [Usage(docs=1) for _ in range(n_docs)]
        self.io: List[List[Dict[str, str]]] = [[] for _ in range(n_docs)]
        self.error: Optional[BaseException] = None

    def report(self, doc, i: int) -> Usage:
        """Writes doc ``i``'s usage (``doc._.llm_ner_usage``), saved prompts and answers (``doc._.llm_ner_io``) and
        the batch's error, if any (``doc.user_data["llm_ner_errors"]``); returns its usage."""
        doc._.llm_ner_usage = {**(doc._.llm_ner_usage or {}), self.name: self.usage[i].to_dict()}
        if self.error is not None:
            doc.user_data.setdefault("llm_ner_errors", []).append(f"{self.name}: {self.error}")
        if self.save_io:
            doc._.llm_ner_io = {**(doc._.llm_ner_io or {}), self.name: self.io[i]}
        return self.usage[i]

    def _call(self, fn, requests):
        if self.error is not None or not requests:
            return None
        try:
            return fn(requests)
        except BackendError as e:
            error = BackendError(
                f"{self.name}: the backend failed on a batch of {len(self.usage)} doc(s) "
                f"(earlier batches were returned; answers so far are in the cache if one is set): {e}"
            )
            error.__cause__ = e
            if self.on_error == "raise":
                self.error_handler(self.name, self.component, self.docs, error)
            self.error = e
            return None

    def generate(self, owners: Sequence[int], requests: List[GenerationRequest]) -> List[Optional[Generation]]:
        """The answer to each request (None where the backend failed); ``owners[i]``: the doc that asked."""
        answers = self._call(self.backend.generate, requests)
        if answers is None:
            for i in owners:
                self.usage[i].errors += 1
            return [None] * len(owners)
        for i, req, answer in zip(owners, requests, answers):
            u = self.usage[i]
            u.calls += 0 if answer.cached else 1
            u.cached_calls += 1 if answer.cached else 0
            u.prompt_tokens += answer.prompt_tokens
            u.completion_tokens += answer.completion_tokens
            u.seconds += answer.seconds
            u.grammar_ignored += answer.grammar_ignored
            u.truncated += answer.truncated
            if self.save_io:
                self.io[i].append({"prompt": req.prompt, "response": answer.text})
        return list(answers)

    def choose(self, owners: Sequence[int], requests: List[ScoreRequest]) -> Optional[List[List[float]]]:
        """Log-probabilities per option of each constrained choice (None where the backend failed); the cost is
        shared evenly between the docs that asked."""
        got = self._call(lambda reqs: choose(self.backend, reqs), requests)
        if got is None:
            return None
        scores, tokens, calls = got
        owners = list(owners)
        for i in set(owners):
            share = owners.count(i) / len(owners)
            self.usage[i].calls += round(calls * share)
            self.usage[i].prompt_tokens += round(tokens * share)
        return scores
