"""The distillation study (issue 29): 200 gold sentences, thousands of unlabelled ones, the shipped default pipeline
as the teacher, spaCy students trained on its labels; every figure on the set's full test split.

Per set (answers known for all sentences; all but 200 of the train sentences have their labels removed):
  btc     the Broad Twitter Corpus (CC BY 4.0): test = section F (2,000 tweets, the usual split); train = sections
          A B E G H. Labels PER ORG LOC, given to the teacher as person / organisation / location.
  genia   GENIA 3.02 (CC BY 3.0): outer (longest non-overlapping) spans as flat entities; its own test split.
  conll   CoNLL-2003 English (research-only: a local study, nothing derived ships); eng.testb as test.
From the train sentences, seeded: 200 gold (the teacher's retrieval pool and the students' gold), 500 dev (gold
labels, only to select a student's best checkpoint), the rest the unlabelled pool in a seeded order; pools of
1k / 5k / all are its prefixes.

Stages (each skips what it already wrote under --out/<set>):
  prepare   gold.spacy, dev.spacy, test.spacy, pool.txt, pool_gold.spacy (the pool's own gold labels: the ceiling)
  teacher   the default teacher (spacy_llmner.annotation.distill.default_teacher) annotates the pool and the test
            split's texts, shard by shard (resumable); teacher.json: its test P/R/F1 and sentences/s, words/s
  students  tok2vec students (configs/student.cfg) per condition: gold (200 only), hard_N, partial_N, partial_mix_N
            for each pool size N ("all": the whole pool), check_N and check_mix_N (partial / partial_mix with the
            gold student's second opinion: spans it finds and the teacher does not are missing too), all_gold (200 +
            the pool's gold: the ceiling); trf (configs/student_trf.cfg) for the conditions given by --trf ("best":
            the LLM-assisted one best on dev); each scored on test, timed (words/s, median of 3)
  noise     the --noise conditions' tok2vec students again with --noise-seeds (seeds/<student>/seed<n>): the
            report's seed noise (F1 per seed, standard deviation)
  speed     re-measures every student's words/s (run it alone: training shares the CPU otherwise)
  package   the best tok2vec student (dev F1) and the transformer students as wheels (packages/), sizes recorded
  report    metrics/distill/study.json and study.md

    python benchmarks/distill_study.py --data ../shared/data --sets btc --pools 1000,5000,0 --trf partial_mix_all
"""

import argparse
import random
import statistics
import time
from pathlib import Path

import spacy
import srsly
from spacy.tokens import DocBin

from spacy_llmner.annotation import distill as D
from spacy_llmner.corpora import read_bio, read_jsonl

BTC_LABELS = {"PER": "person", "ORG": "organisation", "LOC": "location"}
CONLL_LABELS = {**BTC_LABELS, "MISC": "misc"}
STUDENT_CONFIGS = {"tok2vec": "configs/student.cfg", "trf": "configs/student_trf.cfg"}


def renamed(docs, names):
    for doc in docs:
        doc.ents = [doc.char_span(e.start_char, e.end_char, label=names.get(e.label_, e.label_)) for e in doc.ents]
    return docs


def load_set(data: Path, name: str, nlp):
    """(train docs, test docs) of a set, gold labels on both."""
    if name == "btc":
        folder = data / "extra" / "btc"
        train = [d for s in "abegh" for d in read_bio(folder / f"{s}.conll", nlp.vocab)]
        return renamed(train, BTC_LABELS), renamed(read_bio(folder / "f.conll", nlp.vocab), BTC_LABELS)
    if name == "genia":
        folder = data / "genia"
        return (read_jsonl(folder / f"genia_nested.{split}.jsonl", nlp) for split in ("train", "test"))
    if name == "conll":
        folder = data / "conll2003"
        return (renamed(read_bio(folder / f, nlp.vocab), CONLL_LABELS) for f in ("eng.train", "eng.testb"))
    if name == "fixture":  # the test suite's smoke run: CrossNER politics fixture files
        folder = data / "crossner" / "politics"
        return read_bio(folder / "train.txt", nlp.vocab), read_bio(folder / "test.txt", nlp.vocab)
    raise SystemExit(f"distill_study: unknown set {name!r}")


def prepare(args, name, out):
    if (out / "pool.txt").exists():
        return
    nlp = spacy.blank("en")
    train, test = load_set(args.data, name, nlp)
    train = [d for d in train if d.text.strip()]
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    gold, dev, pool = order[: args.gold], order[args.gold : args.gold + args.dev], order[args.gold + args.dev :]
    out.mkdir(parents=True, exist_ok=True)
    DocBin(docs=[train[i] for i in gold]).to_disk(out / "gold.spacy")
    DocBin(docs=[train[i] for i in dev]).to_disk(out / "dev.spacy")
    DocBin(docs=[train[i] for i in pool]).to_disk(out / "pool_gold.spacy")
    DocBin(docs=test).to_disk(out / "test.spacy")
    (out / "pool.txt").write_text("".join(train[i].text.replace("\n", " ") + "\n" for i in pool), encoding="utf8")
    print(f"{name}: gold {len(gold)}, dev {len(dev)}, pool {len(pool)}, test {len(test)}", flush=True)


