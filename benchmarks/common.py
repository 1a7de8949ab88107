"""Shared benchmark plumbing: CrossNER splits as Docs, fixed demonstrations, strict entity-level scoring."""

import random
import time
from pathlib import Path
from typing import Dict, List

import spacy
from spacy.scorer import get_ner_prf
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


def run_and_score(nlp, gold: List[Doc], batch_size: int = 16) -> Dict:
    """Annotates copies of the gold docs' words (the standard CrossNER protocol) and scores strict F1."""
    inputs = [unannotated(d, nlp.vocab) for d in gold]
    t0 = time.perf_counter()
    preds = list(nlp.pipe(inputs, batch_size=batch_size))
    seconds = time.perf_counter() - t0
    examples = [Example(p, g) for p, g in zip(preds, gold)]
    prf = get_ner_prf(examples)
    return {
        "f1": 100 * prf["ents_f"],
        "p": 100 * prf["ents_p"],
        "r": 100 * prf["ents_r"],
        "seconds": seconds,
        "sentences_per_second": len(gold) / seconds if seconds else 0.0,
        "per_type": {
            k: {m: round(100 * v, 1) for m, v in s.items()} for k, s in (prf.get("ents_per_type") or {}).items()
        },
    }


def blank(lang: str = "en"):
    return spacy.blank(lang)
