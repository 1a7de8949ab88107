"""A simulated low-budget annotation study (issue 17; arXiv 2404.01334) on CrossNER domains.

Per domain: the train split is the "human" data, with 30 % of its gold entities dropped (seeded) to simulate
omissions; the first half of the dev split, labels removed, is the unlabelled pool; the second half is the
students' dev set (model selection only); the full test split scores everything. The teacher is the tuned Gemma
adapter trained *without* this domain (leave-one-domain-out: it never saw these gold labels), torch engine, span
retrieval k = 3 from the damaged human data (a doc never sees itself: exclude_identical).

Stages (each skips what it already wrote under --out/<domain>):
  prepare   human.spacy (damaged), gold.spacy, pool.spacy (no labels), dev.spacy, test.spacy, dropped.json
  teacher   teacher/ (the saved pipeline); refined.spacy + refined.html (`spacy-llmner refine`), silver.spacy
            (`spacy-llmner pre-annotate` over the pool), mixed.spacy (`spacy-llmner mix` of the human labels and
            all LLM labels: every proposed addition is trained on with probability confidence x b(label), instead
            of refine's hard threshold), teacher.json (F1 and speed on the test split)
  students  for each data condition (a) damaged, (b) + refine, (c) + mixing, (d) + pre-annotated pool, (e) gold,
            and each student (tok2vec, trf): `spacy-llmner train-student`, then strict F1 on the test split and
            words/second over its texts
  speed     re-measures every student's words/second (run it alone: training shares the CPU otherwise)
  package   `spacy package --build wheel` of the condition-(d) students; wheel sizes
  report    metrics/annotation/study.json and a markdown table

    python benchmarks/annotation_study.py --data ../shared/data --domains politics,science --stages all
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import spacy
import srsly
from spacy.tokens import DocBin, Span

from spacy_llmner.corpora import read_docbin, unannotated

from common import CROSSNER_LABELS, load_split, run_and_score

CONDITIONS = {
    "a_damaged": ("human.spacy", None),
    "b_refined": ("refined.spacy", None),
    "c_mixed": ("mixed.spacy", None),
    "d_mixed_pool": ("mixed.spacy", "silver.spacy"),
    "e_gold": ("gold.spacy", None),
}
STUDENTS = {"tok2vec": "configs/student.cfg", "trf": "configs/student_trf.cfg"}


def cli(*args):
    cmd = [sys.executable, "-m", "spacy_llmner.cli", *map(str, args)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def prepare(args, domain, out):
    if (out / "dropped.json").exists():
        return
    nlp = spacy.blank("en")
    train = load_split(args.data, domain, "train", nlp, limit=args.limit or None)
    dev = load_split(args.data, domain, "dev", nlp, limit=args.limit or None)
    test = load_split(args.data, domain, "test", nlp, limit=args.limit or None)
    rng = random.Random(args.seed)
    dropped = []
    human = []
    for i, doc in enumerate(train):
        keep = []
        for e in doc.ents:
            if rng.random() < args.drop:
                dropped.append([i, e.start, e.end, e.label_])
            else:
                keep.append(e)
        copy = unannotated(doc)
        copy.set_ents([Span(copy, e.start, e.end, label=e.label_) for e in keep], default="outside")
        human.append(copy)
    half = len(dev) // 2
    pool = [unannotated(d) for d in dev[:half]]
    DocBin(docs=human).to_disk(out / "human.spacy")
    DocBin(docs=train).to_disk(out / "gold.spacy")
    DocBin(docs=pool).to_disk(out / "pool.spacy")
    DocBin(docs=dev[half:]).to_disk(out / "dev.spacy")
    DocBin(docs=test).to_disk(out / "test.spacy")
    total = sum(len(d.ents) for d in train)
    srsly.write_json(out / "dropped.json", {"dropped": dropped, "gold_entities": total, "rate": args.drop})
    print(f"{domain}: dropped {len(dropped)} of {total} train entities; pool {len(pool)}, dev {len(dev) - half}")


def teacher(args, domain, out):
    pipe_dir = out / "teacher"
    if not pipe_dir.exists():
        config = spacy.util.load_config("configs/retrieval.cfg")
        backend = config["components"]["llm_lar_ner"]["backend"]
        backend.update({"engine": args.engine, "adapter": args.adapter.format(domain=domain)})
        if args.engine == "torch":
            backend["parallel"] = None  # the torch engine's own batch
        config["components"]["llm_lar_ner"]["retriever"].update({"k": args.k, "exclude_identical": True})
        config["components"]["llm_lar_ner"]["labels"] = CROSSNER_LABELS[domain].split()
        config["nlp"]["batch_size"] = 256
        nlp = spacy.util.load_model_from_config(config, auto_fill=True)
        nlp.get_pipe("llm_lar_ner").initialize(pool=read_docbin(out / "human.spacy", nlp.vocab))
        nlp.to_disk(pipe_dir)
    cache = out / "teacher_cache.sqlite"
    if not (out / "refined.spacy").exists():
        cli(
            "refine",
            pipe_dir,
            out / "human.spacy",
            out / "refined.spacy",
            "--threshold",
            args.threshold,
            "--batch-size",
            256,
            "--cache",
            cache,
        )
    if not (out / "silver.spacy").exists():
        cli("pre-annotate", pipe_dir, out / "pool.spacy", out / "silver.spacy")
    if not (out / "mixed.spacy").exists():
        cli(
            "mix",
            out / "refined.spacy",
            out / "mixed.spacy",
            "--stats",
            out / "mix_counts.json",
            "--reference-key",
            "refine_human",
            "--llm-weight",
            1.0,
            "--use-confidence",
        )
    if not (out / "teacher.json").exists():
        nlp = spacy.load(pipe_dir)
        gold = read_docbin(out / "test.spacy", nlp.vocab)
        nlp("Warm-up sentence .")
        res = run_and_score(nlp, gold, batch_size=256)
        words = sum(len(g) for g in gold)
        srsly.write_json(
            out / "teacher.json",
            {
                **{k: res[k] for k in ("f1", "p", "r", "seconds", "sentences_per_second")},
                "sentences": len(gold),
                "words_per_second": words / res["seconds"],
            },
        )


def refine_quality(out):
    """Refine's proposed additions (all, and those merged above the threshold) against the dropped entities."""
    dropped = {(i, s, e, lab) for i, s, e, lab in srsly.read_json(out / "dropped.json")["dropped"]}
    docs = list(DocBin().from_disk(out / "refined.spacy").get_docs(spacy.blank("en").vocab))
    proposed = {(i, s.start, s.end, s.label_) for i, d in enumerate(docs) for s in d.spans["refine_additions"]}
    human = {(i, e.start, e.end, e.label_) for i, d in enumerate(docs) for e in d.spans["refine_human"]}
    merged = {(i, e.start, e.end, e.label_) for i, d in enumerate(docs) for e in d.ents} - human

    def prf(found):
        tp = len(found & dropped)
        p = tp / len(found) if found else 0.0
        r = tp / len(dropped) if dropped else 0.0
        return {
            "proposed": len(found),
            "correct": tp,
            "p": 100 * p,
            "r": 100 * r,
            "f1": 200 * p * r / (p + r) if p + r else 0.0,
        }

    scored = [
        ((i, s.start, s.end, s.label_), score)
        for i, d in enumerate(docs)
        for s, score in zip(d.spans["refine_additions"], d.spans["refine_additions"].attrs["scores"])
    ]
    sweep = {str(t): prf({k for k, score in scored if (score or 0) >= t}) for t in (0.5, 0.7, 0.8, 0.9, 0.95)}
    conflicts = sum(len(d.spans["refine_conflicts"]) for d in docs)
    return {
        "all_additions": prf(proposed),
        "merged_additions": prf(merged),
        "threshold_sweep": sweep,
        "dropped": len(dropped),
        "conflicts": conflicts,
    }


