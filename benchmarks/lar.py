"""LAR / EL4NER stage comparison per CrossNER domain, with a CoNLL-2003-trained spaCy NER as the source model.

Variants, all in one process on one loaded model, the same fixed demonstrations (k from the train split, seed 0)
and the same test sample: one-pass; extract → type (EL4NER decomposition); source → alignment → reassignment
(LAR); each with verification; source ∪ one-pass → type; and typing by the nearest gold spans of the train split
(kNN), alone or added to the LLM's scores. The alignment and the span memory are learned on the train split.

    python -m spacy train configs/tok2vec_ner.cfg --paths.train $DATA/crossner/conll2003/train.txt \\
        --paths.dev $DATA/crossner/conll2003/dev.txt --output training/conll2003
    python benchmarks/lar.py --data ../shared/data --source training/conll2003/model-best --n 40
"""

import argparse
import datetime
import json
from pathlib import Path

import spacy

from common import CROSSNER_LABELS, fixed_demonstrations, load_split, run_and_score

VARIANTS = {
    "onepass": {"lar": None},
    "onepass+verify": {"proposers": ["generate"], "retype": False, "verify": True},
    "extract>type": {"proposers": ["extract"]},
    "extract>type+verify": {"proposers": ["extract"], "verify": True},
    "source>align>type": {"proposers": ["source"]},
    "source>align>type+verify": {"proposers": ["source"], "verify": True},
    "source+onepass>type": {"proposers": ["source", "generate"]},
    # typing by the nearest gold spans of the train split (no LLM call), and LLM + kNN
    "source>knn": {"proposers": ["source"], "typer": "knn", "top_k": 99},
    "source>align>type+knn": {"proposers": ["source"], "typer": "llm+knn"},
    "onepass>type+knn": {"proposers": ["generate"], "typer": "llm+knn", "top_k": 99},
    "source+onepass>type+knn": {"proposers": ["source", "generate"], "typer": "llm+knn"},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--source", default="training/conll2003/model-best")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", default="metrics/lar.json")
    args = ap.parse_args()
    rows, alignments = [], {}
    for domain in args.domains.split(","):
        nlp = spacy.load(args.source)  # tok2vec + ner (CoNLL labels), then ours
        ner = nlp.add_pipe(
            "llm_lar_ner",
            config={
                "labels": CROSSNER_LABELS[domain].split(),
                "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": args.model},
                "lar": {"@misc": "spacy_llmner.LAR.v1", "proposers": ["source"]},
            },
        )
        train = load_split(args.data, domain, "train", nlp)
        ner.set_demonstrations(fixed_demonstrations(train, args.k))
        alignment = ner.learn_alignment(nlp, [_demo(d) for d in train])
        alignments[domain] = alignment.to_dict()
        print(f"\n{domain} alignment (learned on {len(train)} train sentences):\n{alignment.table()}", flush=True)
        gold = load_split(args.data, domain, "test", nlp, limit=args.n or None)
        for variant in args.variants.split(","):
            spec = VARIANTS[variant]
            ner.lar = None if "lar" in spec else _stages(spec)
            ner.reset_usage()
            res = run_and_score(nlp, gold)
            u = ner.usage
            row = {
                "domain": domain,
                "variant": variant,
                "n": len(gold),
                **{key: res[key] for key in ("f1", "p", "r", "sentences_per_second", "seconds")},
                "calls_per_sentence": u.calls / len(gold),
                "prompt_tokens_per_sentence": u.prompt_tokens / len(gold),
                "completion_tokens_per_sentence": u.completion_tokens / len(gold),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                json.dumps(
                    {
                        "args": vars(args),
                        "date": datetime.date.today().isoformat(),
                        "rows": rows,
                        "alignments": alignments,
                    },
                    indent=2,
                )
            )
    table(rows, args.variants.split(","))


def _demo(doc):
    from spacy_llmner.prompt import Demonstration

    return Demonstration(doc.text, [(e.start_char, e.end_char, e.label_) for e in doc.ents])


def _stages(spec):
    from spacy_llmner.lar import make_lar

    return make_lar(**spec)


def table(rows, variants):
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    print(
        "\n| variant | " + " | ".join(domains) + " | average | sent/s | calls/sent | prompt tok/sent | gen tok/sent |"
    )
    print("|---|" + "---|" * (len(domains) + 5))
    for v in variants:
        sel = [r for r in rows if r["variant"] == v]
        if not sel:
            continue
        f1 = {r["domain"]: r["f1"] for r in sel}
        mean = lambda key, sel=sel: sum(r[key] for r in sel) / len(sel)
        print(
            f"| {v} | "
            + " | ".join(f"{f1.get(d, float('nan')):.1f}" for d in domains)
            + f" | {sum(f1.values()) / len(f1):.1f} | {mean('sentences_per_second'):.2f} | "
            f"{mean('calls_per_sentence'):.1f} | {mean('prompt_tokens_per_sentence'):.0f} | "
            f"{mean('completion_tokens_per_sentence'):.0f} |"
        )


if __name__ == "__main__":
    main()
