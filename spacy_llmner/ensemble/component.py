"""The ``llm_ner_ensemble`` component: runs its members, votes (``voting.py``), validates doubtful spans."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import srsly
from spacy import util
from spacy.language import Language
from spacy.pipeline import Pipe, SpanCategorizer
from spacy.scorer import Scorer
from spacy.tokens import Doc, Span
from spacy.training import Example
from spacy.util import filter_spans, minibatch

from ..demonstrations import load_demonstrations
from ..ty import LLMComponent
from ..upstream import run_upstream
from ..usage import Usage
from .voting import Ballot, Sources, TokenSpan, fit, fit_sources, flat_spans, micro_f1, union, vote

DEFAULT_CONFIG = {
    "members": [],
    "voting": "majority",
    "threshold": 0.5,
    "weights": {},
    "validator": None,
    "validate_band": 0.2,
    "validate_threshold": 0.5,
    "spans_key": None,
    "scorer": {"@scorers": "spacy.ner_scorer.v1"},
}


@Language.factory("llm_ner_ensemble", default_config=DEFAULT_CONFIG)
def make_llm_ner_ensemble(
    nlp: Language,
    name: str,
    members: List[str],
    voting: Literal["majority", "weighted", "union"],
    threshold: float,
    weights: Dict[str, float],
    validator: Optional[str],
    validate_band: float,
    validate_threshold: float,
    spans_key: Optional[str],
    scorer: Optional[Callable],
) -> "Ensemble":
    """An ensemble of NER components of the same pipeline (EL4NER): a span-level vote with optional
    self-validation of the doubtful spans.

    members (List[str]): the member components' names; each is disabled in the pipeline (the ensemble runs it).
    voting (str): "majority" (each member weighs 1), "weighted" (weights, label accuracies and threshold fitted
        on a dev set by ``initialize``) or "union" (every member's spans; where they overlap, the spans of the member
        listed first win; threshold unused, no validator; given a dev set, ``initialize`` chooses per label whether
        every member's spans of it count or one member's alone).
    threshold (float): a span is kept when the share of member weight proposing its boundaries exceeds this.
    weights (Dict[str, float]): starting member weights (default 1 each).
    validator (Optional[str]): an ``llm_lar_ner`` member that re-asks the doubtful spans (yes/no).
    validate_band (float): a span is doubtful when its support lies within this distance of the threshold.
    validate_threshold (float): the validator's P(yes) a doubtful span needs to be kept.
    spans_key (Optional[str]): the ``doc.spans`` group of the kept spans (default: the component's name).
    scorer (Optional[Callable]): scores ``nlp.evaluate`` (spaCy's NER scorer by default).
    """
    return Ensemble(
        nlp,
        name,
        members=members,
        voting=voting,
        threshold=threshold,
        weights=weights,
        validator=validator,
        validate_band=validate_band,
        validate_threshold=validate_threshold,
        spans_key=spans_key,
        scorer=scorer,
    )


# ---- the component ----------------------------------------------------------------------------------------
class Ensemble(Pipe):
    def __init__(
        self,
        nlp: Language,
        name: str = "llm_ner_ensemble",
        *,
        members: Sequence[str],
        voting: str = "majority",
        threshold: float = 0.5,
        weights: Optional[Dict[str, float]] = None,
        validator: Optional[str] = None,
        validate_band: float = 0.2,
        validate_threshold: float = 0.5,
        spans_key: Optional[str] = None,
        scorer: Optional[Callable] = None,
    ):
        if len(set(members)) != len(members) or not members:
            raise ValueError(f"{name}: members must name at least one component, each once (got {list(members)})")
        if voting not in ("majority", "weighted", "union"):
            raise ValueError(f"{name}: voting must be 'majority', 'weighted' or 'union', not {voting!r}")
        if validator is not None and voting == "union":
            raise ValueError(f"{name}: voting='union' keeps every span, so none is doubtful: drop the validator")
        if validator is not None and validator not in members:
            raise ValueError(f"{name}: the validator {validator!r} must be one of the members {list(members)}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"{name}: threshold must lie in [0, 1)")
        unknown = set(weights or {}) - set(members)
        if unknown:
            raise ValueError(f"{name}: weights given for {sorted(unknown)}, which are not members")
        self.nlp = nlp  # members are looked up by name when first needed: they may be added after the ensemble
        self.name = name
        self.members = list(members)
        self.voting = voting
        self.threshold = threshold
        self.weights = {m: float((weights or {}).get(m, 1.0)) for m in self.members}
        self.label_weights: Dict[str, Dict[str, float]] = {}
        self.sources: Sources = {}  # union: label → the members whose spans of it count (fitted on dev; else all)
        self.validator = validator
        self.validate_band = validate_band
        self.validate_threshold = validate_threshold
        self.spans_key = spans_key or name
        self.scorer = scorer
        self.fitted: Optional[Dict[str, Any]] = None  # what initialize() measured when it fitted the weights
        self.usage = Usage()  # this run's totals, members and validation together

    # ---- members ----
    def member(self, name: str):
        if name not in self.nlp.component_names:
            raise ValueError(
                f"{self.name}: member {name!r} is not a component of this pipeline "
                f"(components: {self.nlp.component_names})"
            )
        if name in self.nlp.pipe_names:
            raise ValueError(
                f"{self.name}: member {name!r} is enabled, so the pipeline would run it before the "
                f"ensemble runs it again; disable it (nlp.disable_pipe({name!r}) or "
                f'[nlp] disabled = [..., "{name}"])'
            )
        return self.nlp.get_pipe(name)

    @property
    def remote(self) -> bool:
        """All members wait on servers (an ensemble inside an ensemble then runs beside in-process members)."""
        return all(isinstance(p, LLMComponent) and p.remote for p in map(self.member, self.members))

    def run_members(
        self, docs: Sequence[Doc], members: Optional[Sequence[str]] = None
    ) -> Tuple[Dict[str, List[List[TokenSpan]]], Dict[str, List[Usage]]]:
        """Each member's spans on its own copies of ``docs`` (``members``: these only, default all), and what it
        cost per doc. Members behind HTTP run concurrently with everything else; in-process members run one after
        another (they share the cores)."""
        members = list(self.members if members is None else members)
        procs = {m: self.member(m) for m in members}

        def run(member: str):
            proc = procs[member]
            copies = [doc.copy() for doc in docs]
            if not isinstance(proc, LLMComponent):
                # spaCy's ner keeps entities already on the doc (e.g. a LAR source's): a member's spans are its own
                for copy in copies:
                    copy.ents = []
            t0 = time.perf_counter()
            copies = list(proc.pipe(copies)) if isinstance(proc, Pipe) else [proc(d) for d in copies]
            share = (time.perf_counter() - t0) / max(1, len(docs))
            key = (
                proc.spans_key
                if isinstance(proc, LLMComponent)
                else proc.key
                if isinstance(proc, SpanCategorizer)
                else None
            )
            spans, usage = [], []
            for copy in copies:
                produced = copy.spans[key] if key and key in copy.spans else copy.ents
                spans.append([(s.start, s.end, s.label_) for s in produced])
                own = (copy._.llm_ner_usage or {}).get(member)
                usage.append(Usage(**own) if own else Usage(docs=1, seconds=share))
            return spans, usage

        remote = [m for m in members if isinstance(procs[m], LLMComponent) and procs[m].remote]
        results = {}
        with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            futures = {m: pool.submit(run, m) for m in remote}
            for m in members:
                if m not in futures:
                    results[m] = run(m)
            for m, f in futures.items():
                results[m] = f.result()
        return {m: results[m][0] for m in members}, {m: results[m][1] for m in members}

    def prepare(self, docs: Sequence[Doc]) -> List[Doc]:
        """``docs`` through the components before the ensemble that members may read from (a LAR source's NER),
        never the members themselves (``upstream.run_upstream``)."""
        return run_upstream(self.nlp, self.name, docs, skip=self.members)

    # ---- running ----
    def __call__(self, doc: Doc) -> Doc:
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 16) -> Iterator[Doc]:
        for batch in minibatch(stream, size=batch_size):
            yield from self._process(list(batch))

    def _process(self, docs: List[Doc]) -> List[Doc]:
        outputs, usage = self.run_members(docs)
        ballots = []
        for i, doc in enumerate(docs):
            per_doc = {m: outputs[m][i] for m in self.members}
            for m in self.members:
                doc.spans[f"{self.name}:{m}"] = [Span(doc, s, e, label=lab) for s, e, lab in per_doc[m]]
            weighted = self.voting == "weighted"
            ballots.append(
                union(per_doc, self.sources)
                if self.voting == "union"
                else vote(
                    per_doc,
                    self.weights if weighted else None,
                    self.label_weights if weighted else None,
                    self.threshold,
                )
            )
        checked = self.check_doubtful(docs, ballots) if self.validator else [Usage() for _ in docs]
        for i, (doc, ballot, validation) in enumerate(zip(docs, ballots, checked)):
            kept = ballot.kept()
            doc.spans[self.spans_key] = [Span(doc, v.start, v.end, label=v.label) for v in kept]
            doc.spans[self.spans_key].attrs["scores"] = [v.support for v in kept]
            doc.spans[self.spans_key].attrs["label_scores"] = [v.label_share for v in kept]
            doc.ents = [Span(doc, s, e, label=lab) for s, e, lab in ballot.spans()]
            report = {m: usage[m][i].to_dict() for m in self.members}
            total = Usage()
            for m in self.members:
                total.add(usage[m][i])
            total.add(validation)
            total.docs = 1
            self.usage.add(total)
            report[f"{self.name}:validation"] = validation.to_dict()
            report[self.name] = total.to_dict()
            doc._.llm_ner_usage = {**(doc._.llm_ner_usage or {}), **report}
        return docs

    def check_doubtful(
        self,
        docs: Sequence[Doc],
        ballots: Sequence[Ballot],
        *,
        threshold: Optional[float] = None,
        validator: Optional[str] = None,
    ) -> List[Usage]:
        """Re-asks ``validator`` (default: the configured one) about the spans whose support lies within
        ``validate_band`` of ``threshold`` (default: the configured one); its answer decides whether they are kept
        (``ballot.keep`` is updated). Returns the validation's cost per doc."""
        threshold = self.threshold if threshold is None else threshold
        doubtful = [
            [j for j, v in enumerate(b.votes) if abs(v.support - threshold) <= self.validate_band] for b in ballots
        ]
        spans = [
            [Span(doc, b.votes[j].start, b.votes[j].end, label=b.votes[j].label) for j in idx]
            for doc, b, idx in zip(docs, ballots, doubtful)
        ]
        if not any(spans):
            return [Usage(docs=1) for _ in docs]
        probabilities, usage = self.member(validator or self.validator).validate(docs, spans)
        for b, idx, ps in zip(ballots, doubtful, probabilities):
            for j, p in zip(idx, ps):
                if p is not None:
                    b.keep[j] = p >= self.validate_threshold
        return usage

    # ---- initialize: members and weights ----
    def initialize(self, get_examples=None, *, nlp=None, dev=None, members: Optional[Dict[str, Dict]] = None) -> None:
        """Initializes the LLM members (spaCy skips disabled components), with ``members[<name>]`` as their
        settings (e.g. a retrieval ``pool``); with ``voting = "weighted"`` fits the weights, label accuracies and
        threshold on ``dev`` (a path or docs with gold entities; else the training examples, which retrieval
        members may have seen); with ``voting = "union"`` and a ``dev`` given, which members' spans count per label
        (``fit_sources``; without one, every member's: the sentences a trained member learned from would favour
        it)."""
        for m in self.members:
            proc = self.member(m)
            if isinstance(proc, LLMComponent):  # trained spaCy members are left alone: initialize() would reset them
                proc.initialize(get_examples, nlp=nlp or self.nlp, **(members or {}).get(m, {}))
        if self.voting == "union":
            self.sources, self.fitted = {}, None
            if dev is not None:
                self.fit_on(load_demonstrations(dev, self.nlp.vocab))
            return
        if self.voting != "weighted":
            return
        if dev is not None:
            gold = load_demonstrations(dev, self.nlp.vocab)
        elif get_examples is not None:
            gold = load_demonstrations([eg.reference for eg in get_examples()])
        else:
            raise ValueError(f"{self.name}: voting='weighted' needs a dev set to fit on: initialize(dev=...)")
        self.fit_on(gold)

    def fit_on(self, gold) -> Dict[str, Any]:
        docs = [self.nlp.make_doc(d.text) for d in gold]
        truth = []
        for doc, demo in zip(docs, gold):
            spans = [doc.char_span(s, e, label=lab, alignment_mode="expand") for s, e, lab in demo.spans]
            truth.append([(sp.start, sp.end, sp.label_) for sp in spans if sp is not None])
        outputs, _ = self.run_members(self.prepare(docs))
        per_doc = [{m: outputs[m][i] for m in self.members} for i in range(len(docs))]
        extra = {}
        if self.voting == "union":
            self.sources, f1, extra["union_dev_f1"] = fit_sources(per_doc, truth, self.members)
        else:
            self.weights, self.label_weights, self.threshold, f1 = fit(per_doc, truth, self.members)
        self.fitted = {
            "dev_docs": len(docs),
            "dev_f1": f1,
            **extra,
            "member_dev_f1": {m: micro_f1([flat_spans(o[m]) for o in per_doc], truth) for m in self.members},
        }
        return self.fitted

    # ---- scoring ----
    def score(self, examples: Iterable[Example], **kwargs) -> Dict[str, Any]:
        """The ensemble's entity scores, plus ``<member>_ents_p/r/f`` for each member's own flat output."""
        examples = list(examples)
        scores = dict(self.scorer(examples, **kwargs)) if self.scorer is not None else {}
        for m in self.members:
            key = f"{self.name}:{m}"

            def getter(doc, attr, key=key):  # gold docs have no member group: their entities
                return filter_spans(doc.spans[key]) if key in doc.spans else doc.ents

            own = Scorer.score_spans(examples, "ents", getter=getter, **kwargs)
            scores.update({f"{m}_{k}": v for k, v in own.items() if k != "ents_per_type"})
        return scores

    # ---- serialization: the fitted vote (votes.json) ----
    def vote_settings(self) -> Dict[str, Any]:
        return {
            "weights": self.weights,
            "label_weights": self.label_weights,
            "threshold": self.threshold,
            "sources": {label: list(ms) for label, ms in self.sources.items()},
            "fitted": self.fitted,
        }

    def use_vote_settings(self, state: Dict[str, Any]) -> None:
        self.weights = {m: float(state["weights"].get(m, 1.0)) for m in self.members}
        self.label_weights = state.get("label_weights") or {}
        self.threshold = state["threshold"]
        sources = {label: tuple(ms) for label, ms in (state.get("sources") or {}).items()}
        strangers = sorted({m for ms in sources.values() for m in ms} - set(self.members))
        if strangers:
            raise ValueError(
                f"{self.name}: the saved vote's sources name {strangers}, which are not members "
                f"({self.members}); save the pipeline again or fit it again (initialize(dev=...))"
            )
        self.sources = sources
        self.fitted = state.get("fitted")

    def to_bytes(self, *, exclude=tuple()) -> bytes:
        return util.to_bytes({"votes": lambda: srsly.msgpack_dumps(self.vote_settings())}, exclude)

    def from_bytes(self, bytes_data: bytes, *, exclude=tuple()) -> "Ensemble":
        util.from_bytes(bytes_data, {"votes": lambda b: self.use_vote_settings(srsly.msgpack_loads(b))}, exclude)
        return self

    def to_disk(self, path: Union[str, Path], *, exclude=tuple()) -> None:
        util.to_disk(path, {"votes.json": lambda p: srsly.write_json(p, self.vote_settings())}, exclude)

    def from_disk(self, path: Union[str, Path], *, exclude=tuple()) -> "Ensemble":
        util.from_disk(path, {"votes.json": lambda p: self.use_vote_settings(srsly.read_json(p))}, exclude)
        return self
