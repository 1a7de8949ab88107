"""Output format × decoding benchmark (issue: the foundation's baseline).

CrossNER <domain> test, first N sentences; K fixed demonstrations drawn (seed 0) from its train split; every
format unconstrained and grammar-constrained, one after another in one process on one loaded model.

    python benchmarks/formats.py --data ../shared/data --domain politics --n 100 --k 5
"""

import argparse
import datetime
import json
import platform
from pathlib import Path

from spacy_llmner.formats import FORMATS

from common import CROSSNER_LABELS, blank, fixed_demonstrations, load_split, run_and_score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domain", default="politics")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--formats", default="lines,json,bracket,xml")
    ap.add_argument("--parallel", type=int, default=8, help="sequences decoded together (1: one at a time)")
    ap.add_argument("--out", default="metrics/formats.json")
    args = ap.parse_args()

    nlp0 = blank()
    gold = load_split(args.data, args.domain, "test", nlp0, limit=args.n)
    demos = fixed_demonstrations(load_split(args.data, args.domain, "train", nlp0), args.k)
    rows = []
    for fmt in args.formats.split(","):
        for constrained in (False, True):
            nlp = blank()
            ner = nlp.add_pipe(
                "llm_lar_ner",
                config={
                    "labels": CROSSNER_LABELS[args.domain].split(),
                    "format": {"@misc": f"spacy_llmner.{FORMATS[fmt].__name__}.v1"},
                    "backend": {
                        "@llm_models": "spacy_llmner.LlamaCpp.v1",
                        "model": args.model,
                        "parallel": args.parallel,
                    },
                    "constrained": constrained,
                },
            )
            ner.set_demonstrations(demos)
            nlp(nlp.make_doc("Warm-up sentence."))  # loads the model, evaluates the shared prefix
            ner.reset_usage()
            res = run_and_score(nlp, gold)
            u = ner.usage
            row = {
                "parallel": args.parallel,
                "format": fmt,
                "constrained": constrained,
                **{k: res[k] for k in ("f1", "p", "r", "sentences_per_second", "seconds")},
                "prompt_tokens_per_sentence": u.prompt_tokens / len(gold),
                "completion_tokens_per_sentence": u.completion_tokens / len(gold),
                "hallucinated": u.hallucinated,
                "unknown_labels": u.unknown_labels,
                "malformed": u.malformed,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }
    Path(args.out).write_text(json.dumps({"args": vars(args), **meta, "rows": rows}, indent=2))
    print("\n| format | decoding | F1 | P | R | sent/s | prompt tok/sent | completion tok/sent | hallucinated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {'grammar' if r['constrained'] else 'free'} | {r['f1']:.1f} | {r['p']:.1f} | "
            f"{r['r']:.1f} | {r['sentences_per_second']:.2f} | {r['prompt_tokens_per_sentence']:.0f} | "
            f"{r['completion_tokens_per_sentence']:.1f} | {r['hallucinated']} |"
        )


if __name__ == "__main__":
    main()
