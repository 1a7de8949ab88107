"""The tuned GGUF against the base model, measured in one run on the same sentences: F1 and inference speed.

The same retrieval pipeline (configs/retrieval.cfg: span retrieval, lines format, constrained decoding; --k
demonstrations) is built per model; each annotates the first --n test sentences of each domain one at a time, the
models in alternating order (base, tuned, tuned, base, ...), so neither gets a quieter CPU. Reports per domain and
averaged: strict F1, median seconds per sentence, prompt / generated tokens per sentence, and tuned/base ratios.

    python benchmarks/finetune.py --tuned training/finetuned/model.gguf --domains politics --n 40
    python benchmarks/finetune.py --tuned training/finetuned/model.gguf --k 8 --models tuned   # one model only
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import spacy
from spacy.scorer import get_ner_prf
from spacy.tokens import Doc
from spacy.training import Example

from common import CROSSNER_LABELS, load_split


def pipeline(model, labels, pool, k, encoder=None):
    nlp = spacy.util.load_model_from_config(spacy.util.load_config("configs/retrieval.cfg"), auto_fill=True)
    ner = nlp.get_pipe("llm_lar_ner")
    ner.backend.model = model
    ner.retriever.k = k
    if encoder is not None:
        ner.retriever.encoder = encoder
    ner.initialize(pool=pool, labels=labels)
    return nlp


def run_domain(args, domain, models):
    blank = spacy.blank("en")
    train = load_split(args.data, domain, "train", blank)
    gold = load_split(args.data, domain, "test", blank, limit=args.n or None)
    labels = CROSSNER_LABELS[domain].split()
    systems, encoder = {}, None
    for name, model in models.items():
        systems[name] = pipeline(model, labels, train, args.k, encoder)
        encoder = systems[name].get_pipe("llm_lar_ner").retriever.encoder
        systems[name]("Warm-up sentence .")  # load the model outside the timing
    seconds = {k: [] for k in systems}
    preds = {k: [] for k in systems}
    for i, g in enumerate(gold):
        for name in list(systems) if i % 2 == 0 else list(reversed(systems)):
            nlp = systems[name]
            doc = Doc(nlp.vocab, words=[t.text for t in g], spaces=[t.whitespace_ for t in g])
            t0 = time.perf_counter()
            preds[name].append(nlp(doc))
            seconds[name].append(time.perf_counter() - t0)
    out = {}
    for name in systems:
        usage = [d._.llm_ner_usage["llm_lar_ner"] for d in preds[name]]
        prf = get_ner_prf([Example(p, g) for p, g in zip(preds[name], gold)])
        out[name] = {
            "f1": 100 * prf["ents_f"],
            "p": 100 * prf["ents_p"],
            "r": 100 * prf["ents_r"],
            "median_seconds": statistics.median(seconds[name]),
            "sentences_per_second": len(gold) / sum(seconds[name]),
            "prompt_tokens_per_sentence": sum(u["prompt_tokens"] for u in usage) / len(gold),
            "completion_tokens_per_sentence": sum(u["completion_tokens"] for u in usage) / len(gold),
        }
        print(f"  {domain} {name}: F1 {out[name]['f1']:.1f}, median {out[name]['median_seconds']:.2f} s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--base", default="gemma3-270m")
    ap.add_argument("--tuned", required=True)
    ap.add_argument("--models", default="base,tuned", help="which of base,tuned to run")
    ap.add_argument("--out", default="metrics/finetune.json")
    args = ap.parse_args()
    models = {m: getattr(args, m) for m in args.models.split(",")}
    result = {"args": vars(args), "domains": {}}
    for domain in args.domains.split(","):
        result["domains"][domain] = run_domain(args, domain, models)
    per = result["domains"].values()
    result["average"] = {m: {key: sum(d[m][key] for d in per) / len(per) for key in next(iter(per))[m]} for m in models}
    if "base" in models and "tuned" in models:
        b, t = result["average"]["base"], result["average"]["tuned"]
        result["tuned_over_base"] = {k: t[k] / b[k] for k in ("median_seconds", "completion_tokens_per_sentence")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"average": result["average"], "ratios": result.get("tuned_over_base")}, indent=2))


if __name__ == "__main__":
    main()
