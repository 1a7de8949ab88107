"""The ``llm_lar_ner`` component: doc → chunks → prompts → backend → parsed mentions → verified spans.

All predicted spans (nested too) go to ``doc.spans[spans_key]``; the longest non-overlapping ones to ``doc.ents``.
"""

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.tokens import Doc, Span
from spacy.training import Example
from spacy.util import filter_spans, minibatch

from . import backends  # noqa: F401  (registers the backends; creates llm_models)
from .formats import LinesFormat, locate
from .labels import LabelSet
from .labels.alignment import LabelAlignment
from .lar import CONTENT_FREE, VERIFY_OPTIONS, Candidate, LARStages, best, choose, p_yes, typing_context, typing_options
from .lar import SpanMemory, verification_context, verification_examples
from .prompt import DEFAULT_INSTRUCTIONS, Demonstration, PromptBuilder, display
from .retrieval.pool import ARRAYS
from .ty import BackendError, GenerationRequest, OutputFormat, ScoreRequest
from .usage import Usage

if not Doc.has_extension("llm_ner_usage"):
    Doc.set_extension("llm_ner_usage", default=None)  # {component name: Usage dict}
if not Doc.has_extension("llm_ner_io"):
    Doc.set_extension("llm_ner_io", default=None)  # {component name: [{"prompt", "response"}]} with save_io

EXTRACT_INSTRUCTIONS = "Find the named entities in each sentence."
FILES = "files.json"  # the files to_disk wrote: from_disk refuses a copy that lacks one
POOL_FILES = ["pool/demonstrations.jsonl"] + [f"pool/{name}.npy" for name in ARRAYS]

DEFAULT_CONFIG = {
    "labels": [],
    "label_definitions": {},
    "label_synonyms": {},
    "format": {"@misc": "spacy_llmner.LinesFormat.v1"},
    "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": "gemma3-270m"},
    "demonstrations": None,
    "zero_shot": False,
    "retriever": None,
    "max_demo_tokens": None,
    "instructions": DEFAULT_INSTRUCTIONS,
    "constrained": True,
    "spans_key": "llm_ner",
    "alignment_mode": "expand",
    "max_chunk_tokens": 200,
    "max_new_tokens": 256,
    "cache_path": None,
    "save_io": False,
    "on_error": "raise",
    "show_progress": False,
    "scorer": {"@scorers": "spacy.ner_scorer.v1"},
    "lar": None,
}


@Language.factory("llm_lar_ner", default_config=DEFAULT_CONFIG)
def make_llm_lar_ner(
    nlp: Language,
    name: str,
    labels: List[str],
    label_definitions: Dict[str, str],
    label_synonyms: Dict[str, str],
    format: OutputFormat,
    backend: Any,
    demonstrations: Optional[str],
    zero_shot: bool,
    retriever: Optional[Any],
    max_demo_tokens: Optional[int],
    instructions: str,
    constrained: bool,
    spans_key: str,
    alignment_mode: str,
    max_chunk_tokens: int,
    max_new_tokens: int,
    cache_path: Optional[str],
    save_io: bool,
    on_error: str,
    show_progress: bool,
    scorer: Optional[Callable],
    lar: Optional[LARStages],
) -> "LLMNER":
    """``demonstrations``: a file of few-shot examples (jsonl, .spacy, BIO) read on first use; or null, with the
    demonstrations given by ``initialize()`` / ``set_demonstrations()``. Either way they are saved with the pipeline
    and a saved pipeline whose demonstrations are missing does not load. ``zero_shot``: true declares that the
    component runs without demonstrations (a saved pipeline needs none); false (default) expects demonstrations,
    from the file or from a retriever's pool."""
    return LLMNER(
        nlp.vocab,
        name=name,
        labels=LabelSet(labels, label_definitions, label_synonyms),
        fmt=format,
        backend=backend,
        demonstrations=demonstrations,
        zero_shot=zero_shot,
        retriever=retriever,
        max_demo_tokens=max_demo_tokens,
        instructions=instructions,
        constrained=constrained,
        spans_key=spans_key,
        alignment_mode=alignment_mode,
        max_chunk_tokens=max_chunk_tokens,
        max_new_tokens=max_new_tokens,
        cache_path=cache_path,
        save_io=save_io,
        on_error=on_error,
        show_progress=show_progress,
        scorer=scorer,
        lar=lar,
    )


