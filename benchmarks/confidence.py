"""Reliability of the per-entity confidences (``doc.spans[key].attrs["scores"]``) on CrossNER dev: predicted spans
binned by confidence against their precision (strict: exact boundaries and type), the expected calibration error,
and precision / recall / F1 at a range of ``threshold`` settings (computed from one run: a threshold only drops
spans). The same retrieval pipeline as benchmarks/finetune.py (span retrieval, --k demonstrations, the domain's
train split as the pool), on the first --n dev sentences of each domain.

    python benchmarks/confidence.py --n 20 --k 3 --out metrics/adapter/reliability_dev.json
"""

import argparse
import json
from pathlib import Path

import spacy
from finetune import pipeline
from spacy.tokens import Doc

from common import CROSSNER_LABELS, load_split

BINS = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001]
THRESHOLDS = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--system", default="gemma3-270m+auto", help="MODEL or MODEL+ADAPTER, as in finetune.py")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default="metrics/adapter/reliability_dev.json")
    args = ap.parse_args()
    pairs, n_gold = [], 0  # (confidence, correct) per predicted span
    for domain in args.domains.split(","):
        blank = spacy.blank("en")
        train = load_split(args.data, domain, "train", blank)
        gold = load_split(args.data, domain, args.split, blank, limit=args.n)
        nlp = pipeline(args.system, CROSSNER_LABELS[domain].split(), train, args.k, cache=args.cache)
        docs = [Doc(nlp.vocab, words=[t.text for t in g], spaces=[t.whitespace_ for t in g]) for g in gold]
        for doc, g in zip(nlp.pipe(docs), gold):
            truth = {(e.start, e.end, e.label_) for e in g.ents}
            n_gold += len(truth)
            group = doc.spans["llm_ner"]
            for span, score in zip(group, group.attrs["scores"]):
                pairs.append((score, (span.start, span.end, span.label_) in truth))
        print(f"{domain}: {len(pairs)} spans so far", flush=True)
    scored = [(s, c) for s, c in pairs if s is not None]
    bins = []
    for lo, hi in zip(BINS, BINS[1:]):
        inside = [(s, c) for s, c in scored if lo <= s < hi]
        if inside:
            bins.append(
                {
                    "range": [lo, min(hi, 1.0)],
                    "spans": len(inside),
                    "mean_confidence": sum(s for s, _ in inside) / len(inside),
                    "precision": sum(c for _, c in inside) / len(inside),
                }
            )
    ece = sum(b["spans"] * abs(b["mean_confidence"] - b["precision"]) for b in bins) / max(len(scored), 1)
    at = []
    for t in THRESHOLDS:
        kept = [c for s, c in pairs if s is None or s >= t]
        tp = sum(kept)
        p, r = tp / max(len(kept), 1), tp / max(n_gold, 1)
        at.append(
            {"threshold": t, "p": 100 * p, "r": 100 * r, "f1": 200 * p * r / max(p + r, 1e-9), "spans": len(kept)}
        )
    out = {
        "args": vars(args),
        "spans": len(pairs),
        "without_score": len(pairs) - len(scored),
        "gold": n_gold,
        "bins": bins,
        "ece": ece,
        "thresholds": at,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(bins, Path(args.out).with_suffix(".png"), args)
    for b in bins:
        print(
            f"  [{b['range'][0]:.2f}, {b['range'][1]:.2f}): {b['spans']:4d} spans, confidence "
            f"{b['mean_confidence']:.2f}, precision {b['precision']:.2f}"
        )
    print(
        f"ECE {ece:.3f}; "
        + "; ".join(f"t={a['threshold']}: P {a['p']:.1f} R {a['r']:.1f} F1 {a['f1']:.1f}" for a in at)
    )


def plot(bins, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    xs = [b["mean_confidence"] for b in bins]
    ax.plot(xs, [b["precision"] for b in bins], marker="o")
    for b, x in zip(bins, xs):
        ax.annotate(str(b["spans"]), (x, b["precision"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("precision (strict)")
    ax.set_title(f"CrossNER {args.split}, first {args.n}/domain, k={args.k}", fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
