"""Reliability of the per-entity confidences (``doc.spans[key].attrs["scores"]``) on CrossNER dev: predicted spans
binned by confidence against their precision (strict: exact boundaries and type), the expected calibration error,
and precision / recall / F1 at a range of ``threshold`` settings (computed from one run: a threshold only drops
spans). The same retrieval pipeline as benchmarks/finetune.py (span retrieval, --k demonstrations, the domain's
train split as the pool), on the first --n dev sentences of each domain.

The spans are scored raw (``calibrate = false``) and then through a calibration map: the backend's own (the
shipped adapter's ``calibration.json``; ``--calibration auto``), a file, or one fitted here (``--fit PATH``: isotonic
regression on these spans; its reliability on the same spans is in-sample, check it on other sentences with
``--calibration PATH``). Both reliabilities are reported; ``threshold`` acts on calibrated scores. A calibration file
holds one map per condition (``calibration.Calibrations``): ``--fit`` replaces the map for prompts without
demonstrations when ``--k 0``, for prompts with some otherwise, and keeps the other. The shipped maps:

    python benchmarks/confidence.py --n 60 --k 0 --fit spacy_llmner/adapters/ner-v2/calibration.json \
        --out metrics/adapter/reliability_dev60_k0.json
    python benchmarks/confidence.py --n 60 --k 3 --fit spacy_llmner/adapters/ner-v2/calibration.json \
        --out metrics/adapter/reliability_dev60.json
    python benchmarks/confidence.py --split test --n 40 --k 0 --out metrics/adapter/reliability_test40_k0.json
    python benchmarks/confidence.py --split test --n 40 --k 3 --out metrics/adapter/reliability_test40.json
"""

import argparse
import json
from pathlib import Path

import spacy
from finetune import pipeline

from spacy_llmner import calibration as calib
from spacy_llmner.corpora import unannotated

from common import CROSSNER_LABELS, load_split

BINS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001]
THRESHOLDS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--system", default="gemma3-270m+auto@torch", help="MODEL or MODEL+ADAPTER, as in finetune.py")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--calibration", default="auto", help="auto (the backend's), none, or a calibration.json")
    ap.add_argument("--fit", default=None, help="fit a calibration map on these spans and write it here")
    ap.add_argument("--out", default="metrics/adapter/reliability_dev.json")
    args = ap.parse_args()
    pairs, n_gold, own = [], 0, None  # (raw confidence, correct) per predicted span
    for domain in args.domains.split(","):
        blank = spacy.blank("en")
        train = load_split(args.data, domain, "train", blank)
        gold = load_split(args.data, domain, args.split, blank, limit=args.n)
        nlp = pipeline(args.system, CROSSNER_LABELS[domain].split(), train, args.k, cache=args.cache)
        nlp.get_pipe("llm_lar_ner").calibrate = False  # raw scores; calibrated below
        own = nlp.get_pipe("llm_lar_ner").backend.calibration
        docs = [unannotated(g, nlp.vocab) for g in gold]
        for doc, g in zip(nlp.pipe(docs), gold):
            truth = {(e.start, e.end, e.label_) for e in g.ents}
            n_gold += len(truth)
            group = doc.spans["llm_ner"]
            for span, score in zip(group, group.attrs["scores"]):
                pairs.append((score, (span.start, span.end, span.label_) in truth))
        print(f"{domain}: {len(pairs)} spans so far", flush=True)
    cals = None
    if args.fit:
        cal = calib.fit([(s, c) for s, c in pairs if s is not None], fitted_on=fitted_on(args))
        start = 0 if args.k == 0 else 1
        if Path(args.fit).exists():
            cals = calib.load(args.fit).with_map(start, cal)
        else:  # a new file: this map serves every prompt until the other condition's is fitted
            cals = calib.Calibrations(((0, cal),))
        calib.save(cals, args.fit)
        print(
            f"calibration: {len(cal.knots)} knots for {start}+ demonstrations written to {args.fit} (in-sample below)"
        )
    elif args.calibration == "auto":
        cals = own
    elif args.calibration != "none":
        cals = calib.load(args.calibration)
    cal = cals.for_demonstrations(args.k) if cals is not None else None
    raw = reliability(pairs, n_gold)
    calibrated = reliability([(cal(s), c) for s, c in pairs], n_gold) if cal is not None else None
    out = {
        "args": vars(args),
        "spans": len(pairs),
        "without_score": len(pairs) - sum(s is not None for s, _ in pairs),
        "gold": n_gold,
        **raw,
        "calibration": cal.to_dict() if cal is not None else None,
        "calibrated": calibrated,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(raw["bins"], calibrated["bins"] if calibrated else None, Path(args.out).with_suffix(".png"), args)
    for title, rel in (("raw", raw), ("calibrated", calibrated)):
        if rel is None:
            continue
        print(f"{title}:")
        for b in rel["bins"]:
            print(
                f"  [{b['range'][0]:.2f}, {b['range'][1]:.2f}): {b['spans']:4d} spans, confidence "
                f"{b['mean_confidence']:.2f}, precision {b['precision']:.2f}"
            )
        print(
            f"  ECE {rel['ece']:.3f}; "
            + "; ".join(
                f"t={a['threshold']}: P {a['p']:.1f} R {a['r']:.1f} F1 {a['f1']:.1f}" for a in rel["thresholds"]
            )
        )


def fitted_on(args):
    return f"CrossNER {args.split}, first {args.n} per domain of {args.domains}, k = {args.k}, {args.system}"


def reliability(pairs, n_gold):
    """Bins of (confidence, correct) pairs against their precision, the expected calibration error, and P / R / F1
    at each threshold (spans without a confidence are always kept)."""
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
    return {"bins": bins, "ece": ece, "thresholds": at}


def plot(bins, calibrated, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for label, series in (("raw", bins), ("calibrated", calibrated)):
        if not series:
            continue
        xs = [b["mean_confidence"] for b in series]
        ax.plot(xs, [b["precision"] for b in series], marker="o", label=label)
        for b, x in zip(series, xs):
            ax.annotate(str(b["spans"]), (x, b["precision"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("precision (strict)")
    ax.set_title(f"CrossNER {args.split}, first {args.n}/domain, k={args.k}", fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