def load_demonstrations(source: Union[str, Path, Sequence], nlp_vocab=None,
                        spans_key: Optional[str] = None) -> List[Demonstration]:
    """Demonstrations from a jsonl file (``text`` + ``spans``/``entities``), a ``.spacy`` DocBin, a BIO file,
    or a list of Docs / dicts / Demonstrations. A Doc's spans are ``doc.spans[spans_key]`` where it has that
    group (nested entities, e.g. GENIA), else its ``doc.ents``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"llm_lar_ner: demonstrations file not found: {path}")
        if path.suffix in (".jsonl", ".json"):
            return [Demonstration.from_dict(row) for row in srsly.read_jsonl(path)]
        from .corpora import read_bio, read_docbin

        docs = read_docbin(path, nlp_vocab) if path.suffix == ".spacy" else read_bio(path, nlp_vocab)
        return load_demonstrations(docs, spans_key=spans_key)
    out = []
    for item in source:
        if isinstance(item, Demonstration):
            out.append(item)
        elif isinstance(item, Doc):
            spans = item.spans[spans_key] if spans_key and spans_key in item.spans else item.ents
            out.append(Demonstration(item.text, [(e.start_char, e.end_char, e.label_) for e in spans]))
        else:
            out.append(Demonstration.from_dict(item))
    return out


class LLMNER(Pipe):
    def __init__(
        self,
        vocab,
        name: str = "llm_lar_ner",
        *,
        labels: LabelSet,
        fmt: OutputFormat,
        backend: Any,
        demonstrations: Optional[str] = None,
        zero_shot: bool = False,
        retriever: Optional[Any] = None,
        max_demo_tokens: Optional[int] = None,
        instructions: str = DEFAULT_INSTRUCTIONS,
        constrained: bool = True,
        spans_key: str = "llm_ner",
        alignment_mode: str = "expand",
        max_chunk_tokens: int = 200,
        max_new_tokens: int = 256,
        cache_path: Optional[str] = None,
        save_io: bool = False,
        on_error: str = "raise",
        show_progress: bool = False,
        scorer: Optional[Callable] = None,
        lar: Optional[LARStages] = None,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"{name}: on_error must be 'raise' or 'skip', not {on_error!r}")
        if alignment_mode not in ("strict", "contract", "expand"):
            raise ValueError(f"{name}: alignment_mode must be strict, contract or expand, not {alignment_mode!r}")
        if max_chunk_tokens < 1:
            raise ValueError(f"{name}: max_chunk_tokens must be positive")
        self.vocab = vocab
        self.name = name
        self.label_set = labels
        self.format = fmt
        if cache_path:
            from .backends.cache import CachedBackend

            backend = CachedBackend(backend, cache_path, owner=name)
        self.backend = backend
        self.demonstrations_source = demonstrations
        self.zero_shot = zero_shot
        self._warned_no_demos = False
        self._demonstrations: Optional[List[Demonstration]] = None
        # Per-query demonstrations from a pool (retrieval) replace the static ones once the pool is built.
        self.retriever = retriever
        self.max_demo_tokens = max_demo_tokens
        self.prompts = PromptBuilder(labels, fmt, instructions)
        self.constrained = constrained and getattr(backend, "supports_grammar", False)
        self.spans_key = spans_key
        self.alignment_mode = alignment_mode
        self.max_chunk_tokens = max_chunk_tokens
        self.max_new_tokens = max_new_tokens
        self.save_io = save_io
        self.on_error = on_error
        self.show_progress = show_progress
        self.scorer = scorer
        self.usage = Usage()  # this run's totals; reset with reset_usage()
        # LAR / EL4NER stages (``lar.py``); None: one pass. The alignment is learned in initialize() or set.
        self.lar = lar
        self.alignment: Optional[LabelAlignment] = None
        self.span_memory: Optional[SpanMemory] = None  # gold spans of the alignment corpus, for kNN typing
        self._own_encoder = None

    # ---- demonstrations -------------------------------------------------------------------------------------
    @property
    def demonstrations(self) -> List[Demonstration]:
        # Read lazily: a pipeline loaded from disk carries its own copy and never touches the original file.
        if self._demonstrations is None:
            src = self.demonstrations_source
            self._demonstrations = load_demonstrations(src, self.vocab, self.spans_key) if src else []
        return self._demonstrations

    def set_demonstrations(self, source: Union[str, Path, Sequence]) -> None:
        self._demonstrations = load_demonstrations(source, self.vocab, self.spans_key)

    def initialize(self, get_examples=None, *, nlp=None, demonstrations=None, labels=None, pool=None,
                   alignment_corpus=None) -> None:
        """Labels from ``labels`` or, when none are configured, from the gold entities of ``get_examples``;
        demonstrations from a path or a list; with a retriever, its pool from ``pool`` (path or list) or else
        the gold docs of ``get_examples`` (the training corpus under ``spacy train`` / ``spacy assemble``).
        With a ``source`` proposer, the label alignment is learned on ``alignment_corpus`` (else those gold docs)
        by running the pipeline's earlier components on it. All are saved with the pipeline."""
        if labels:
            self._set_labels(labels)
        elif not self.label_set.labels and get_examples is not None:
            self._set_labels(sorted({e.label_ for eg in get_examples() for e in eg.reference.ents}))
        if demonstrations is not None:
            self.set_demonstrations(demonstrations)
        if self.retriever is not None:
            if pool is not None:
                self.build_pool(pool)
            elif get_examples is not None:
                self.build_pool([eg.reference for eg in get_examples()])
        if not self.label_set.labels:  # none configured or in the examples: the labels the demonstrations show
            pool = getattr(self.retriever, "pool", None)
            shown = pool.demonstrations if pool is not None else self.demonstrations
            found = sorted({lab for demo in shown for _, _, lab in demo.spans})
            if found:
                self._set_labels(found)
        if self._uses("source"):
            gold = None
            if alignment_corpus is not None:
                gold = load_demonstrations(alignment_corpus, self.vocab)
            elif get_examples is not None:
                gold = load_demonstrations([eg.reference for eg in get_examples()])
            if gold and nlp is not None:
                self.learn_alignment(nlp, gold)
            elif self.lar.alignment:
                self.alignment = self._pin(self.align_by_embeddings(sorted(self.lar.alignment)))

    def learn_alignment(self, nlp: Language, gold: Sequence[Demonstration]) -> LabelAlignment:
        """Source → target alignment from the source's predictions on gold target data (co-occurrence at equal
        boundaries) mixed with label-embedding similarity; config rows pinned on top."""
        from .ensemble import Ensemble

        before = []
        for name, proc in nlp.components:  # disabled ones too: `spacy assemble` disables sourced components
            if name == self.name:
                break
            if not isinstance(proc, (LLMNER, Ensemble)):  # other LLM members of an ensemble are no source
                before.append(proc)
        pairs = []
        for demo in gold:
            doc = nlp.make_doc(demo.text)
            for proc in before:
                doc = proc(doc)
            truth = {(s, e): lab for s, e, lab in demo.spans}
            pairs.extend((lab, truth.get((s, e))) for s, e, lab in self.lar.source_spans(doc))
        source = sorted({s for s, _ in pairs} | set(self.lar.alignment or {}))
        if not source:
            raise ValueError(f"{self.name}: the source predicted no spans on the alignment corpus; is a source "
                             f"NER component placed before {self.name} (source={self.lar.source!r})?")
        cooc = LabelAlignment.from_cooccurrence(pairs, source, self.label_set.labels)
        self.span_memory = SpanMemory.build(gold, self._encoder())
        w = self.lar.embedding_weight
        self.alignment = self._pin(LabelAlignment.combine([(self.align_by_embeddings(source), w), (cooc, 1 - w)]))
        return self.alignment

    def align_by_embeddings(self, source: Sequence[str]) -> LabelAlignment:
        return LabelAlignment.from_embeddings(source, self.label_set.labels, self._encoder(),
                                              self.label_set.definitions)

    def _encoder(self):
        encoder = getattr(self.retriever, "encoder", None)
        if encoder is None:
            if self._own_encoder is None:
                from .retrieval.encoder import MiniLMEncoder

                self._own_encoder = MiniLMEncoder()
            encoder = self._own_encoder
        return encoder

    def _pin(self, alignment: LabelAlignment) -> LabelAlignment:
        return alignment.override(self.lar.alignment) if self.lar.alignment else alignment

    def build_pool(self, source: Union[str, Path, Sequence]) -> None:
        if self.retriever is None:
            raise ValueError(f"{self.name}: no retriever configured, so there is no pool to build")
        self.retriever.build(load_demonstrations(source, self.vocab, self.spans_key))

    def demonstrations_for(self, texts: Sequence[str]) -> List[List[Demonstration]]:
        """The demonstrations each query sees, in prompt order, within ``max_demo_tokens`` if set (the least
        similar are dropped whole, never truncated)."""
        if self.retriever is not None and self.retriever.pool is not None:
            chosen = self.retriever.retrieve(texts)
        else:
            chosen = [self.demonstrations] * len(texts)
        if self.max_demo_tokens is None:
            return chosen
        count = getattr(self.backend, "count_tokens", None) or (lambda text: len(text) // 4 + 1)
        out = []
        for demos in chosen:
            kept, total = [], 0
            for demo in reversed(demos):  # most similar first
                cost = count(self.prompts.render_demonstration(demo))
                if total + cost > self.max_demo_tokens:
                    continue
                kept.insert(0, demo)
                total += cost
            out.append(kept)
        return out

    @property
    def labels(self) -> Tuple[str, ...]:
        return tuple(self.label_set.labels)

    def add_label(self, label: str) -> int:
        if label in self.label_set.labels:
            return 0
        self._set_labels(self.label_set.labels + [label])
        return 1

    def _set_labels(self, labels: Sequence[str]) -> None:
        old = self.label_set
        self.label_set = LabelSet(labels, {k: v for k, v in old.definitions.items() if k in labels},
                                  {k: v for k, v in old.synonyms.items() if v in labels})
        self.prompts = PromptBuilder(self.label_set, self.format, self.prompts.instructions)
        self.alignment = None  # learned for the old label set

    # ---- running --------------------------------------------------------------------------------------------
    def __call__(self, doc: Doc) -> Doc:
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 16) -> Iterator[Doc]:
        if not self.label_set.labels:
            raise ValueError(f"{self.name}: no labels configured; set 'labels' in the config or initialize()")
        if self.retriever is not None and self.retriever.pool is None:
            raise ValueError(
                f"{self.name}: a retriever is configured but has no pool; call initialize(pool=...) or "
                "nlp.initialize() with training examples (or build_pool(...)) first"
            )
        if self.retriever is None and not self.zero_shot and not self.demonstrations and not self._warned_no_demos:
            self._warned_no_demos = True
            warnings.warn(f"{self.name}: no demonstrations: a small model answers poorly without them. Give some "
                          "(set_demonstrations, initialize(demonstrations=...), a retriever) or declare "
                          "zero_shot = true.", stacklevel=2)
        progress = None
        if self.show_progress:
            from tqdm import tqdm

            progress = tqdm(desc=self.name, unit="doc")
        for batch in minibatch(stream, size=batch_size):
            for doc in self._process(list(batch)):
                if progress is not None:
                    progress.update(1)
                yield doc
        if progress is not None:
            progress.close()

    def reset_usage(self) -> Usage:
        old, self.usage = self.usage, Usage()
        return old

    def chunks(self, doc: Doc) -> List[Tuple[int, int]]:
        """Token ranges to send one at a time: whole sentences packed up to ``max_chunk_tokens``; a longer
        sentence is cut at the limit. Never truncated: every token is in exactly one chunk."""
        n = len(doc)
        if n <= self.max_chunk_tokens:
            return [(0, n)] if n else []
        if doc.has_annotation("SENT_START"):
            sents = [(s.start, s.end) for s in doc.sents]
        else:
            from spacy.pipeline import Sentencizer

            starts = [i for i, tag in enumerate(Sentencizer().predict([doc])[0]) if tag or i == 0]
            sents = list(zip(starts, starts[1:] + [n]))
        pieces = []
        for start, end in sents:
            for s in range(start, end, self.max_chunk_tokens):
                pieces.append((s, min(end, s + self.max_chunk_tokens)))
        out: List[Tuple[int, int]] = []
        for start, end in pieces:
            if out and end - out[-1][0] <= self.max_chunk_tokens:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def request(self, chunk: Span, demonstrations: Optional[Sequence[Demonstration]] = None,
                extract: bool = False) -> GenerationRequest:
        """The one-pass request for a chunk; ``extract``: the same with every type shown as ``entity`` (spans only)."""
        shown = display(chunk.text).rstrip()  # what the prompt shows; offsets are the chunk's own
        prompts = self._extract_prompts() if extract else self.prompts
        grammar = None
        if self.constrained:
            offsets = [(t.idx - chunk.start_char, t.idx - chunk.start_char + len(t)) for t in chunk if not t.is_space]
            grammar = self.format.grammar(shown, offsets, prompts.labels.names())
        demos = self.demonstrations_for([shown])[0] if demonstrations is None else demonstrations
        prompt = prompts.build(shown, demos)
        # An answer needs at most about two tokens per input token (a full inline copy plus markup); the budget
        # stops greedy decoding that loops on a repeated mention from running to the hard cap.
        budget = min(self.max_new_tokens, 24 + 2 * len(chunk))
        return GenerationRequest(prompt, budget, tuple(self.format.stop), grammar)

    def _extract_prompts(self) -> PromptBuilder:
        aliases = {a: "entity" for label in self.label_set for a in (label, self.label_set.prompt_names[label])
                   if a != "entity"}
        return PromptBuilder(LabelSet(["entity"], synonyms=aliases), self.format, EXTRACT_INSTRUCTIONS)

    def _process(self, docs: List[Doc]) -> List[Doc]:
        # Source spans are read first: this component overwrites doc.ents.
        source = [self.lar.source_spans(doc) for doc in docs] if self._uses("source") else None
        jobs: List[Tuple[int, Span]] = []
        for i, doc in enumerate(docs):
            for start, end in self.chunks(doc):
                chunk = doc[start:end]
                if chunk.text.strip():
                    jobs.append((i, chunk))
        shown = [display(chunk.text).rstrip() for _, chunk in jobs]
        demos = self.demonstrations_for(shown)
        run = _Run(docs)
        candidates: List[Dict[Tuple[int, int], Candidate]] = [{} for _ in jobs]
        if self.lar is None or "generate" in self.lar.proposers:
            requests = [self.request(chunk, d) for (_, chunk), d in zip(jobs, demos)]
            for j, text in enumerate(self._generate(jobs, requests, run)):
                if text is not None:
                    for start, end, label in self.parse_offsets(jobs[j][1], text, run.usage[jobs[j][0]]):
                        candidates[j].setdefault((start, end), Candidate(start, end, label=label))
        if self.lar is not None:
            if "extract" in self.lar.proposers:
                requests = [self.request(chunk, d, extract=True) for (_, chunk), d in zip(jobs, demos)]
                for j, text in enumerate(self._generate(jobs, requests, run)):
                    if text is not None:
                        for start, end, _ in self.parse_offsets(jobs[j][1], text, run.usage[jobs[j][0]], True):
                            candidates[j].setdefault((start, end), Candidate(start, end))
            if source is not None:
                for j, (i, chunk) in enumerate(jobs):
                    for start, end, label in source[i]:
                        if chunk.start_char <= start and end <= chunk.end_char:
                            c = candidates[j].setdefault((start - chunk.start_char, end - chunk.start_char),
                                                         Candidate(start - chunk.start_char, end - chunk.start_char))
                            c.source_label = label
            if self.lar.needs_typing:
                self._type(jobs, shown, demos, candidates, run)
            if self.lar.verify:
                self._verify(jobs, shown, demos, candidates, run)
        per_doc: List[List[Span]] = [[] for _ in docs]
        stage_scores: List[Dict[Tuple[int, int, str], Tuple[Optional[float], Optional[float]]]] = [{} for _ in docs]
        for (i, chunk), cands in zip(jobs, candidates):
            for c in cands.values():
                if c.label is None:
                    continue
                span = chunk.doc.char_span(chunk.start_char + c.start, chunk.start_char + c.end, label=c.label,
                                           alignment_mode=self.alignment_mode)
                if span is not None and len(span):
                    per_doc[i].append(span)
                    if self.lar is not None:
                        stage_scores[i][(span.start, span.end, span.label_)] = (c.score, c.p_yes)
        for i, doc in enumerate(docs):
            self.set_annotations(doc, per_doc[i])
            if self.lar is not None:  # what the LAR stages measured, per span of doc.spans[spans_key]
                group = doc.spans[self.spans_key]
                got = [stage_scores[i].get((s.start, s.end, s.label_), (None, None)) for s in group]
                group.attrs["typing_margin"] = [m for m, _ in got]
                group.attrs["p_yes"] = [p for _, p in got]
            doc._.llm_ner_usage = {**(doc._.llm_ner_usage or {}), self.name: run.usage[i].to_dict()}
            if run.error is not None:
                doc.user_data.setdefault("llm_ner_errors", []).append(f"{self.name}: {run.error}")
            if self.save_io:
                doc._.llm_ner_io = {**(doc._.llm_ner_io or {}), self.name: run.io[i]}
            self.usage.add(run.usage[i])
        return docs

    def _uses(self, proposer: str) -> bool:
        return self.lar is not None and proposer in self.lar.proposers

    def _call(self, fn, requests, run: "_Run"):
        """One backend call; a BackendError is raised with context, or (on_error="skip") remembered."""
        if run.error is not None or not requests:
            return None
        try:
            return fn(requests)
        except BackendError as e:
            if self.on_error == "raise":
                raise BackendError(
                    f"{self.name}: the backend failed on a batch of {len(run.usage)} doc(s) "
                    f"(earlier batches were returned; answers so far are in the cache if one is set): {e}"
                ) from e
            run.error = e
            return None

    def _generate(self, jobs, requests: List[GenerationRequest], run: "_Run") -> List[Optional[str]]:
        answers = self._call(self.backend.generate, requests, run)
        if answers is None:
            for i, _ in jobs:
                run.usage[i].errors += 1
            return [None] * len(jobs)
        for (i, _), req, answer in zip(jobs, requests, answers):
            u = run.usage[i]
            u.calls += 0 if answer.cached else 1
            u.cached_calls += 1 if answer.cached else 0
            u.prompt_tokens += answer.prompt_tokens
            u.completion_tokens += answer.completion_tokens
            u.seconds += answer.seconds
            u.grammar_ignored += answer.grammar_ignored
            if self.save_io:
                run.io[i].append({"prompt": req.prompt, "response": answer.text})
        return [a.text for a in answers]

    def _choose(self, owners: List[int], requests: List[ScoreRequest], run: "_Run") -> Optional[List[List[float]]]:
        got = self._call(lambda reqs: choose(self.backend, reqs), requests, run)
        if got is None:
            return None
        scores, tokens, calls = got
        for i in set(owners):  # shared evenly between the docs that asked
            share = owners.count(i) / len(owners)
            run.usage[i].calls += round(calls * share)
            run.usage[i].prompt_tokens += round(tokens * share)
        return scores

    def _type(self, jobs, shown, demos, candidates, run: "_Run") -> None:
        names = self.label_set.prompt_names
        by_name = {n: lab for lab, n in names.items()}
        typing_prompts = self._typing_prompts()
        everything = typing_options(self.label_set.names())
        todo, requests, owners, priors = [], [], [], {}
        for j, cands in enumerate(candidates):
            prompt = None
            for c in cands.values():
                if c.label is not None and not self.lar.retype:
                    continue
                if c.source_label is not None and self.alignment is not None:
                    options = [t for t, _ in self.alignment.candidates(c.source_label, self.lar.top_k)]
                else:
                    options = list(self.label_set.labels)
                if c.label is not None and c.label not in options:
                    options.append(c.label)
                if prompt is None:
                    prompt = typing_prompts.build(shown[j], demos[j])
                    if self.lar.calibrate and self.lar.typer != "knn":  # the label prior in this context: a content-free span
                        priors[j] = len(requests)
                        requests.append(ScoreRequest(typing_context(prompt, CONTENT_FREE), everything))
                        owners.append(jobs[j][0])
                todo.append((j, c, options, len(requests)))
                requests.append(ScoreRequest(typing_context(prompt, shown[j][c.start:c.end]),
                                             typing_options([names[o] for o in options])))
                owners.append(jobs[j][0])
        typer = self.lar.typer
        if typer != "llm" and self.span_memory is None:
            raise ValueError(f"{self.name}: typer={typer!r} needs the span memory learned by initialize()")
        if typer == "knn":
            scores = [[0.0] * len(r.options) for r in requests]
        else:
            scores = self._choose(owners, requests, run)
        if scores is None:
            return
        knn = []
        if typer != "llm":
            texts = [shown[j][c.start:c.end] for j, c, _, _ in todo]
            knn = self.span_memory.distributions(texts, self._encoder())
        for n, (j, c, options, at) in enumerate(todo):
            sc = scores[at]
            if j in priors and typer != "knn":
                prior = dict(zip(everything, scores[priors[j]]))
                sc = [x - prior[o] for x, o in zip(sc, typing_options([names[o] for o in options]))]
            if knn:
                weight = 1.0 if typer == "knn" else self.lar.knn_weight
                # the option order (alignment rank) breaks ties when no neighbour votes for any option
                sc = [x + weight * math.log(knn[n].get(o, 0.0) + 1e-3) - 1e-6 * i
                      for i, (x, o) in enumerate(zip(sc, options))]
            k, margin = best(sc)
            chosen = by_name[names[options[k]]]
            if c.source_label is not None and margin < self.lar.keep_margin and self.alignment is not None:
                chosen = self.alignment.candidates(c.source_label, 1)[0][0]
            c.label, c.score = chosen, margin

    def _verify(self, jobs, shown, demos, candidates, run: "_Run") -> None:
        self._p_yes(jobs, shown, demos, candidates, run)
        for cands in candidates:
            for c in cands.values():
                if c.p_yes is not None and c.p_yes < self.lar.verify_threshold:
                    c.label = None

    def _p_yes(self, jobs, shown, demos, candidates, run: "_Run") -> None:
        """Sets each typed candidate's calibrated P(yes) for "Is <span> a <label>?"."""
        stages = self.lar or LARStages()  # the verification defaults when the component runs one pass
        names = self.label_set.prompt_names
        todo, requests, owners = [], [], []
        for j, cands in enumerate(candidates):
            examples = verification_examples(demos[j], names, stages.verify_demos, stages.seed)
            priors: Dict[str, int] = {}
            for c in cands.values():
                if c.label is None:
                    continue
                name = names[c.label]
                if stages.calibrate and name not in priors:  # how readily it says yes to a content-free span
                    priors[name] = len(requests)
                    requests.append(ScoreRequest(verification_context(examples, shown[j], CONTENT_FREE, name),
                                                 VERIFY_OPTIONS))
                    owners.append(jobs[j][0])
                todo.append((c, len(requests), priors.get(name)))
                requests.append(ScoreRequest(
                    verification_context(examples, shown[j], shown[j][c.start:c.end], name), VERIFY_OPTIONS))
                owners.append(jobs[j][0])
        scores = self._choose(owners, requests, run)
        if scores is None:
            return
        for c, at, prior in todo:
            c.p_yes = p_yes(scores[at], scores[prior] if prior is not None else None)

    def validate(self, docs: Sequence[Doc], spans: Sequence[Sequence[Span]]
                 ) -> Tuple[List[List[Optional[float]]], List[Usage]]:
        """Self-validation for callers such as the ensemble: the calibrated P(yes) of each given (labelled) span,
        asked with this component's verification prompt, backend and demonstrations, and what it cost per doc.
        None where the backend failed (``on_error="skip"``) or the span crosses a chunk boundary."""
        jobs: List[Tuple[int, Span]] = []
        candidates: List[Dict[Tuple[int, int], Candidate]] = []
        where: List[List[Optional[Candidate]]] = []
        for i, (doc, doc_spans) in enumerate(zip(docs, spans)):
            first = len(jobs)
            for start, end in self.chunks(doc):
                jobs.append((i, doc[start:end]))
                candidates.append({})
            placed: List[Optional[Candidate]] = []
            for span in doc_spans:
                c = None
                for j in range(first, len(jobs)):
                    chunk = jobs[j][1]
                    if chunk.start <= span.start and span.end <= chunk.end:
                        key = (span.start_char - chunk.start_char, span.end_char - chunk.start_char)
                        c = Candidate(*key, label=span.label_)
                        candidates[j][(key[0], key[1], span.label_)] = c
                        break
                placed.append(c)
            where.append(placed)
        shown = [display(chunk.text).rstrip() for _, chunk in jobs]
        run = _Run(list(docs))
        self._p_yes(jobs, shown, self.demonstrations_for(shown), candidates, run)
        for u in run.usage:
            self.usage.add(u)
        return [[None if c is None else c.p_yes for c in placed] for placed in where], run.usage

    def _typing_prompts(self) -> PromptBuilder:
        if self.format.name == "lines":
            return self.prompts
        return PromptBuilder(self.label_set, LinesFormat(), self.prompts.instructions)

    def parse_offsets(self, chunk: Span, answer: str, usage: Usage, extract: bool = False):
        """(start, end, label) in the chunk's characters for each verified mention; label None when extracting."""
        parsed = self.format.parse(answer)
        usage.malformed += parsed.malformed
        located = locate(parsed.mentions, display(chunk.text).rstrip(), parsed.plain_text)
        usage.hallucinated += len(located.hallucinated)
        out = []
        for start, end, answer_label in located.spans:
            label = None if extract else self.label_set.resolve(answer_label)
            if label is None and not extract:
                usage.unknown_labels += 1
                continue
            out.append((start, end, label))
        return out

    def set_annotations(self, doc: Doc, spans: List[Span]) -> None:
        unique = sorted({(s.start, s.end, s.label_): s for s in spans}.values(), key=lambda s: (s.start, -s.end))
        doc.spans[self.spans_key] = unique
        doc.ents = filter_spans(unique)

    # ---- scoring and serialization --------------------------------------------------------------------------
    def score(self, examples: Iterable[Example], **kwargs) -> Dict[str, Any]:
        if self.scorer is None:
            raise ValueError(f"{self.name}: no scorer configured")
        return self.scorer(examples, **kwargs)

    def _state(self) -> Dict[str, Any]:
        memory = self.span_memory
        return {"labels": list(self.label_set.labels),
                "demonstrations": [d.to_dict() for d in self.demonstrations],
                "alignment": self.alignment.to_dict() if self.alignment is not None else None,
                "span_memory": None if memory is None else {
                    "labels": memory.labels, "shape": list(memory.vectors.shape),
                    "vectors": memory.vectors.astype("<f2").tobytes()}}

    def _load_state(self, state: Dict[str, Any]) -> None:
        if state.get("labels") and list(state["labels"]) != list(self.label_set.labels):
            self._set_labels(state["labels"])  # learned in initialize() (e.g. from the pool): not in the config
        self._demonstrations = [Demonstration.from_dict(d) for d in state.get("demonstrations", [])]
        if state.get("alignment") is not None:
            self.alignment = LabelAlignment.from_dict(state["alignment"])
        if state.get("span_memory") is not None:
            import numpy as np

            m = state["span_memory"]
            vectors = m["vectors"] if isinstance(m["vectors"], np.ndarray) else np.frombuffer(m["vectors"], "<f2")
            self.span_memory = SpanMemory(vectors.reshape(m["shape"]), m["labels"])
        if state.get("pool") is not None and self.retriever is not None:
            from .retrieval import Pool

            self.retriever.pool = Pool.from_bytes(state["pool"])

    def to_bytes(self, *, exclude=tuple()) -> bytes:
        pool = getattr(self.retriever, "pool", None)
        return srsly.msgpack_dumps({**self._state(), "pool": pool.to_bytes() if pool is not None else None})

    def from_bytes(self, bytes_data: bytes, *, exclude=tuple()) -> "LLMNER":
        self._load_state(srsly.msgpack_loads(bytes_data))
        return self

    def to_disk(self, path, *, exclude=tuple()) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        written = ["labels.json", "demonstrations.jsonl"]
        srsly.write_jsonl(path / "demonstrations.jsonl", [d.to_dict() for d in self.demonstrations])
        srsly.write_json(path / "labels.json", list(self.label_set.labels))
        if self.alignment is not None:
            srsly.write_json(path / "alignment.json", self.alignment.to_dict())
            written.append("alignment.json")
        if self.span_memory is not None:
            import numpy as np

            np.save(path / "span_memory.npy", self.span_memory.vectors, allow_pickle=False)
            srsly.write_json(path / "span_memory.json", self.span_memory.labels)
            written += ["span_memory.npy", "span_memory.json"]
        if self.retriever is not None and self.retriever.pool is not None:
            self.retriever.to_disk(path / "pool")
            written += POOL_FILES
        srsly.write_json(path / FILES, written)  # what from_disk must find

    @staticmethod
    def required_files(path: Path) -> List[str]:
        """The files a saved copy of this component must hold: those ``to_disk`` listed in ``files.json``. Copies
        saved before that file existed need their demonstrations (without them a pool-less component would run
        silently without examples; a missing pool or span memory raises when first needed)."""
        return srsly.read_json(path / FILES) if (path / FILES).exists() else ["demonstrations.jsonl"]

    def from_disk(self, path, *, exclude=tuple()) -> "LLMNER":
        path = Path(path)
        missing = [name for name in self.required_files(path) if not (path / name).exists()]
        if missing:
            raise ValueError(
                f"{self.name}: the saved component at {path} is missing {', '.join(missing)}; the pipeline was not "
                "loaded (it would run without what it was saved with). Save it again with nlp.to_disk, or restore "
                "the file(s)."
            )
        demos = list(srsly.read_jsonl(path / "demonstrations.jsonl"))
        if not demos and self.retriever is None and not self.zero_shot:
            raise ValueError(
                f"{self.name}: {path / 'demonstrations.jsonl'} holds no demonstrations and no retriever is "
                "configured. A component meant to run without demonstrations says so: set zero_shot = true in "
                f"[components.{self.name}]; otherwise give it demonstrations and save it again."
            )
        span_memory = None
        if (path / "span_memory.npy").exists():
            import numpy as np

            vectors = np.load(path / "span_memory.npy", allow_pickle=False)
            span_memory = {"vectors": vectors, "shape": list(vectors.shape),
                           "labels": srsly.read_json(path / "span_memory.json")}
        labels, alignment = path / "labels.json", path / "alignment.json"
        self._load_state({"labels": srsly.read_json(labels) if labels.exists() else None,
                          "demonstrations": demos,
                          "alignment": srsly.read_json(alignment) if alignment.exists() else None,
                          "span_memory": span_memory})
        if self.retriever is not None:
            self.retriever.from_disk(path / "pool")
        return self


class _Run:
    """What one batch of docs accumulates across stages."""

    def __init__(self, docs: List[Doc]):
        self.usage = [Usage(docs=1) for _ in docs]
        self.io: List[List[Dict[str, str]]] = [[] for _ in docs]
        self.error: Optional[BaseException] = None
