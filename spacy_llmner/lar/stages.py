"""The LAR stages that follow the proposers: typing (each candidate's label as a constrained choice among the
aligned or all labels, calibrated against a content-free span, optionally mixed with the span memory's kNN vote)
and verification (the calibrated P(yes) of "Is <span> a <label>?"). Both ask their questions as one
``ChoiceBatch`` through the component's backend session; both change the candidates in place."""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..chunking import Chunk
from ..labels import LabelSet
from ..labels.alignment import LabelAlignment
from ..prompt import Demonstration, PromptBuilder
from ..session import Run
from ..ty import ScoreRequest
from .choice import ChoiceBatch, best, p_yes
from .config import Candidate, LARStages
from .memory import SpanMemory
from .prompts import (
    CONTENT_FREE,
    VERIFY_OPTIONS,
    typing_context,
    typing_options,
    verification_context,
    verification_examples,
)

Candidates = List[Dict[Tuple, Candidate]]  # per chunk


@dataclass
class Typing:
    """What typing needs besides the candidates: the component's name (for errors), its stages and labels, the
    typing prompt (lines format), the learned alignment and span memory, and the span encoder (loaded lazily)."""

    name: str
    stages: LARStages
    labels: LabelSet
    prompts: PromptBuilder
    alignment: Optional[LabelAlignment]
    memory: Optional[SpanMemory]
    encoder: Callable[[], Any]


def source_candidates(
    chunks: Sequence[Chunk], source: Sequence[Sequence[Tuple[int, int, str]]], candidates: Candidates
) -> None:
    """Adds each source span (doc character offsets, source label) to the chunk that holds it."""
    for j, chunk in enumerate(chunks):
        for start, end, label in source[chunk.doc_index]:
            if chunk.span.start_char <= start and end <= chunk.span.end_char:
                key = (start - chunk.span.start_char, end - chunk.span.start_char)
                candidates[j].setdefault(key, Candidate(*key)).source_label = label


def type_candidates(
    t: Typing, chunks: Sequence[Chunk], demos: Sequence[Sequence[Demonstration]], candidates: Candidates, run: Run
) -> None:
    st, names = t.stages, t.labels.prompt_names
    by_name = {n: lab for lab, n in names.items()}
    everything = typing_options(t.labels.names())
    batch, todo = ChoiceBatch(), []
    for j, cands in enumerate(candidates):
        owner, prompt = chunks[j].doc_index, None
        for c in cands.values():
            if c.label is not None and not st.retype:
                continue
            if c.source_label is not None and t.alignment is not None:
                options = [label for label, _ in t.alignment.candidates(c.source_label, st.top_k)]
            else:
                options = list(t.labels.labels)
            if c.label is not None and c.label not in options:
                options.append(c.label)
            if prompt is None:
                prompt = t.prompts.build(chunks[j].shown, demos[j])
            prior = None
            if st.calibrate and st.typer != "knn":  # the label prior in this context: a content-free span
                prior = batch.prior(j, owner, ScoreRequest(typing_context(prompt, CONTENT_FREE), everything))
            at = batch.ask(
                owner,
                ScoreRequest(
                    typing_context(prompt, chunks[j].shown[c.start : c.end]),
                    typing_options([names[o] for o in options]),
                ),
            )
            todo.append((j, c, options, at, prior))
    if st.typer != "llm" and t.memory is None:
        raise ValueError(f"{t.name}: typer={st.typer!r} needs the span memory learned by initialize()")
    if st.typer == "knn":
        scores = [[0.0] * len(r.options) for r in batch.requests]
    else:
        scores = run.choose(batch.owners, batch.requests)
    if scores is None:
        return
    knn = []
    if st.typer != "llm":
        knn = t.memory.distributions([chunks[j].shown[c.start : c.end] for j, c, _, _, _ in todo], t.encoder())
    for n, (_, c, options, at, prior) in enumerate(todo):
        sc = scores[at]
        if prior is not None:
            base = dict(zip(everything, scores[prior]))
            sc = [x - base[o] for x, o in zip(sc, typing_options([names[o] for o in options]))]
        if knn:
            weight = 1.0 if st.typer == "knn" else st.knn_weight
            # the option order (alignment rank) breaks ties when no neighbour votes for any option
            sc = [
                x + weight * math.log(knn[n].get(o, 0.0) + 1e-3) - 1e-6 * i for i, (x, o) in enumerate(zip(sc, options))
            ]
        k, margin = best(sc)
        chosen = by_name[names[options[k]]]
        if c.source_label is not None and margin < st.keep_margin and t.alignment is not None:
            chosen = t.alignment.candidates(c.source_label, 1)[0][0]
        c.label, c.score = chosen, margin


