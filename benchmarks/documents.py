"""Documents against their sentences: does a paragraph get what its sentences get?

Per domain, the test split's sentences (first --n; 0: all) are annotated one by one, then grouped --per consecutive
sentences to a Doc (joined by a space, gold entities carried over by offsets) and annotated as documents:

  sentences      one Doc per sentence (the reference)
  packed         documents, sentences packed into prompts up to max_chunk_tokens (max_chunk_sentences = null:
                 how the component chunked before one prompt per sentence)
  sentencizer    documents with no boundaries given: one prompt per sentence, spaCy's sentencizer finds them
  doc_sents      documents whose sentence boundaries a pipeline set (here: the gold ones), one prompt per sentence

The pipeline is a config's (--config, default configs/retrieval.cfg: span retrieval over the domain's train split,
--k demonstrations) with --engine as its decoder. All conditions share one answer cache (--cache), so a prompt that
two conditions send alike is decoded once: one prompt per sentence costs what the sentences cost. Reports strict
P / R / F1 per condition and domain, the F1 gap to the sentences, prompts and answers cut by their token limit.

    python benchmarks/documents.py --engine torch --n 0 --out metrics/documents_torch.json
    python benchmarks/documents.py --engine llama.cpp --n 160 --out metrics/documents_llamacpp_n160.json
"""

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import spacy
from spacy.tokens import Doc

from common import CROSSNER_LABELS, annotate_and_score, load_split

CONDITIONS = ("sentences", "packed", "sentencizer", "doc_sents")


def paragraphs(gold: List[Doc], per: int, vocab) -> List[Doc]:
    """Docs of ``per`` consecutive gold sentences joined by a space, with their entities (and, as a pipeline's
    sentence boundaries, the sentences' starts: read only by the doc_sents condition)."""
    out = []
    for at in range(0, len(gold), per):
        group = gold[at : at + per]
        words, spaces, ents, starts = [], [], [], []
        for doc in group:
            offset = len(words)
            starts.append(offset)
            words.extend(t.text for t in doc)
            spaces.extend(bool(t.whitespace_) for t in doc)
            if spaces:
                spaces[-1] = True  # a space between sentences
            ents.extend((e.label_, offset + e.start, offset + e.end) for e in doc.ents)
        spaces[-1] = False
        doc = Doc(vocab, words=words, spaces=spaces, sent_starts=[i in starts for i in range(len(words))])
        doc.ents = [doc.char_span(doc[s].idx, doc[e - 1].idx + len(doc[e - 1]), label=lab) for lab, s, e in ents]
        out.append(doc)
    return out


def inputs(gold: List[Doc], vocab, keep_sents: bool) -> List[Doc]:
    """Unannotated copies (same words and spaces), with the sentence boundaries only where asked."""
    out = []
    for g in gold:
        words, spaces = [t.text for t in g], [bool(t.whitespace_) for t in g]
        starts = [t.is_sent_start for t in g] if keep_sents else None
        out.append(Doc(vocab, words=words, spaces=spaces, sent_starts=starts))
    return out


def pipeline(config_path: str, engine: str, labels: List[str], pool: List[Doc], k: int, cache: str):
    config = spacy.util.load_config(config_path)
    comp = config["components"]["llm_lar_ner"]
    comp["backend"]["engine"] = engine
    comp["backend"]["parallel"] = None  # the engine's own batch
    comp["cache_path"] = cache
    nlp = spacy.util.load_model_from_config(config, auto_fill=True)
    ner = nlp.get_pipe("llm_lar_ner")
    ner.retriever.k = k
    ner.initialize(pool=pool, labels=labels)
    return nlp


def run_domain(args, domain: str) -> Dict:
    blank = spacy.blank("en")
    gold = load_split(args.data, domain, "test", blank, limit=args.n or None)
    docs = paragraphs(gold, args.per, blank.vocab)
    pool = load_split(args.data, domain, "train", blank)
    nlp = pipeline(args.config, args.engine, CROSSNER_LABELS[domain].split(), pool, args.k, args.cache)
    out = {}
    for condition in args.conditions.split(","):
        nlp.get_pipe("llm_lar_ner").max_chunk_sentences = None if condition == "packed" else 1
        if condition == "sentences":
            out[condition] = annotate_and_score(nlp, gold, inputs(gold, nlp.vocab, False), args.batch_size)
        else:
            laid_out = inputs(docs, nlp.vocab, condition == "doc_sents")
            out[condition] = annotate_and_score(nlp, docs, laid_out, args.batch_size)
        out[condition]["sentences"] = len(gold)
        print(f"  {domain} {condition}: F1 {out[condition]['f1']:.1f} (R {out[condition]['r']:.1f})", flush=True)
    return out


def main(argv: Optional[List[str]] = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--n", type=int, default=0, help="first N test sentences per domain (0: all)")
    ap.add_argument("--per", type=int, default=8, help="sentences per document")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--config", default="configs/retrieval.cfg")
    ap.add_argument("--engine", default="llama.cpp", choices=["llama.cpp", "torch"])
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cache", default="training/documents_cache.sqlite", help="the answer cache all conditions share")
    ap.add_argument("--out", default="metrics/documents.json")
    args = ap.parse_args(argv)
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "date": datetime.date.today().isoformat(),
        "domains": {},
    }
    for domain in args.domains.split(","):
        result["domains"][domain] = run_domain(args, domain)
        write(args.out, result, t0)  # after each domain: a stopped run keeps what it measured
    return write(args.out, result, t0, report=True)


def write(out: str, result: Dict, t0: float, report: bool = False) -> Dict:
    result["seconds"] = time.perf_counter() - t0
    gaps = {
        c: {d: round(r[c]["f1"] - r["sentences"]["f1"], 2) for d, r in result["domains"].items()}
        for c in CONDITIONS
        if c != "sentences" and all(c in r and "sentences" in r for r in result["domains"].values())
    }
    result["f1_gap_to_sentences"] = gaps
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    for c, per in gaps.items() if report else ():
        print(f"{c}: F1 gap to sentences per domain {per}")
    return result


if __name__ == "__main__":
    main()
