"""The prompts, raw answers and spans of the one-pass and retrieval pipelines on a CrossNER sample, as JSON: run it
before and after a refactor and compare the files (``cmp``) to show that answers did not change.

    python scripts/answer_snapshot.py --out /tmp/answers_before.json   # first 40 politics test sentences
"""

import argparse
import json
import sys
from pathlib import Path

import spacy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import CROSSNER_LABELS, fixed_demonstrations, load_split  # noqa: E402


def pipelines(labels, train):
    backend = {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": "gemma3-270m"}
    one_pass = spacy.blank("en")
    one_pass.add_pipe("llm_lar_ner", config={"labels": labels, "backend": backend, "save_io": True})
    one_pass.get_pipe("llm_lar_ner").set_demonstrations(fixed_demonstrations(train, 5))
    retrieval = spacy.blank("en")
    retrieval.add_pipe(
        "llm_lar_ner",
        config={
            "labels": labels,
            "backend": backend,
            "save_io": True,
            "retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "span", "k": 3},
        },
    )
    retrieval.get_pipe("llm_lar_ner").initialize(pool=train)
    return {"one_pass": one_pass, "retrieval": retrieval}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domain", default="politics")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    vocab_nlp = spacy.blank("en")
    train = load_split(args.data, args.domain, "train", vocab_nlp)
    test = load_split(args.data, args.domain, "test", vocab_nlp, limit=args.n)
    out = {}
    for name, nlp in pipelines(CROSSNER_LABELS[args.domain].split(), train).items():
        docs = nlp.pipe([nlp.make_doc(d.text) for d in test])
        out[name] = [
            {
                "text": d.text,
                "io": d._.llm_ner_io["llm_lar_ner"],
                "spans": [(s.start_char, s.end_char, s.label_) for s in d.spans["llm_ner"]],
            }
            for d in docs
        ]
        print(name, sum(len(r["spans"]) for r in out[name]), "spans", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
