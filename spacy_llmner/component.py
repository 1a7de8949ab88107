"""The ``llm_lar_ner`` component: doc → chunks → prompts → backend → answers → spans.

Each step lives in its own module: ``chunking`` (what is sent at once), ``demonstrations`` (what each prompt
shows, within a token budget), ``prompt`` (the prompt builder), ``session`` (backend calls, error policy, usage),
``formats`` (answers → character offsets), ``lar`` (proposers, typing, verification). All predicted spans (nested
too) go to ``doc.spans[spans_key]``; the longest non-overlapping ones to ``doc.ents``.
"""

import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

from confection import ConfigValidationError
from spacy import util
from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.tokens import Doc, Span
from spacy.training import Example
from spacy.util import filter_spans, minibatch

from . import (
    backends,  # noqa: F401  (registers the backends; creates llm_models)
    saving,
)
from .chunking import Chunk, chunk_ranges, doc_spans, split
from .demonstrations import Demonstrations, Source, load_demonstrations
from .formats import answer_spans
from .labels import LabelSet
from .labels.alignment import LabelAlignment
from .lar import Candidate, LARStages, SpanMemory
from .lar.stages import (
    Typing,
    align_by_embeddings,
    drop_unverified,
    learn_alignment,
    pin,
    place_spans,
    source_candidates,
    type_candidates,
    verification_scores,
)
from .pool_fit import Lexicon, PoolFit, PoolFitSettings, fit_thresholds, kept, merge, micro_prf
from .prompt import DEFAULT_INSTRUCTIONS, Demonstration, PromptBuilder, display, shown_tokens
from .reading import FileReadError
from .retrieval import Retriever
from .session import Run
from .ty import Backend, GenerationRequest, OutputFormat
from .upstream import run_upstream
from .usage import Usage

if not Doc.has_extension("llm_ner_usage"):
    Doc.set_extension("llm_ner_usage", default=None)  # {component name: Usage dict}
if not Doc.has_extension("llm_ner_io"):
    Doc.set_extension("llm_ner_io", default=None)  # {component name: [{"prompt", "response"}]} with save_io

__all__ = ["LLMNER", "load_demonstrations", "make_llm_lar_ner"]
LONG_TOKEN = 100  # characters: a longer token is not a word (see LLMNER._warn_long_tokens)


def script_language(text: str) -> str:
    """The spaCy language whose tokenizer splits ``text``'s script (written without spaces between words), where
    most of it is in one: Japanese where there is kana, Chinese for Han alone, Thai; else ``"<lang>"``."""
    kana = sum("\u3040" <= ch <= "\u30ff" for ch in text)
    han = sum("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)
    thai = sum("\u0e00" <= ch <= "\u0e7f" for ch in text)
    lang, n = max([("ja" if kana else "zh", kana + han), ("th", thai)], key=lambda x: x[1])
    return lang if n >= len(text) / 3 else "<lang>"


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
    "constrained": None,
    "spans_key": "llm_ner",
    "alignment_mode": "expand",
    "max_chunk_tokens": 200,
    "max_chunk_sentences": 1,
    "max_new_tokens": None,
    "cache_path": None,
    "save_io": False,
    "on_error": "raise",
    "threshold": 0.0,
    "calibrate": True,
    "show_progress": False,
    "scorer": {"@scorers": "spacy.ner_scorer.v1"},
    "lar": None,
    "pool_fit": None,
}