def gold_docs(out, file):
    return D.read_gold(out / file, spacy.blank("en").vocab)


def progress(record):
    state = "already annotated" if record["skipped"] else f"{record['docs']} docs in {record['seconds']:.0f}s"
    print(f"  teacher {record['shard']}: {state}", flush=True)


def teacher(args, name, out):
    """The teacher annotates the pool (its largest size) and the test split's texts; teacher.json scores it."""
    if not (out / "teacher" / "config.cfg").exists():
        gold = gold_docs(out, "gold.spacy")
        labels = sorted({e.label_ for d in gold for e in d.ents})
        D.default_teacher(labels, gold, args.k).to_disk(out / "teacher")
    texts = (out / "pool.txt").read_text(encoding="utf8").splitlines()
    size = max(pool_sizes(args, out).values())
    test = gold_docs(out, "test.spacy")
    test_shards = D.write_shards([d.text for d in test], out / "test_corpus", args.shard_size)
    m_test = D.annotate(out / "teacher", test_shards, out / "test_teacher", args.batch_size, progress)
    pool_shards = D.write_shards(texts[:size], out / "corpus", args.shard_size)
    m_pool = D.annotate(out / "teacher", pool_shards, out / "silver", args.batch_size, progress)
    pred = D.annotated_docs(out / "test_teacher", test_shards, spacy.blank("en").vocab)
    seconds = sum(r.get("seconds", 0.0) for r in m_test["records"])
    words = sum(len(d) for d in pred)
    result = {
        **prf(pred, test),
        "test_sentences": len(test),
        "sentences_per_second": len(test) / seconds,
        "words_per_second": words / seconds,
        "pool_sentences": len(texts[:size]),
        "pool_seconds": sum(r.get("seconds", 0.0) for r in m_pool["records"]),
        "usage_pool": m_pool["usage"],
        "usage_test": m_test["usage"],
    }
    result["pool_sentences_per_second"] = result["pool_sentences"] / max(result["pool_seconds"], 1e-9)
    srsly.write_json(out / "teacher.json", result)
    print(f"{name} teacher: F1 {result['f1']:.1f} at {result['sentences_per_second']:.2f} sentences/s", flush=True)


def prf(pred, gold):
    from spacy.scorer import get_ner_prf
    from spacy.training import Example

    scores = get_ner_prf([Example(p, g) for p, g in zip(pred, gold)])
    return {"p": 100 * scores["ents_p"], "r": 100 * scores["ents_r"], "f1": 100 * scores["ents_f"]}


def pool_sizes(args, out):
    """{name: size} of the pools: "all" for 0, else the size (at most the pool's)."""
    n = len((out / "pool.txt").read_text(encoding="utf8").splitlines())
    return {"all" if p == 0 else str(p): n if p == 0 else min(p, n) for p in args.pools}


def silver_file(args, out, mode, size):
    """The pool's first ``size`` teacher docs as ``mode`` silver (written once)."""
    path = out / "train" / f"silver_{mode}_{size}.spacy"
    if not path.exists():
        texts = (out / "pool.txt").read_text(encoding="utf8").splitlines()
        shards = D.write_shards(texts[: max(pool_sizes(args, out).values())], out / "corpus", args.shard_size)
        docs = D.annotated_docs(out / "silver", shards, spacy.blank("en").vocab)[:size]
        checks = [None] * len(docs)
        if mode == "check":  # the second opinion of the tok2vec student trained on the 200 gold alone
            checks = D.second_opinion(out / "students" / "tok2vec_gold" / "model-best", [d.text for d in docs])
        path.parent.mkdir(parents=True, exist_ok=True)
        silver = [
            D.silver(d, "llm_ner", args.threshold, "hard" if mode == "hard" else "partial", c)[0]
            for d, c in zip(docs, checks)
        ]
        DocBin(docs=silver).to_disk(path)
    return path