def student(args, domain, out, condition, kind):
    train, silver = CONDITIONS[condition]
    folder = out / "students" / f"{kind}_{condition}"
    result = folder / "result.json"
    if result.exists():
        return srsly.read_json(result)
    overrides = [
        "--paths.train",
        out / train,
        "--paths.dev",
        out / "dev.spacy",
        "--vars.max_steps",
        args.steps[kind],
        "--vars.eval_frequency",
        args.eval_every[kind],
        "--training.patience",
        args.patience[kind],
        "--system.seed",
        args.seed,
    ]
    if silver:
        overrides += ["--paths.silver", out / silver]
    if kind == "trf":
        overrides += ["--vars.warmup_steps", args.steps[kind] // 10]
    t0 = time.perf_counter()
    cli("train-student", STUDENTS[kind], folder, *overrides)
    train_seconds = time.perf_counter() - t0
    nlp = spacy.load(folder / "model-best")
    gold = list(DocBin().from_disk(out / "test.spacy").get_docs(nlp.vocab))
    scores = run_and_score(nlp, gold, batch_size=256)
    res = {
        **{k: scores[k] for k in ("f1", "p", "r")},
        "words_per_second": words_per_second(folder, out),
        "train_seconds": train_seconds,
        "test_sentences": len(gold),
    }
    srsly.write_json(result, res)
    print(f"  {domain} {kind} {condition}: F1 {res['f1']:.1f}, {res['words_per_second']:.0f} words/s", flush=True)
    return res


def words_per_second(folder, out):
    """The student's speed over the test split's texts (its own tokenizer included): the median of three runs."""
    nlp = spacy.load(folder / "model-best")
    texts = [g.text for g in DocBin().from_disk(out / "test.spacy").get_docs(nlp.vocab)]
    words = sum(len(nlp.make_doc(t)) for t in texts)
    list(nlp.pipe(texts[:64]))  # warm-up
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        list(nlp.pipe(texts, batch_size=256))
        runs.append(time.perf_counter() - t0)
    return words / sorted(runs)[1]


def speed(args, domain, out):
    """Re-measures every trained student's speed, one after the other on a quiet machine."""
    for result in sorted((out / "students").glob("*/result.json")):
        res = srsly.read_json(result)
        res["words_per_second"] = words_per_second(result.parent, out)
        srsly.write_json(result, res)
        print(f"  {domain} {result.parent.name}: {res['words_per_second']:.0f} words/s", flush=True)


def package(args, domain, out):
    """`spacy package` (wheels) of the students trained on condition (d); their sizes go into the report."""
    sizes = {}
    for kind in args.students:
        model = out / "students" / f"{kind}_d_mixed_pool" / "model-best"
        name = f"student_{domain}_{kind}"
        dest = Path("packages")
        dest.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "spacy", "package", str(model), str(dest), "--name", name, "--version", "0.1.0"]
        subprocess.run([*cmd, "--build", "wheel", "--force"], check=True)
        (wheel,) = (dest / f"en_{name}-0.1.0" / "dist").glob("*.whl")
        sizes[kind] = {"wheel": str(wheel), "megabytes": wheel.stat().st_size / 1e6}
        print(f"  {domain} {kind}: {wheel} {sizes[kind]['megabytes']:.1f} MB", flush=True)
    srsly.write_json(out / "wheels.json", sizes)