def place_spans(
    chunks: Sequence[Chunk], spans: Sequence[Sequence]
) -> Tuple[Candidates, List[List[Optional[Candidate]]]]:
    """Labelled spans (``spans[i]``: doc i's) as candidates of the chunks holding them, and per doc the candidate
    of each span (None where it crosses a chunk boundary)."""
    candidates: Candidates = [{} for _ in chunks]
    placed: List[List[Optional[Candidate]]] = []
    for i, doc_spans in enumerate(spans):
        mine = [j for j, chunk in enumerate(chunks) if chunk.doc_index == i]
        placed.append([])
        for span in doc_spans:
            j = next((j for j in mine if chunks[j].span.start <= span.start and span.end <= chunks[j].span.end), None)
            c = None
            if j is not None:
                offset = chunks[j].span.start_char
                c = Candidate(span.start_char - offset, span.end_char - offset, label=span.label_)
                candidates[j][(c.start, c.end, c.label)] = c
            placed[-1].append(c)
    return candidates, placed


def verification_scores(
    stages: LARStages,
    names: Dict[str, str],
    chunks: Sequence[Chunk],
    demos: Sequence[Sequence[Demonstration]],
    candidates: Candidates,
    run: Run,
) -> None:
    """Sets each typed candidate's calibrated P(yes) for "Is <span> a <label>?"."""
    batch, todo = ChoiceBatch(), []
    for j, cands in enumerate(candidates):
        chunk = chunks[j]
        examples = verification_examples(demos[j], names, stages.verify_demos, stages.seed)
        for c in cands.values():
            if c.label is None:
                continue
            name, prior = names[c.label], None
            if stages.calibrate:  # how readily it says yes to a content-free span
                prior = batch.prior(
                    (j, name),
                    chunk.doc_index,
                    ScoreRequest(verification_context(examples, chunk.shown, CONTENT_FREE, name), VERIFY_OPTIONS),
                )
            at = batch.ask(
                chunk.doc_index,
                ScoreRequest(
                    verification_context(examples, chunk.shown, chunk.shown[c.start : c.end], name), VERIFY_OPTIONS
                ),
            )
            todo.append((c, at, prior))
    scores = run.choose(batch.owners, batch.requests)
    if scores is None:
        return
    for c, at, prior in todo:
        c.p_yes = p_yes(scores[at], scores[prior] if prior is not None else None)


def drop_unverified(candidates: Candidates, threshold: float) -> None:
    """Drops (label None) the candidates whose P(yes) is below ``threshold``."""
    for cands in candidates:
        for c in cands.values():
            if c.p_yes is not None and c.p_yes < threshold:
                c.label = None


def learn_alignment(
    t: Typing, gold: Sequence[Demonstration], predicted: Sequence[Sequence[Tuple[int, int, str]]]
) -> Tuple[LabelAlignment, SpanMemory]:
    """Source → target alignment from the source's ``predicted`` spans on ``gold`` target data (co-occurrence at
    equal boundaries) mixed with label-embedding similarity, config rows pinned on top; and the gold spans'
    memory for kNN typing."""
    pairs = []
    for demo, spans in zip(gold, predicted):
        truth = {(s, e): lab for s, e, lab in demo.spans}
        pairs.extend((lab, truth.get((s, e))) for s, e, lab in spans)
    source = sorted({s for s, _ in pairs} | set(t.stages.alignment or {}))
    if not source:
        raise ValueError(
            f"{t.name}: the source predicted no spans on the alignment corpus; is a source NER "
            f"component placed before {t.name} (source={t.stages.source!r})?"
        )
    cooc = LabelAlignment.from_cooccurrence(pairs, source, t.labels.labels)
    w = t.stages.embedding_weight
    combined = LabelAlignment.combine([(align_by_embeddings(t, source), w), (cooc, 1 - w)])
    return pin(t.stages, combined), SpanMemory.build(gold, t.encoder())


def align_by_embeddings(t: Typing, source: Sequence[str]) -> LabelAlignment:
    return LabelAlignment.from_embeddings(source, t.labels.labels, t.encoder(), t.labels.definitions)


def pin(stages: LARStages, alignment: LabelAlignment) -> LabelAlignment:
    return alignment.override(stages.alignment) if stages.alignment else alignment
