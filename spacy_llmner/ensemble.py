"""The ``llm_ner_ensemble`` component (EL4NER): several NER members, one span-level vote, self-validation of the
spans the members disagree on.

Members are components of the same pipeline, named in ``members`` and *disabled* there (``[nlp] disabled`` or
``nlp.disable_pipe``): the ensemble runs them itself, each on its own copy of the doc, so one member's
``doc.ents`` never hides another's. ``llm_lar_ner`` members see the entities earlier components left (a LAR
source's); other members start from a doc without entities (spaCy's ``ner`` would keep them as its own). A member is any NER producer: an ``llm_lar_ner`` (any backend, format,
demonstrations, prompt or LAR stages), a trained spaCy ``ner`` (sourced from a packaged pipeline with
``replace_listeners`` so it carries its own tok2vec), a ``spancat``. Being components, members keep spaCy's config
validation, sourcing and serialization, and llama.cpp members on one model file share one loaded copy.

Vote (per doc): the union of all members' spans; a boundary's *support* is the share of the total member weight
whose members proposed exactly those boundaries (any label); kept when support > ``threshold``. Its type is a
separate vote among the members that proposed it, each counting ``weight × its dev accuracy for that label``.
With ``voting = "weighted"``, ``initialize`` fits the member weights, the label accuracies and the threshold on
a dev set. A ``validator`` (an ``llm_lar_ner`` member) re-asks spans whose support lies within ``validate_band``
of the threshold — only those, so the cost stays bounded — with its yes/no verification prompt.

Output: non-overlapping kept spans to ``doc.ents`` (most supported first), every kept span to
``doc.spans[spans_key]`` with ``attrs["scores"]`` (support) and ``attrs["label_scores"]`` (type-vote share), each
member's spans to ``doc.spans["<ensemble>:<member>"]``, and the cost per member and in total to
``doc._.llm_ner_usage``.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.scorer import Scorer
from spacy.tokens import Doc, Span
from spacy.training import Example
from spacy.util import filter_spans, minibatch

from .usage import Usage

TokenSpan = Tuple[int, int, str]  # token start, token end, label

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

WEIGHT_GRID = (0.0, 0.5, 1.0, 2.0, 3.0)
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # support > t; 0.0 keeps the union


@Language.factory("llm_ner_ensemble", default_config=DEFAULT_CONFIG)
def make_llm_ner_ensemble(
    nlp: Language,
    name: str,
    members: List[str],
    voting: str,
    threshold: float,
    weights: Dict[str, float],
    validator: Optional[str],
    validate_band: float,
    validate_threshold: float,
    spans_key: Optional[str],
    scorer: Optional[Callable],
) -> "Ensemble":
    return Ensemble(nlp, name, members=members, voting=voting, threshold=threshold, weights=weights,
                    validator=validator, validate_band=validate_band, validate_threshold=validate_threshold,
                    spans_key=spans_key, scorer=scorer)


# ---- voting (pure functions on token spans: testable without any model) -------------------------------------
@dataclass
class Vote:
    start: int
    end: int
    label: str
    support: float  # share of the total member weight that proposed these boundaries
    label_share: float  # the chosen label's share of the type vote
    members: Tuple[str, ...]  # who proposed these boundaries


def tally(outputs: Dict[str, Sequence[TokenSpan]], weights: Dict[str, float],
          label_weights: Optional[Dict[str, Dict[str, float]]] = None) -> List[Vote]:
    """Every proposed boundary with its support and its type vote. Ties in the type vote go to the label of the
    earliest member (in ``outputs`` order) that proposed it."""
    total = sum(max(0.0, weights.get(m, 1.0)) for m in outputs)
    proposed: Dict[Tuple[int, int], Dict[str, List[str]]] = {}
    for member, spans in outputs.items():
        for start, end, label in dict.fromkeys(spans):  # a member proposing the same span twice votes once
            proposed.setdefault((start, end), {}).setdefault(label, []).append(member)
    order = {m: i for i, m in enumerate(outputs)}
    votes = []
    for (start, end), by_label in proposed.items():
        members = tuple(sorted({m for ms in by_label.values() for m in ms}, key=order.get))
        support = sum(max(0.0, weights.get(m, 1.0)) for m in members) / total if total else 0.0
        scored = {}
        for label, ms in by_label.items():
            scored[label] = sum(max(0.0, weights.get(m, 1.0)) * _accuracy(label_weights, m, label) for m in ms)
        label = max(scored, key=lambda lab: (scored[lab], -min(order[m] for m in by_label[lab])))
        mass = sum(scored.values())
        votes.append(Vote(start, end, label, support, scored[label] / mass if mass else 0.0, members))
    votes.sort(key=lambda v: (v.start, -v.end))
    return votes


def _accuracy(label_weights: Optional[Dict[str, Dict[str, float]]], member: str, label: str) -> float:
    if label_weights is None:  # an unweighted vote
        return 1.0
    return label_weights.get(member, {}).get(label, 0.5)  # never seen at gold boundaries on dev: a coin flip


def _non_overlapping(items, bounds, preference):
    """Greedy: items in ``preference`` order, each kept unless it overlaps one already kept; in text order."""
    taken, used = [], set()
    for item in sorted(items, key=preference):
        start, end = bounds(item)
        if not any(t in used for t in range(start, end)):
            taken.append(item)
            used.update(range(start, end))
    return sorted(taken, key=lambda item: bounds(item))


def flat(votes: Sequence[Vote]) -> List[Vote]:
    """Non-overlapping spans: most supported first, then longer, then earlier."""
    return _non_overlapping(votes, lambda v: (v.start, v.end), lambda v: (-v.support, -(v.end - v.start), v.start))


def micro_f1(predicted: Sequence[Iterable[TokenSpan]], gold: Sequence[Iterable[TokenSpan]]) -> float:
    tp = fp = fn = 0
    for p, g in zip(predicted, gold):
        p, g = set(p), set(g)
        tp += len(p & g)
        fp += len(p - g)
        fn += len(g - p)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def label_accuracy(outputs: Sequence[Dict[str, Sequence[TokenSpan]]], gold: Sequence[Sequence[TokenSpan]]
                   ) -> Dict[str, Dict[str, float]]:
    """Per member and label: how often a span it typed with that label, at gold boundaries, has that gold label
    (add-one smoothed, so an unseen label counts 0.5)."""
    counts: Dict[str, Dict[str, List[int]]] = {}
    for out, g in zip(outputs, gold):
        truth = {(s, e): lab for s, e, lab in g}
        for member, spans in out.items():
            for s, e, lab in spans:
                if (s, e) in truth:
                    c = counts.setdefault(member, {}).setdefault(lab, [0, 0])
                    c[0] += truth[(s, e)] == lab
                    c[1] += 1
    return {m: {lab: (ok + 1) / (n + 2) for lab, (ok, n) in by.items()} for m, by in counts.items()}


def fit(outputs: Sequence[Dict[str, Sequence[TokenSpan]]], gold: Sequence[Sequence[TokenSpan]],
        members: Sequence[str], rounds: int = 2) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]], float, float]:
    """Member weights (coordinate ascent over ``WEIGHT_GRID``), label accuracies and the support threshold that
    maximise micro F1 of the flat output on ``gold``. Returns weights, label weights, threshold, dev F1."""
    label_weights = label_accuracy(outputs, gold)

    def score(weights: Dict[str, float]) -> Tuple[float, float]:
        tallies = [tally(out, weights, label_weights) for out in outputs]
        best = (-1.0, 0.5)
        for t in THRESHOLD_GRID:
            pred = [[(v.start, v.end, v.label) for v in flat([v for v in vs if v.support > t])] for vs in tallies]
            f = micro_f1(pred, gold)
            if f > best[0]:
                best = (f, t)
        return best

    weights = {m: 1.0 for m in members}
    f1, threshold = score(weights)
    for _ in range(rounds):
        changed = False
        for m in members:
            for w in WEIGHT_GRID:
                if w == weights[m] or (w == 0 and sum(v > 0 for v in weights.values()) == 1 and weights[m] > 0):
                    continue
                trial = {**weights, m: w}
                f, t = score(trial)
                if f > f1 + 1e-9:
                    weights, f1, threshold, changed = trial, f, t, True
        if not changed:
            break
    return weights, label_weights, threshold, f1


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
        if voting not in ("majority", "weighted"):
            raise ValueError(f"{name}: voting must be 'majority' or 'weighted', not {voting!r}")
        if len(set(members)) != len(members) or not members:
            raise ValueError(f"{name}: members must name at least one component, each once (got {list(members)})")
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
        self.validator = validator
        self.validate_band = validate_band
        self.validate_threshold = validate_threshold
        self.spans_key = spans_key or name
        self.scorer = scorer
        self.fitted: Optional[Dict[str, Any]] = None  # what initialize() measured when it fitted the weights

    # ---- members ----
    def member(self, name: str):
        if name not in self.nlp.component_names:
            raise ValueError(f"{self.name}: member {name!r} is not a component of this pipeline "
                             f"(components: {self.nlp.component_names})")
        if name in self.nlp.pipe_names:
            raise ValueError(f"{self.name}: member {name!r} is enabled, so the pipeline would run it before the "
                             f"ensemble runs it again; disable it (nlp.disable_pipe({name!r}) or "
                             f"[nlp] disabled = [..., \"{name}\"])")
        return self.nlp.get_pipe(name)

    def _is_remote(self, proc) -> bool:
        backend = getattr(proc, "backend", None)
        backend = getattr(backend, "backend", backend)  # behind a cache
        return bool(getattr(backend, "remote", False))

    def run_members(self, docs: Sequence[Doc]) -> Tuple[Dict[str, List[List[TokenSpan]]], Dict[str, List[Usage]]]:
        """Each member's spans on its own copies of ``docs``, and what it cost per doc. Members behind HTTP run
        concurrently with everything else; in-process members run one after another (they share the cores)."""
        from .component import LLMNER

        procs = {m: self.member(m) for m in self.members}

        def run(member: str):
            proc = procs[member]
            copies = [doc.copy() for doc in docs]
            if not isinstance(proc, LLMNER):
                # spaCy's ner keeps entities already on the doc (e.g. a LAR source's): a member's spans are its own
                for copy in copies:
                    copy.ents = []
            t0 = time.perf_counter()
            copies = list(proc.pipe(copies)) if hasattr(proc, "pipe") else [proc(d) for d in copies]
            share = (time.perf_counter() - t0) / max(1, len(docs))
            spans, usage = [], []
            for copy in copies:
                key = getattr(proc, "spans_key", None)
                produced = copy.spans[key] if key and key in copy.spans else copy.ents
                spans.append([(s.start, s.end, s.label_) for s in produced])
                own = (copy._.llm_ner_usage or {}).get(member)
                usage.append(Usage(**own) if own else Usage(docs=1, seconds=share))
            return spans, usage

        remote = [m for m in self.members if self._is_remote(procs[m])]
        results = {}
        with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            futures = {m: pool.submit(run, m) for m in remote}
            for m in self.members:
                if m not in futures:
                    results[m] = run(m)
            for m, f in futures.items():
                results[m] = f.result()
        return {m: results[m][0] for m in self.members}, {m: results[m][1] for m in self.members}

    # ---- running ----
    def __call__(self, doc: Doc) -> Doc:
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 16) -> Iterator[Doc]:
        for batch in minibatch(stream, size=batch_size):
            yield from self._process(list(batch))

    def _process(self, docs: List[Doc]) -> List[Doc]:
        outputs, usage = self.run_members(docs)
        votes = []
        for i, doc in enumerate(docs):
            per_doc = {m: outputs[m][i] for m in self.members}
            for m in self.members:
                doc.spans[f"{self.name}:{m}"] = [Span(doc, s, e, label=lab) for s, e, lab in per_doc[m]]
            if self.voting == "weighted":
                votes.append(tally(per_doc, self.weights, self.label_weights))
            else:
                votes.append(tally(per_doc, {m: 1.0 for m in self.members}))
        keep = [[v.support > self.threshold for v in vs] for vs in votes]
        checked = self._validate(docs, votes, keep) if self.validator else [Usage() for _ in docs]
        for i, doc in enumerate(docs):
            kept = [v for v, k in zip(votes[i], keep[i]) if k]
            group = [Span(doc, v.start, v.end, label=v.label) for v in kept]
            doc.spans[self.spans_key] = group
            doc.spans[self.spans_key].attrs["scores"] = [v.support for v in kept]
            doc.spans[self.spans_key].attrs["label_scores"] = [v.label_share for v in kept]
            doc.ents = [Span(doc, v.start, v.end, label=v.label) for v in flat(kept)]
            report = {m: usage[m][i].to_dict() for m in self.members}
            total = Usage()
            for m in self.members:
                total.add(usage[m][i])
            total.add(checked[i])
            total.docs = 1
            report[f"{self.name}:validation"] = checked[i].to_dict()
            report[self.name] = total.to_dict()
            doc._.llm_ner_usage = {**(doc._.llm_ner_usage or {}), **report}
        return docs

    def _validate(self, docs, votes, keep) -> List[Usage]:
        """Re-asks the validator about spans whose support is within the band around the threshold; its answer
        decides whether they are kept. Updates ``keep`` in place."""
        doubtful = [[j for j, v in enumerate(vs) if abs(v.support - self.threshold) <= self.validate_band]
                    for vs in votes]
        spans = [[Span(doc, votes[i][j].start, votes[i][j].end, label=votes[i][j].label) for j in doubtful[i]]
                 for i, doc in enumerate(docs)]
        if not any(spans):
            return [Usage(docs=1) for _ in docs]
        validator = self.member(self.validator)
        probabilities, usage = validator.validate(docs, spans)
        for i, idx in enumerate(doubtful):
            for j, p in zip(idx, probabilities[i]):
                if p is not None:
                    keep[i][j] = p >= self.validate_threshold
        return usage

    # ---- initialize: members and weights ----
    def initialize(self, get_examples=None, *, nlp=None, dev=None, members: Optional[Dict[str, Dict]] = None
                   ) -> None:
        """Initializes the LLM members (spaCy skips disabled components), with ``members[<name>]`` as their
        settings (e.g. a retrieval ``pool``); with ``voting = "weighted"`` fits the weights, label accuracies and
        threshold on ``dev`` (a path or docs with gold entities; else the training examples, which retrieval
        members may have seen)."""
        from .component import LLMNER, load_demonstrations

        for m in self.members:
            proc = self.member(m)
            if isinstance(proc, LLMNER):  # trained spaCy members are left alone: initialize() would reset them
                proc.initialize(get_examples, nlp=nlp or self.nlp, **(members or {}).get(m, {}))
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
        outputs, _ = self.run_members(self._prepare(docs))
        per_doc = [{m: outputs[m][i] for m in self.members} for i in range(len(docs))]
        self.weights, self.label_weights, self.threshold, f1 = fit(per_doc, truth, self.members)
        self.fitted = {"dev_docs": len(docs), "dev_f1": f1,
                       "member_dev_f1": {m: micro_f1([flat_spans(o[m]) for o in per_doc], truth)
                                         for m in self.members}}
        return self.fitted

    def _prepare(self, docs: List[Doc]) -> List[Doc]:
        """Runs the components before the ensemble that members may read from (e.g. a LAR source's NER):
        disabled ones too, as ``spacy assemble`` disables sourced components while initializing; never members,
        and never LLM components (ours or spacy-llm's), which are members or baselines, not sources."""
        from .component import LLMNER

        for name, proc in self.nlp.components:
            if name == self.name:
                break
            llm = isinstance(proc, (LLMNER, Ensemble)) or type(proc).__module__.startswith("spacy_llm")
            if name not in self.members and not llm:
                docs = list(proc.pipe(docs)) if hasattr(proc, "pipe") else [proc(d) for d in docs]
        return docs

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

    # ---- serialization ----
    def _state(self) -> Dict[str, Any]:
        return {"weights": self.weights, "label_weights": self.label_weights, "threshold": self.threshold,
                "fitted": self.fitted}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.weights = {m: float(state["weights"].get(m, 1.0)) for m in self.members}
        self.label_weights = state.get("label_weights") or {}
        self.threshold = state["threshold"]
        self.fitted = state.get("fitted")

    def to_bytes(self, *, exclude=tuple()) -> bytes:
        return srsly.msgpack_dumps(self._state())

    def from_bytes(self, bytes_data: bytes, *, exclude=tuple()) -> "Ensemble":
        self._load_state(srsly.msgpack_loads(bytes_data))
        return self

    def to_disk(self, path: Union[str, Path], *, exclude=tuple()) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        srsly.write_json(path / "votes.json", self._state())

    def from_disk(self, path: Union[str, Path], *, exclude=tuple()) -> "Ensemble":
        self._load_state(srsly.read_json(Path(path) / "votes.json"))
        return self


def flat_spans(spans: Sequence[TokenSpan]) -> List[TokenSpan]:
    """A member's own flat output: longest first, then earlier (what ``filter_spans`` gives)."""
    return _non_overlapping(set(spans), lambda x: (x[0], x[1]), lambda x: (-(x[1] - x[0]), x[0], x[2]))