def conditions(out, args):
    """condition name → (train DocBin, silver DocBin or None). The check conditions need the gold student
    (students/tok2vec_gold: their second opinion), so it is trained first."""
    sizes = pool_sizes(args, out)
    mixed = out / "train" / "gold_mixed.spacy"
    if not mixed.exists():
        nlp = spacy.load(out / "teacher")
        docs, counts = D.mixed_gold(nlp, gold_docs(out, "gold.spacy"), D.DistillSettings(), "llm_ner")
        mixed.parent.mkdir(parents=True, exist_ok=True)
        DocBin(docs=docs, store_user_data=True).to_disk(mixed)
        srsly.write_json(out / "train" / "mixing.json", counts)
    all_gold = out / "train" / "all_gold.spacy"
    if not all_gold.exists():
        DocBin(docs=gold_docs(out, "gold.spacy") + gold_docs(out, "pool_gold.spacy")).to_disk(all_gold)
    conds = {"gold": (out / "gold.spacy", None)}
    for name, size in sizes.items():
        conds[f"hard_{name}"] = (out / "gold.spacy", silver_file(args, out, "hard", size))
        conds[f"partial_{name}"] = (out / "gold.spacy", silver_file(args, out, "partial", size))
        conds[f"partial_mix_{name}"] = (mixed, silver_file(args, out, "partial", size))
        conds[f"check_{name}"] = (out / "gold.spacy", silver_file(args, out, "check", size))
        conds[f"check_mix_{name}"] = (mixed, silver_file(args, out, "check", size))
    conds["all_gold"] = (all_gold, None)
    return conds


def student(args, name, out, condition, train, silver, kind, seed=None):
    seed = args.seed if seed is None else seed
    folder = out / "students" / f"{kind}_{condition}"
    if seed != args.seed:
        folder = out / "seeds" / folder.name / f"seed{seed}"
    result_path = folder / "result.json"
    if result_path.exists():
        return srsly.read_json(result_path)
    overrides = {
        "paths.train": train,
        "paths.silver": silver,
        "paths.dev": out / "dev.spacy",
        "vars.max_steps": args.steps[kind],
        "vars.eval_frequency": args.eval_every[kind],
        "training.patience": args.patience[kind],
        "system.seed": seed,
    }
    t0 = time.perf_counter()
    D.train_student(STUDENT_CONFIGS[kind], folder, overrides)
    test = gold_docs(out, "test.spacy")
    result = {
        **D.score(folder / "model-best", test),
        "train_seconds": time.perf_counter() - t0,
        "words_per_second": D.words_per_second(folder / "model-best", [d.text for d in test]),
        "test_sentences": len(test),
        "dev_f1": 100 * srsly.read_json(folder / "model-best" / "meta.json")["performance"]["ents_f"],
    }
    srsly.write_json(result_path, result)
    print(f"  {name} {kind} {condition}: F1 {result['f1']:.1f} ({result['words_per_second']:.0f} words/s)", flush=True)
    return result


def students(args, name, out):
    student(args, name, out, "gold", out / "gold.spacy", None, "tok2vec")  # first: the check conditions' opinion
    conds = conditions(out, args)
    dev_f1 = {}
    for condition, (train, silver) in conds.items():
        dev_f1[condition] = student(args, name, out, condition, train, silver, "tok2vec")["dev_f1"]
        if condition in args.trf:
            student(args, name, out, condition, train, silver, "trf")
    if "best" in args.trf:  # the LLM-assisted condition whose tok2vec student has the best dev F1
        best = max((c for c in dev_f1 if c not in ("gold", "all_gold")), key=dev_f1.get)
        student(args, name, out, best, *conds[best], "trf")


def noise(args, name, out):
    """The seed noise: the --noise conditions' tok2vec students again with each of --noise-seeds (same data, other
    initialisation and batch order); the report gives each condition's F1 spread over its seeds."""
    conds = conditions(out, args)
    for condition in args.noise:
        for seed in args.noise_seeds:
            student(args, name, out, condition, *conds[condition], "tok2vec", seed)


def spread(out):
    """condition → {"f1": [seed 0's, the others'...], "sd": sample standard deviation} for conditions with seeds."""
    res = {}
    for folder in sorted((out / "seeds").glob("*")):
        base = out / "students" / folder.name / "result.json"
        f1 = [srsly.read_json(r)["f1"] for r in [base, *sorted(folder.glob("seed*/result.json"))] if r.exists()]
        if len(f1) > 1:
            res[folder.name] = {"f1": f1, "sd": statistics.stdev(f1)}
    return res


def speed(args, name, out):
    """Re-measures every student's words/s, one after another (run it alone: training shares the CPU otherwise)."""
    texts = [d.text for d in gold_docs(out, "test.spacy")]
    for result in sorted((out / "students").glob("*/result.json")):
        res = srsly.read_json(result)
        res["words_per_second"] = D.words_per_second(result.parent / "model-best", texts)
        srsly.write_json(result, res)
        print(f"  {name} {result.parent.name}: {res['words_per_second']:.0f} words/s", flush=True)