@Language.factory("llm_lar_ner", default_config=DEFAULT_CONFIG)
def make_llm_lar_ner(
    nlp: Language,
    name: str,
    labels: List[str],
    label_definitions: Dict[str, str],
    label_synonyms: Dict[str, str],
    format: OutputFormat,
    backend: Backend,
    demonstrations: Optional[str],
    zero_shot: bool,
    retriever: Optional[Retriever],
    max_demo_tokens: Optional[int],
    instructions: str,
    constrained: Optional[bool],
    spans_key: str,
    alignment_mode: Literal["strict", "contract", "expand"],
    max_chunk_tokens: int,
    max_chunk_sentences: Optional[int],
    max_new_tokens: Optional[int],
    cache_path: Optional[str],
    save_io: bool,
    on_error: Literal["raise", "skip"],
    threshold: float,
    calibrate: bool,
    show_progress: bool,
    scorer: Optional[Callable],
    lar: Optional[LARStages],
    pool_fit: Optional[PoolFitSettings],
) -> "LLMNER":
    """LLM named-entity recognition: one pass (prompt → constrained answer → spans) or the LAR stages.

    labels (List[str]): the target labels; empty: taken from ``initialize()`` (its labels, examples or pool).
    label_definitions (Dict[str, str]): a short definition per label, shown in the prompt.
    label_synonyms (Dict[str, str]): answer label → target label, for answers that name a label another way.
    format (OutputFormat): how answers are written and parsed (``spacy_llmner.LinesFormat.v1``, ...).
    backend (Backend): the model (``spacy_llmner.LlamaCpp.v1``, ``spacy_llmner.OpenAICompat.v1``, ...).
    demonstrations (Optional[str]): a file of few-shot examples (jsonl, .spacy, BIO) read on first use; or null,
        with the demonstrations given by ``initialize()`` / ``set_demonstrations()``. Either way they are saved
        with the pipeline, and a saved pipeline whose demonstrations are missing does not load.
    zero_shot (bool): true declares that the component runs without demonstrations (a saved pipeline needs
        none); false expects demonstrations, from the file or from a retriever's pool.
    retriever (Optional[Retriever]): picks demonstrations per query from a pool (``spacy_llmner.Retriever.v1``);
        the pool is built by ``initialize()``.
    max_demo_tokens (Optional[int]): token budget of a prompt's demonstrations; the least similar are dropped.
    instructions (str): the first line of every prompt.
    constrained (Optional[bool]): decode under the format's grammar: null (the default) where the backend applies
        grammars; true requires it (a backend that cannot, such as an OpenAI-compatible server without a
        ``grammar_field``, is refused here); false never.
    spans_key (str): the ``doc.spans`` group that receives every predicted span.
    alignment_mode (str): how answer offsets snap to tokens: "strict", "contract" or "expand".
    max_chunk_tokens (int): the most tokens sent at once (a longer sentence is cut there; no text is dropped).
    max_chunk_sentences (Optional[int]): the most sentences sent at once: 1 (the default) asks about each sentence
        of a document on its own (the pipeline's sentence boundaries, else spaCy's sentencizer), as the shipped
        adapter was tuned; the prompts are batched and share their prefix. Null packs as many as fit
        ``max_chunk_tokens`` (fewer, longer prompts: a model tuned on single sentences finds fewer entities).
    max_new_tokens (Optional[int]): the most tokens an answer may have; null (the default): what its chunk can
        need, 32 + 3 per word (``prompt.answer_budget``). Answers cut by the limit are counted
        (``usage["truncated"]``) and warned about once.
    cache_path (Optional[str]): an sqlite answer cache: reruns and interrupted runs resume from it.
    save_io (bool): keep every prompt and answer in ``doc._.llm_ner_io``.
    on_error (str): "raise" (through the error handler, ``nlp.set_error_handler``) or "skip" (the batch's docs
        come back without entities, the error noted in ``doc.user_data["llm_ner_errors"]``).
    threshold (float): drop generated spans whose confidence is below it (0 keeps all; raise it for precision).
        A span's confidence, in ``doc.spans[spans_key].attrs["scores"]``, is the geometric-mean probability of
        the answer tokens that stated it (its line in the lines format, the whole answer in the others),
        calibrated (see ``calibrate``); spans without one (a backend without log-probabilities, LAR source
        spans) are kept.
    calibrate (bool): map raw confidences through the backend's calibration (``Backend.calibration``: the
        precision spans of that confidence had on held-out data; the shipped adapters carry one) before
        ``threshold``; false, or a backend without one, keeps the raw probabilities.
    show_progress (bool): a progress bar per ``pipe``.
    scorer (Optional[Callable]): scores ``nlp.evaluate`` (spaCy's NER scorer by default).
    lar (Optional[LARStages]): the LAR / EL4NER stages (``spacy_llmner.LAR.v1``); null: one pass.
    pool_fit (Optional[PoolFitSettings]): what ``initialize()`` learns from the retriever's pool beyond
        demonstrations (``spacy_llmner.PoolFit.v1``, see ``spacy_llmner.pool_fit``): the pool's entity texts as a
        lexicon, and a threshold per label fitted by annotating the pool itself (each doc without itself as a
        demonstration). It costs one annotation of up to ``sample`` pool docs; null: neither.
    """
    # registered objects are not checked against protocols by config validation: the same error, raised here
    wrong = [
        (field, kind)
        for field, value, kind in (("backend", backend, Backend), ("format", format, OutputFormat))
        if not isinstance(value, kind)
    ]
    if wrong:
        raise ConfigValidationError(
            title=f"Config validation error: [components.{name}]",
            show_config=False,
            errors=[
                {"loc": [field], "msg": f"not a {kind.__name__}: lacks a member of spacy_llmner.ty.{kind.__name__}"}
                for field, kind in wrong
            ],
        )
    return LLMNER(
        nlp.vocab,
        name,
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
        max_chunk_sentences=max_chunk_sentences,
        max_new_tokens=max_new_tokens,
        cache_path=cache_path,
        save_io=save_io,
        on_error=on_error,
        threshold=threshold,
        calibrate=calibrate,
        show_progress=show_progress,
        scorer=scorer,
        lar=lar,
        pool_fit=pool_fit,
    )


