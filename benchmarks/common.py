"""Shared benchmark plumbing: CrossNER splits as Docs, fixed demonstrations, strict entity-level scoring."""

import platform
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import spacy
from spacy.scorer import Scorer, get_ner_prf
from spacy.tokens import Doc
from spacy.training import Example

from spacy_llmner.corpora import read_bio, unannotated

CROSSNER_LABELS = {
    "politics": "country election event location misc organisation person politicalparty politician",
    "science": "academicjournal astronomicalobject award chemicalcompound chemicalelement country discipline enzyme "
    "event location misc organisation person protein scientist theory university",
    "music": "album award band country event location misc musicalartist musicalinstrument musicgenre organisation "
    "person song",
    "literature": "award book country event literarygenre location magazine misc organisation person poem writer",
    "ai": "algorithm conference country field location metrics misc organisation person product programlang "
    "researcher task university",
}


def load_split(data: Path, domain: str, split: str, nlp, limit=None) -> List[Doc]:
    return read_bio(Path(data) / "crossner" / domain / f"{split}.txt", nlp.vocab, limit=limit)


def fixed_demonstrations(train: List[Doc], k: int, seed: int = 0) -> List[Doc]:
    return random.Random(seed).sample(train, k)


def annotate_and_score(
    nlp,
    gold: List[Doc],
    docs: Optional[List[Doc]] = None,
    batch_size: int = 16,
    nested=False,
    more: Optional[Callable[[List[Example]], Dict]] = None,
):
    """The benchmarks' one scorer: strict P / R / F1 of ``nlp`` against ``gold``, run on unannotated copies of the
    gold docs' words (the standard CrossNER protocol) or on ``docs`` (the same text laid out otherwise: paragraphs);
    ``nested``: the spans of ``doc.spans["sc"]``, overlaps allowed, instead of the entities. With the time and, for a
    pipeline with ``llm_lar_ner``, what it decoded (``prompts`` = decoded + answered from the cache); ``more``: fields
    it computes from the same pass's examples (predicted, gold)."""
    ner = nlp.get_pipe("llm_lar_ner") if "llm_lar_ner" in nlp.pipe_names else None
    if ner is not None:
        ner.reset_usage()
    docs = docs if docs is not None else [unannotated(g, nlp.vocab) for g in gold]
    t0 = time.perf_counter()
    preds = list(nlp.pipe(docs, batch_size=batch_size))
    seconds = time.perf_counter() - t0
    examples = [Example(p, g) for p, g in zip(preds, gold)]
    per_type = {}
    if nested:
        s = Scorer.score_spans(examples, "spans_sc", getter=lambda doc, _: doc.spans.get("sc", []), allow_overlap=True)
        prf = (s["spans_sc_p"], s["spans_sc_r"], s["spans_sc_f"])
    else:
        s = get_ner_prf(examples)
        prf = (s["ents_p"], s["ents_r"], s["ents_f"])
        per_type = {k: {m: round(100 * v, 1) for m, v in t.items()} for k, t in (s.get("ents_per_type") or {}).items()}
    row = {
        "p": 100 * (prf[0] or 0.0),
        "r": 100 * (prf[1] or 0.0),
        "f1": 100 * (prf[2] or 0.0),
        "docs": len(gold),
        "seconds": seconds,
        "sentences_per_second": len(gold) / seconds if seconds else 0.0,
        "per_type": per_type,
    }
    if more is not None:
        row.update(more(examples))
    if ner is not None:
        usage = ner.usage  # this run's (reset before it); kept for the caller
        row.update(
            prompts=usage.calls + usage.cached_calls,
            decoded=usage.calls,
            cached=usage.cached_calls,
            truncated=usage.truncated,
        )
    return row


def run_and_score(nlp, gold: List[Doc], batch_size: int = 16) -> Dict:
    """Annotates copies of the gold docs' words (the standard CrossNER protocol) and scores strict F1."""
    return annotate_and_score(nlp, gold, batch_size=batch_size)


def blank(lang: str = "en"):
    return spacy.blank(lang)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