def package(args, name, out):
    """The best tok2vec student (by dev F1) and every transformer student as wheels (packages/), with the teacher
    and the set's licences (assets/distill_<set>_meta.json where it exists) in their meta.json; sizes in result.json."""
    results = {r.parent.name: srsly.read_json(r) for r in sorted((out / "students").glob("*/result.json"))}
    tok2vec = [c for c in results if c.startswith("tok2vec_") and c != "tok2vec_all_gold"]
    chosen = [max(tok2vec, key=lambda c: results[c]["dev_f1"])] + [c for c in results if c.startswith("trf_")]
    meta_file = Path("assets") / f"distill_{name}_meta.json"
    meta = srsly.read_json(meta_file) if meta_file.exists() else None
    for cond in chosen:
        if "wheel_megabytes" in results[cond]:
            continue
        model = out / "students" / cond / "model-best"
        D.record_sources(model, None, meta)
        wheel = D.package(model, out / "packages", f"distill_{name}_{cond}".lower(), "0.1.0")
        results[cond]["wheel_megabytes"] = wheel["megabytes"]
        srsly.write_json(out / "students" / cond / "result.json", results[cond])
        print(f"  {name} {cond}: {wheel['wheel']} ({wheel['megabytes']} MB)", flush=True)


def report(args):
    rows = {}
    for name in args.sets:
        out = args.out / name
        if not (out / "teacher.json").exists():
            continue
        t = srsly.read_json(out / "teacher.json")
        rows[name] = {"teacher": t, "students": {}}
        for result in sorted((out / "students").glob("*/result.json")):
            r = srsly.read_json(result)
            r["speedup"] = r["words_per_second"] / t["words_per_second"]
            rows[name]["students"][result.parent.name] = r
        rows[name]["seed_noise"] = spread(out)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    srsly.write_json(args.report, {"settings": {k: str(v) for k, v in vars(args).items()}, "sets": rows})
    lines = ["| set | system | P | R | F1 | words/s | × teacher speed | wheel MB |", "|---" * 8 + "|"]
    for name, row in rows.items():
        t = row["teacher"]
        lines.append(
            f"| {name} | teacher (default pipeline, k = {args.k}) | {t['p']:.1f} | {t['r']:.1f} | {t['f1']:.1f} | "
            f"{t['words_per_second']:.0f} | 1 | |"
        )
        for cond, r in row["students"].items():
            lines.append(
                f"| {name} | {cond} | {r['p']:.1f} | {r['r']:.1f} | {r['f1']:.1f} | {r['words_per_second']:.0f} | "
                f"{r['speedup']:.0f} | {r.get('wheel_megabytes', '')} |"
            )
    for name, row in rows.items():
        for cond, n in row["seed_noise"].items():
            f1 = ", ".join(f"{x:.1f}" for x in n["f1"])
            lines.append(f"\n{name} {cond}: F1 over {len(n['f1'])} seeds {f1} (sd {n['sd']:.1f})")
    args.report.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf8")
    print("\n".join(lines))


def per_kind(text, cast=int):
    a, b = text.split(",")
    return {"tok2vec": cast(a), "trf": cast(b)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--sets", default="btc,genia")
    p.add_argument("--out", type=Path, default=Path("training/distill_study"))
    p.add_argument("--report", type=Path, default=Path("metrics/distill/study.json"))
    p.add_argument("--stages", default="all")
    p.add_argument("--pools", default="1000,5000,0", help="pool sizes (0: all)")
    p.add_argument("--gold", type=int, default=200)
    p.add_argument("--dev", type=int, default=500)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=per_kind, default=per_kind("4000,2000"), help="max_steps: tok2vec,trf")
    p.add_argument("--eval-every", type=per_kind, default=per_kind("200,200"))
    p.add_argument("--patience", type=per_kind, default=per_kind("1200,800"))
    p.add_argument("--trf", default="", help="conditions that also train a transformer student (best: by dev F1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="gold", help="noise stage: the tok2vec conditions trained again with other seeds")
    p.add_argument("--noise-seeds", default="1,2")
    args = p.parse_args()
    args.sets = [s for s in args.sets.split(",") if s]
    args.pools = [int(x) for x in args.pools.split(",")]
    args.trf = [c for c in args.trf.split(",") if c]
    args.noise = [c for c in args.noise.split(",") if c]
    args.noise_seeds = [int(x) for x in args.noise_seeds.split(",") if x]
    every = ["prepare", "teacher", "students", "noise", "speed", "package", "report"]
    stages = every if args.stages == "all" else args.stages.split(",")
    for name in args.sets:
        out = args.out / name
        for stage in ("prepare", "teacher", "students", "noise", "speed", "package"):
            if stage in stages:
                t0 = time.perf_counter()
                globals()[stage](args, name, out)
                print(f"{name} {stage}: {time.perf_counter() - t0:.0f}s", flush=True)
    if "report" in stages:
        report(args)


if __name__ == "__main__":
    main()