class LLMNER(Pipe):
    def __init__(
        self,
        vocab,
        name: str = "llm_lar_ner",
        *,
        labels: LabelSet,
        fmt: OutputFormat,
        backend: Backend,
        demonstrations: Optional[str] = None,
        zero_shot: bool = False,
        retriever: Optional[Retriever] = None,
        max_demo_tokens: Optional[int] = None,
        instructions: str = DEFAULT_INSTRUCTIONS,
        constrained: Optional[bool] = None,
        spans_key: str = "llm_ner",
        alignment_mode: str = "expand",
        max_chunk_tokens: int = 200,
        max_chunk_sentences: Optional[int] = 1,
        max_new_tokens: Optional[int] = None,
        cache_path: Optional[str] = None,
        save_io: bool = False,
        on_error: str = "raise",
        threshold: float = 0.0,
        calibrate: bool = True,
        show_progress: bool = False,
        scorer: Optional[Callable] = None,
        lar: Optional[LARStages] = None,
        pool_fit: Optional[PoolFitSettings] = None,
    ):
        if max_chunk_tokens < 1:
            raise ValueError(f"{name}: max_chunk_tokens must be positive")
        if max_chunk_sentences is not None and max_chunk_sentences < 1:
            raise ValueError(f"{name}: max_chunk_sentences must be positive, or null to pack as many as fit")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"{name}: max_new_tokens must be positive, or null for what each chunk can need")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{name}: threshold is a confidence in [0, 1], not {threshold}")
        self.vocab, self.name = vocab, name
        self.label_set, self.format = labels, fmt
        self.prompts = PromptBuilder(labels, fmt, instructions)
        if cache_path:
            from .backends.cache import CachedBackend

            backend = CachedBackend(backend, cache_path, owner=name)
        self.backend = backend
        if constrained and not self.backend.supports_grammar:
            raise ValueError(
                f"{name}: constrained = true, but the backend ({type(self.backend).__name__}) applies no grammar "
                '(an OpenAI-compatible server: set its grammar_field to "llama.cpp" or "vllm"). Set constrained '
                "= null to decode under the grammar where the backend can, or false."
            )
        self.constrained = self.backend.supports_grammar if constrained is None else constrained
        if pool_fit is not None and retriever is None:
            raise ValueError(
                f"{name}: pool_fit learns from the retriever's pool, and no retriever is configured. Configure "
                f"one ([components.{name}.retriever], spacy_llmner.Retriever.v1) or set pool_fit = null."
            )
        self.demos = Demonstrations(demonstrations, retriever, max_demo_tokens, vocab, spans_key, owner=name)
        self.zero_shot, self._warned_no_demos = zero_shot, False
        self._warned_truncated = self._warned_tokens = False
        self.spans_key, self.alignment_mode = spans_key, alignment_mode
        self.max_chunk_tokens, self.max_new_tokens = max_chunk_tokens, max_new_tokens
        self.max_chunk_sentences = max_chunk_sentences
        self.save_io, self.on_error, self.show_progress, self.scorer = save_io, on_error, show_progress, scorer
        self.threshold, self.calibrate = threshold, calibrate
        self.usage = Usage()  # this run's totals; reset with reset_usage()
        self.lar = lar  # None: one pass
        self.alignment: Optional[LabelAlignment] = None  # learned in initialize() or set
        self.span_memory: Optional[SpanMemory] = None  # gold spans of the alignment corpus, for kNN typing
        self.pool_fit_settings = pool_fit
        self.pool_fit: Optional[PoolFit] = None  # fitted in initialize() (fit_to_pool) or loaded
        self._own_encoder = None

    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(
                f"{self.name}: {type(backend).__name__} is not a backend (it lacks a member of the Backend "
                "protocol); subclass spacy_llmner.backends.base.BackendBase"
            )
        self._backend = backend

    @property
    def remote(self) -> bool:
        return self.backend.remote

    @property
    def retriever(self) -> Optional[Retriever]:
        return self.demos.retriever

    # ---- labels and demonstrations ----------------------------------------------------------------------------
    @property
    def labels(self) -> Tuple[str, ...]:
        return tuple(self.label_set.labels)

    def add_label(self, label: str) -> int:
        if label in self.label_set.labels:
            return 0
        self.set_labels(self.label_set.labels + [label])
        return 1

    def set_labels(self, labels: Sequence[str]) -> None:
        """Replaces the label set (definitions and synonyms of kept labels stay); forgets a learned alignment and
        what was fitted to the pool."""
        self.label_set = self.label_set.restricted(labels)
        self.prompts = PromptBuilder(self.label_set, self.format, self.prompts.instructions)
        self.alignment = self.pool_fit = None

    @property
    def demonstrations(self) -> List[Demonstration]:
        return self.demos.static

    def set_demonstrations(self, source: Source) -> None:
        self.demos.set(source)

    def build_pool(self, source: Source) -> None:
        if self.retriever is None:
            raise ValueError(f"{self.name}: no retriever configured, so there is no pool to build")
        self.retriever.build(self.demos.load(source))

    def demonstrations_for(self, texts: Sequence[str]) -> List[List[Demonstration]]:
        """The demonstrations each query sees, in prompt order, within ``max_demo_tokens`` if set."""
        return self.demos.for_texts(texts, lambda d: self.backend.count_tokens(self.prompts.render_demonstration(d)))

    def initialize(
        self, get_examples=None, *, nlp=None, demonstrations=None, labels=None, pool=None, alignment_corpus=None
    ) -> None:
        """Labels from ``labels`` or, when none are configured, from the gold entities of ``get_examples``;
        demonstrations from a path or a list; with a retriever, its pool from ``pool`` (path or list) or else
        the gold docs of ``get_examples`` (the training corpus under ``spacy train`` / ``spacy assemble``).
        With a ``source`` proposer, the label alignment is learned on ``alignment_corpus`` (else those gold docs)
        by running the pipeline's earlier components on it. All are saved with the pipeline."""
        gold_docs = (lambda: [eg.reference for eg in get_examples()]) if get_examples is not None else None
        if labels:
            self.set_labels(labels)
        elif not self.label_set.labels and gold_docs is not None:
            self.set_labels(sorted({e.label_ for doc in gold_docs() for e in doc.ents}))
        if demonstrations is not None:
            self.set_demonstrations(demonstrations)
        if self.retriever is not None and (pool is not None or gold_docs is not None):
            self.build_pool(pool if pool is not None else gold_docs())
        if not self.label_set.labels:  # none configured or in the examples: the labels the demonstrations show
            found = sorted({lab for demo in self.demos.shown() for _, _, lab in demo.spans})
            if found:
                self.set_labels(found)
        if self.uses("source"):
            corpus = alignment_corpus if alignment_corpus is not None else gold_docs() if gold_docs else None
            gold = load_demonstrations(corpus, self.vocab) if corpus is not None else None  # docs: their ents
            if gold and nlp is not None:
                self.learn_alignment(nlp, gold)
            elif self.lar.alignment:
                self.alignment = pin(self.lar, align_by_embeddings(self._typing(), sorted(self.lar.alignment)))
        if self.pool_fit_settings is not None and self.retriever.pool is not None and len(self.retriever.pool):
            self.fit_to_pool(self.retriever.pool.demonstrations, nlp)

    def fit_to_pool(self, pool: Sequence[Demonstration], nlp: Optional[Language] = None) -> PoolFit:
        """Learns ``pool_fit`` (its settings, or the defaults of ``spacy_llmner.PoolFit.v1``) from labelled pool
        docs: the lexicon from all of them; the thresholds by annotating a seeded sample of them as the pipeline
        would, each doc without its own text among its demonstrations and with the lexicon of the other docs,
        scored against their labels. ``nlp`` tokenizes them (default: a blank pipeline of this vocab's
        language). Returns what was fitted, also ``self.pool_fit``; its ``report`` holds the pool figures and the
        fit's seconds."""
        if self.retriever is None or self.retriever.pool is None:
            raise ValueError(f"{self.name}: fit_to_pool annotates the pool with retrieval; build the pool first")
        settings = self.pool_fit_settings or PoolFitSettings()
        started = time.perf_counter()
        pairs = [(d.text, tuple(d.spans)) for d in pool]
        lexicon = Lexicon.build(pairs, settings.min_count, settings.min_rate) if settings.lexicon else None
        picked = sorted(random.Random(settings.seed).sample(range(len(pairs)), min(settings.sample, len(pairs))))
        make_doc = nlp.make_doc if nlp is not None else util.get_lang_class(self.vocab.lang)(self.vocab).make_doc
        docs = [make_doc(pairs[i][0]) for i in picked]
        self.pool_fit, exclude = None, self.retriever.exclude_identical
        self.retriever.exclude_identical = True  # a doc shown its own labels would copy them
        try:
            found, run = self._candidates(docs)
        finally:
            self.retriever.exclude_identical = exclude
        for i, doc in enumerate(docs):
            self.usage.add(run.report(doc, i))
        generated, merged = [], []
        for i, spans in zip(picked, found):
            by_offsets = {
                (s.start_char, s.end_char): Candidate(s.start_char, s.end_char, s.label_, confidence=c.confidence)
                for s, c in spans
            }
            generated.append([(s, e, c.label, c.confidence, False) for (s, e), c in by_offsets.items()])
            if lexicon is not None:
                merge(by_offsets, self._lexicon_matches(lexicon, pairs[i][0], leave_out=pairs[i]))
            merged.append([(s, e, c.label, c.confidence, c.from_lexicon) for (s, e), c in by_offsets.items()])
        gold = [pairs[i][1] for i in picked]
        thresholds = fit_thresholds(merged, gold, self.labels) if settings.thresholds else {}
        report = {"docs": len(docs), "lexicon_entries": len(lexicon) if lexicon is not None else 0}
        for key, spans, fitted in (
            ("generated", generated, {}),
            ("lexicon", merged, {}),
            ("fitted", merged, thresholds),
        ):
            p, r, f = micro_prf(spans, gold, fitted, self.threshold)
            report.update({f"{key}_p": p, f"{key}_r": r, f"{key}_f": f})
        report["seconds"] = time.perf_counter() - started
        rounded = {k: round(v, 6) for k, v in thresholds.items()}  # as saved (JSON keeps 10 digits)
        self.pool_fit = PoolFit(rounded, lexicon, {k: round(v, 6) for k, v in report.items()})
        return self.pool_fit

    def learn_alignment(self, nlp: Language, gold: Sequence[Demonstration]) -> LabelAlignment:
        """Source → target alignment from the source's predictions on gold target data (the earlier components
        run on it), and the gold spans' memory for kNN typing."""
        docs = run_upstream(nlp, self.name, [nlp.make_doc(demo.text) for demo in gold])
        predicted = [self.lar.source_spans(doc) for doc in docs]
        self.alignment, self.span_memory = learn_alignment(self._typing(), gold, predicted)
        return self.alignment

    def encoder(self):
        """The retriever's MiniLM encoder, or one of its own: span memory and label embeddings."""
        if self.retriever is not None:
            return self.retriever.encoder
        if self._own_encoder is None:
            from .retrieval.encoder import MiniLMEncoder

            self._own_encoder = MiniLMEncoder()
        return self._own_encoder

    def _typing(self) -> Typing:
        return Typing(
            self.name,
            self.lar,
            self.label_set,
            self.prompts.for_typing(),
            self.alignment,
            self.span_memory,
            self.encoder,
        )

    def uses(self, proposer: str) -> bool:
        return self.lar is not None and proposer in self.lar.proposers

    # ---- running ------------------------------------------------------------------------------------------------
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
            warnings.warn(
                f"{self.name}: no demonstrations: a small model answers poorly without them. Give some "
                "(set_demonstrations, initialize(demonstrations=...), a retriever) or declare "
                "zero_shot = true.",
                stacklevel=2,
            )
        if self.show_progress:
            from tqdm import tqdm

            stream = tqdm(stream, desc=self.name, unit="doc")
        for batch in minibatch(stream, size=batch_size):
            yield from self._process(list(batch))

    def reset_usage(self) -> Usage:
        old, self.usage = self.usage, Usage()
        return old

    def chunks(self, doc: Doc) -> List[Tuple[int, int]]:
        return chunk_ranges(doc, self.max_chunk_tokens, self.max_chunk_sentences)

    def request(
        self, chunk: Span, demonstrations: Optional[Sequence[Demonstration]] = None, extract: bool = False
    ) -> GenerationRequest:
        """The one-pass request for a chunk; ``extract``: the same with every type shown as ``entity`` (spans only)."""
        shown = display(chunk.text).rstrip()  # what the prompt shows; offsets are the chunk's own
        start = chunk.start_char
        offsets = [(t.idx - start, t.idx - start + len(t)) for t in chunk] if self.constrained else []
        offsets = shown_tokens(shown, offsets)
        demos = self.demonstrations_for([shown])[0] if demonstrations is None else demonstrations
        prompts = self.prompts.for_extraction() if extract else self.prompts
        return prompts.request(
            shown, offsets, demos, n_tokens=len(chunk), max_new_tokens=self.max_new_tokens, constrained=self.constrained
        )

    def _run(self, docs: Sequence[Doc]) -> Run:
        return Run(
            self.name,
            self.backend,
            len(docs),
            on_error=self.on_error,
            component=self,
            docs=docs,
            error_handler=self.get_error_handler(),
            save_io=self.save_io,
        )

    def _warn_long_tokens(self, docs: Sequence[Doc]) -> None:
        """Once: a token longer than any word means the tokenizer is not the text's language's (a blank English
        pipeline makes one token of a Chinese sentence), and every entity would be snapped out to whole tokens."""
        if self._warned_tokens:
            return
        for doc in docs:
            long = next((t for t in doc if len(t) > LONG_TOKEN), None)
            if long is not None:
                self._warned_tokens = True
                lang = script_language(long.text)
                code = "" if lang != "<lang>" else " (<lang>: the code of the text's language)"
                warnings.warn(
                    f"{self.name}: a token of {len(long)} characters ({long.text[:24]!r}...) cannot be a word of "
                    f"this pipeline's language ({self.vocab.lang!r}): its tokenizer does not split this text into "
                    f"words, so entities come back as whole tokens. Make the docs with a tokenizer for the text's "
                    f'language, e.g. spacy.blank("{lang}"){code}.',
                    stacklevel=3,
                )
                return

    def _process(self, docs: List[Doc]) -> List[Doc]:
        found, run = self._candidates(docs)
        thresholds = self.pool_fit.thresholds if self.pool_fit is not None else {}
        for i, doc in enumerate(docs):
            found_i = [
                (span, c)
                for span, c in found[i]
                if kept(span.label_, c.confidence, c.from_lexicon, thresholds, self.threshold)
            ]
            self.set_annotations(doc, [span for span, _ in found_i])
            measured = {(s.start, s.end, s.label_): c for s, c in found_i}
            group = doc.spans[self.spans_key]
            # per span, as spaCy's spancat does: the confidence of the answer that stated it (None: not generated,
            # or a backend without log-probabilities; a lexicon span's: its rate in the pool)
            group.attrs["scores"] = [measured[(s.start, s.end, s.label_)].confidence for s in group]
            if self.lar is not None:  # what the LAR stages measured, per span of doc.spans[spans_key]
                group.attrs["typing_margin"] = [measured[(s.start, s.end, s.label_)].score for s in group]
                group.attrs["p_yes"] = [measured[(s.start, s.end, s.label_)].p_yes for s in group]
            self.usage.add(run.report(doc, i))
        self._warn_truncated(run)
        return docs

    def _candidates(self, docs: List[Doc]) -> Tuple[List[List[Tuple[Span, Candidate]]], Run]:
        """Every labelled candidate of each doc as a doc span, before thresholds, and the run that found them."""
        self._warn_long_tokens(docs)
        source = [self.lar.source_spans(doc) for doc in docs] if self.uses("source") else None  # before we write
        chunks = split(docs, self.max_chunk_tokens, self.max_chunk_sentences)
        demos = self.demonstrations_for([c.shown for c in chunks])
        run = self._run(docs)
        candidates: List[Dict[Tuple, Candidate]] = [{} for _ in chunks]
        if self.lar is None or "generate" in self.lar.proposers:
            self._propose(chunks, demos, candidates, run, extract=False)
        if self.lar is not None:
            if "extract" in self.lar.proposers:
                self._propose(chunks, demos, candidates, run, extract=True)
            if source is not None:
                source_candidates(chunks, source, candidates)
            if self.lar.needs_typing:
                type_candidates(self._typing(), chunks, demos, candidates, run)
            if self.lar.verify:
                verification_scores(self.lar, self.label_set.prompt_names, chunks, demos, candidates, run)
                drop_unverified(candidates, self.lar.verify_threshold)
        lexicon = self.pool_fit.lexicon if self.pool_fit is not None else None
        if lexicon is not None:
            for chunk, found in zip(chunks, candidates):
                merge(found, self._lexicon_matches(lexicon, chunk.shown))
        return [doc_spans(doc, chunks, candidates, i, self.alignment_mode) for i, doc in enumerate(docs)], run

    def _lexicon_matches(self, lexicon: Lexicon, text: str, leave_out=None) -> List[Tuple[int, int, str, float]]:
        """The lexicon's matches in ``text`` whose label is one of this component's (``Lexicon.matches``)."""
        labels = set(self.labels)
        return [m for m in lexicon.matches(text, leave_out=leave_out) if m[2] in labels]

    def _warn_truncated(self, run: Run) -> None:
        cut = sum(u.truncated for u in run.usage)
        if cut and not self._warned_truncated:
            self._warned_truncated = True
            limit = (
                f"max_new_tokens = {self.max_new_tokens}"
                if self.max_new_tokens is not None
                else "max_new_tokens (null: 32 + 3 per word of the chunk, reached by an answer that repeats itself)"
            )
            warnings.warn(
                f"{self.name}: {cut} answer(s) in this batch were cut at their token limit, {limit}; entities after "
                f"the cut are missing. Raise max_new_tokens in [components.{self.name}] (or lower "
                "max_chunk_tokens). Counted as usage['truncated'] (doc._.llm_ner_usage); warned once.",
                stacklevel=3,
            )

    def _propose(self, chunks: List[Chunk], demos, candidates, run: Run, extract: bool) -> None:
        requests = [self.request(c.span, d, extract=extract) for c, d in zip(chunks, demos)]
        try:
            calibration = self.backend.calibration if self.calibrate else None
        except FileReadError as e:
            raise e.for_owner(self.name) from e
        answers = run.generate([c.doc_index for c in chunks], requests)
        for chunk, shown_demos, found, answer in zip(chunks, demos, candidates, answers):
            if answer is not None:
                usage = run.usage[chunk.doc_index]
                spans = answer_spans(
                    self.format, answer.text, chunk.shown, self.label_set, usage, extract, answer.token_logprobs
                )
                mapping = calibration.for_demonstrations(len(shown_demos)) if calibration is not None else None
                for start, end, label, conf in spans:
                    conf = mapping(conf) if mapping is not None else conf
                    found.setdefault((start, end), Candidate(start, end, label=label, confidence=conf))

    def set_annotations(self, doc: Doc, spans: List[Span]) -> None:
        unique = sorted({(s.start, s.end, s.label_): s for s in spans}.values(), key=lambda s: (s.start, -s.end))
        doc.spans[self.spans_key] = unique
        doc.ents = filter_spans(unique)

    def validate(
        self, docs: Sequence[Doc], spans: Sequence[Sequence[Span]]
    ) -> Tuple[List[List[Optional[float]]], List[Usage]]:
        """Self-validation for callers such as the ensemble: the calibrated P(yes) of each given (labelled) span,
        asked with this component's verification prompt, backend and demonstrations, and what it cost per doc.
        None where the backend failed (``on_error="skip"``) or the span crosses a chunk boundary."""
        chunks = split(docs, self.max_chunk_tokens, self.max_chunk_sentences)
        candidates, placed = place_spans(chunks, spans)
        run = self._run(docs)
        demos = self.demonstrations_for([c.shown for c in chunks])
        verification_scores(self.lar or LARStages(), self.label_set.prompt_names, chunks, demos, candidates, run)
        for u in run.usage:
            self.usage.add(u)
        return [[None if c is None else c.p_yes for c in row] for row in placed], run.usage

    def score(self, examples: Iterable[Example], **kwargs) -> Dict[str, Any]:
        if self.scorer is None:
            raise ValueError(f"{self.name}: no scorer configured")
        return self.scorer(examples, **kwargs)

    # ---- serialization (``saving.py``): each stateful piece writes itself; files.json lists what must be there ----
    def to_bytes(self, *, exclude=tuple()) -> bytes:
        return util.to_bytes(saving.byte_writers(self), exclude)

    def from_bytes(self, bytes_data: bytes, *, exclude=tuple()) -> "LLMNER":
        util.from_bytes(bytes_data, saving.byte_readers(self), exclude)
        return self

    def to_disk(self, path: Union[str, Path], *, exclude=tuple()) -> None:
        util.to_disk(path, saving.disk_writers(self, exclude), exclude)

    def from_disk(self, path: Union[str, Path], *, exclude=tuple()) -> "LLMNER":
        saving.check_files(self.name, Path(path), exclude)
        util.from_disk(path, saving.disk_readers(self), exclude)
        saving.check_demonstrations(self, Path(path), exclude)
        return self