def report(args, domains):
    rows = {}
    for domain in domains:
        out = args.out / domain
        rows[domain] = {
            "teacher": srsly.read_json(out / "teacher.json"),
            "refine": refine_quality(out),
            "mix_counts": srsly.read_json(out / "mix_counts.json"),
            "wheels": srsly.read_json(out / "wheels.json") if (out / "wheels.json").exists() else {},
            "students": {
                f"{kind}_{c}": srsly.read_json(out / "students" / f"{kind}_{c}" / "result.json")
                for kind in args.students
                for c in CONDITIONS
                if (out / "students" / f"{kind}_{c}" / "result.json").exists()
            },
        }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    srsly.write_json(args.report, {"settings": {k: str(v) for k, v in vars(args).items()}, "domains": rows})
    lines = [
        "| domain | system | F1 (P / R) | F1 − teacher | words/s | × teacher speed |",
        "|---|---|---|---|---|---|",
    ]
    for domain, r in rows.items():
        t = r["teacher"]
        lines.append(
            f"| {domain} | teacher | {t['f1']:.1f} ({t['p']:.1f} / {t['r']:.1f}) | | {t['words_per_second']:.0f} | 1 |"
        )
        for name, s in r["students"].items():
            lines.append(
                f"| {domain} | {name} | {s['f1']:.1f} ({s['p']:.1f} / {s['r']:.1f}) | {s['f1'] - t['f1']:+.1f} | "
                f"{s['words_per_second']:.0f} | {s['words_per_second'] / t['words_per_second']:.0f} |"
            )
    print("\n".join(lines))
    print(json.dumps({d: r["refine"] for d, r in rows.items()}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--domains", default="politics,science")
    ap.add_argument("--out", type=Path, default=Path("training/annotation_study"))
    ap.add_argument("--report", type=Path, default=Path("metrics/annotation/study.json"))
    ap.add_argument("--stages", default="all", help="prepare,teacher,students,speed,package,report or all")
    ap.add_argument("--students", default="tok2vec,trf")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--drop", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--adapter", default="training/adapter/loo-{domain}-r12.gguf")
    ap.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"], help="the teacher's engine")
    ap.add_argument("--limit", type=int, default=0, help="the first N sentences of each split (0: all)")
    ap.add_argument("--steps-tok2vec", type=int, default=1500, help="tok2vec student: training steps")
    ap.add_argument("--steps-trf", type=int, default=200, help="transformer student: training steps (~1 s each here)")
    args = ap.parse_args()
    args.students = args.students.split(",")
    args.steps = {"tok2vec": args.steps_tok2vec, "trf": args.steps_trf}
    args.eval_every = {"tok2vec": 100, "trf": max(1, args.steps_trf // 3)}
    args.patience = {"tok2vec": 600, "trf": args.steps_trf}
    stages = "prepare,teacher,students,speed,package,report" if args.stages == "all" else args.stages
    domains = args.domains.split(",")
    for domain in domains:
        out = args.out / domain
        out.mkdir(parents=True, exist_ok=True)
        if "prepare" in stages:
            prepare(args, domain, out)
        if "teacher" in stages:
            teacher(args, domain, out)
        if "students" in stages:
            for kind in args.students:
                for condition in args.conditions.split(","):
                    student(args, domain, out, condition, kind)
        if "speed" in stages:
            speed(args, domain, out)
        if "package" in stages:
            package(args, domain, out)
    if "report" in stages:
        report(args, domains)


if __name__ == "__main__":
    main()
