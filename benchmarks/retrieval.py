"""Retrieval ablation: strategy × k per CrossNER domain, pool = the domain's train split.

One process, one loaded model, one encoded pool per domain; the test sample is the first --n test sentences
(0 = the full split). Format: lines with grammar decoding (the foundation's best F1-per-second).

    python benchmarks/retrieval.py --data ../shared/data --domains politics,science,music,literature,ai --n 150
"""

import argparse
import datetime
import json
from pathlib import Path

from common import CROSSNER_LABELS, blank, load_split, run_and_score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--strategies", default="random,bm25,sentence,word,span")
    ap.add_argument("--ks", default="3,8")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", default="metrics/retrieval.json")
    args = ap.parse_args()
    rows = []
    encoder = None
    for domain in args.domains.split(","):
        nlp = blank()
        ner = nlp.add_pipe(
            "llm_lar_ner",
            config={
                "labels": CROSSNER_LABELS[domain].split(),
                "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": args.model, "parallel": args.parallel},
                "retriever": {"@misc": "spacy_llmner.Retriever.v1"},
            },
        )
        if encoder is not None:
            ner.retriever.encoder = encoder
        ner.build_pool(load_split(args.data, domain, "train", nlp))
        encoder = ner.retriever.encoder
        gold = load_split(args.data, domain, "test", nlp, limit=args.n or None)
        nlp(nlp.make_doc("Warm-up sentence."))
        for strategy in args.strategies.split(","):
            for k in (int(x) for x in args.ks.split(",")):
                ner.retriever.strategy, ner.retriever.k = strategy, k  # the one retriever: its pool and encoder kept
                ner.reset_usage()
                res = run_and_score(nlp, gold)
                u = ner.usage
                row = {
                    "domain": domain,
                    "strategy": strategy,
                    "k": k,
                    "n": len(gold),
                    **{key: res[key] for key in ("f1", "p", "r", "sentences_per_second", "seconds")},
                    "prompt_tokens_per_sentence": u.prompt_tokens / len(gold),
                    "completion_tokens_per_sentence": u.completion_tokens / len(gold),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(
                    json.dumps({"args": vars(args), "date": datetime.date.today().isoformat(), "rows": rows}, indent=2)
                )
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    print("\n| strategy | k | " + " | ".join(domains) + " | average | sent/s | prompt tok/sent |")
    print("|---|---|" + "---|" * (len(domains) + 3))
    for strategy in args.strategies.split(","):
        for k in (int(x) for x in args.ks.split(",")):
            sel = [r for r in rows if r["strategy"] == strategy and r["k"] == k]
            if not sel:
                continue
            f1 = {r["domain"]: r["f1"] for r in sel}
            avg = sum(f1.values()) / len(f1)
            sps = sum(r["sentences_per_second"] for r in sel) / len(sel)
            ptok = sum(r["prompt_tokens_per_sentence"] for r in sel) / len(sel)
            print(
                f"| {strategy} | {k} | "
                + " | ".join(f"{f1.get(d, float('nan')):.1f}" for d in domains)
                + f" | {avg:.1f} | {sps:.2f} | {ptok:.0f} |"
            )


if __name__ == "__main__":
    main()
