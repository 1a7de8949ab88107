"""Writes the README's generated tables from metrics/*.json, so that its figures are the measured ones.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in README.md; its rows come from
benchmark outputs (``benchmarks/finetune.py --batched`` files: per domain, per system, F1 / P / R and speed) and
each row names the command line that produced it. ``--check`` writes nothing and exits 1 where README.md differs
from what the metrics give (the test suite runs it).

    python scripts/readme_tables.py            # rewrite the tables in README.md
    python scripts/readme_tables.py --check    # are they up to date?
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (row label, metrics file, the engine that ran it[, what its command needs today to run as it ran then])
QUALITY = [
    (
        "with the shipped adapter `ner-v2` (the default: demonstrations read in parallel, int8 products on a CPU, "
        "128 rows decoded together, `nlp.pipe` batches of 1,000)",
        "metrics/speed/full_test_v2_k3_kept_pieces_amd_epyc_zen4.json",
        "torch (transformers)",
    ),
    (
        "the same, the code before 2026-12-07 (c413ee6: the whole-vocabulary grammar mask at every step, every "
        "demonstration searched for its pieces again), the same hour",
        "metrics/speed/full_test_v2_k3_before_kept_pieces_amd_epyc_zen4.json",
        "torch (transformers)",
    ),
    (
        "the same, 64 rows and batches of 256 (the defaults until 2026-12-06), another day",
        "metrics/speed/full_test_v2_k3_before_wider_amd_epyc_zen4.json",
        "torch (transformers)",
        "--parallel 64",
    ),
    (
        'the same, bfloat16 products (`dtype = "bfloat16"`; the default until 2026-12-06)',
        "metrics/speed/full_test_v2_k3_parallel_amd_epyc_zen4_lark.json",
        "torch (transformers)",
        "--dtype bfloat16 --parallel 64",
    ),
    (
        'the same, demonstrations read in sequence (the default until 2026-12-06; now `demonstrations = "sequential"`)',
        "metrics/real_use.json",
        "torch (transformers)",
    ),
    (
        "the default on an AVX2-only CPU (AMD EPYC Zen 3, another day): float32 products, demonstrations kept by "
        "next use (3de9d52)",
        "metrics/speed/engine/avx2/full_test_v2_k3_amd_epyc_zen3_store.json",
        "torch (transformers)",
    ),
    ("base model (`adapter = null`)", "metrics/speed/full_test_base_k3.json", "torch (hand-written, 8380660)"),
    (
        "`ner-v2`, sentences and retrieval pool lower-cased",
        "metrics/speed/full_test_v2_k3_lower.json",
        "torch (hand-written, 8380660)",
    ),
]
DOMAINS = ("politics", "science", "music", "literature", "ai")


def summary(path: Path) -> dict:
    """Averages over domains (F1, P, R: each domain's micro figures, averaged) and seconds per sentence (all the
    run's seconds over all its sentences) of the one system in a benchmarks/finetune.py output, or of the
    sentence-per-Doc rows of benchmarks/real_use.py's paragraphs section (no speed: that run shares its machine)."""
    data = json.loads(path.read_text())
    if path.name == "real_use.json":
        rows = [data["rows"][f"paragraphs/{d}/sentences/cased@ner-v2"] for d in DOMAINS]
        return {
            **{m: sum(r[m] for r in rows) / len(rows) for m in ("f1", "p", "r")},
            "sentences": sum(r["docs"] for r in rows),
            "seconds_per_sentence": None,
            "command": "python benchmarks/real_use.py --sections paragraphs --variants cased",
        }
    rows = [systems[name] for systems in data["domains"].values() for name in systems]
    n = len(rows)
    seconds = sum(r["sentences"] / r["sentences_per_second"] for r in rows)
    return {
        "f1": sum(r["f1"] for r in rows) / n,
        "p": sum(r["p"] for r in rows) / n,
        "r": sum(r["r"] for r in rows) / n,
        "sentences": sum(r["sentences"] for r in rows),
        "seconds_per_sentence": seconds / sum(r["sentences"] for r in rows),
        "command": command(data["args"]),
    }


def command(args: dict) -> str:
    """The benchmarks/finetune.py command line that wrote a file, from the arguments it recorded."""
    parts = [
        "python benchmarks/finetune.py --batched",
        f"--batch-size {args['batch_size']}",
        f"--k {args['k']}",
        f"--n {args['n']}",
    ]
    parts += [f"--system {s}" for s in args["system"]]
    if args.get("lower"):
        parts.append("--lower")
    if args.get("demonstrations"):
        parts.append(f"--demonstrations {args['demonstrations']}")
    if args.get("dtype"):
        parts.append(f"--dtype {args['dtype']}")
    return " ".join(parts)


def seconds(s: dict) -> str:
    return "—" if s["seconds_per_sentence"] is None else f"{s['seconds_per_sentence']:.2f}"


def quality_table(root: Path) -> str:
    lines = [
        "| Gemma 3 270M | avg F1 (P / R) | seconds / sentence | sentences | engine | produced by |",
        "|---|---|---|---|---|---|",
    ]
    for i, (label, file, engine, *then) in enumerate(QUALITY):
        s = summary(root / file)
        s["command"] = " ".join([s["command"], *then])
        f1 = f"**{s['f1']:.1f}**" if i == 0 else f"{s['f1']:.1f}"  # the default pipeline
        lines.append(
            f"| {label} | {f1} ({s['p']:.1f} / {s['r']:.1f}) | {seconds(s)} | {s['sentences']:,} "
            f"| {engine} | `{s['command']}` → `{file}` |"
        )
    return "\n".join(lines)


EXTRA = [  # (set, how its test sentences were chosen)
    ("wikigold", "held-out 30 %"),
    ("btc", "test section f"),
    ("sec_filings", "test"),
    ("anem", "test"),
    ("re3d", "held-out 30 %"),
]


# the extra table's row-key suffixes
EXTRA_COLUMNS = (
    "@ner-v2",
    "@ner-v2+fit",
    "@ner-v2+fit+spacy+sources",
    "@ner-v2+tuned",
    "@ner-v2+tuned+fit",
    "@ner-v2+tuned+fit+spacy",
    "/spacy",
)
# the variants that use the pool, as the dev choice names them (each has rows on the 150 dev sentences too)
DEV_CHOICES = (
    ("@ner-v2+fit", "fit"),
    ("@ner-v2+fit+spacy", "fit ∪ spaCy"),
    ("@ner-v2+tuned", "tuned"),
    ("@ner-v2+tuned+fit", "tuned + fit"),
    ("@ner-v2+tuned+fit+spacy", "tuned + fit ∪ spaCy"),
)


def chosen_on_dev(rows, name: str, variant: str):
    """(test row, its short name) of the pool-using variant with the best F1 on the set's dev sentences (rows
    ``extra-dev/...``), among those measured on both; None where none is."""
    both = [
        (rows[f"extra-dev/{name}/{variant}{suffix}"]["f1"], suffix, short)
        for suffix, short in DEV_CHOICES
        if f"extra-dev/{name}/{variant}{suffix}" in rows and f"extra/{name}/{variant}{suffix}" in rows
    ]
    if not both:
        return None
    _, suffix, short = max(both)
    return rows[f"extra/{name}/{variant}{suffix}"], short


def extra_table(root: Path) -> str:
    """benchmarks/real_use.py's extra sets, cased and (where measured) lower-cased: the default pipeline, the same
    fitted to its pool (--pool-fit), that united with spaCy's model with the union's sources chosen per label on dev
    sentences (--union-spacy --union-sources), the adapter tuned further on the pool (--pool-tune) alone, fitted, and
    fitted and united with spaCy's model, the one of the pool-using variants best on the set's dev sentences (its test
    F1: a choice a user can make without the test split), and spaCy's tok2vec trained on the same 200 sentences; the
    best F1 of a row in bold."""
    rows = json.loads((root / "metrics" / "real_use.json").read_text())["rows"]
    lines = [
        "| set (test sentences) | `ner-v2`, k = 3 | + pool fit (`configs/pool_fit.cfg`) "
        "| + fit, united with spaCy's, sources per label chosen on 150 dev sentences (`configs/pool_student.cfg`) "
        "| `ner-v2` tuned further on the pool (`configs/finetune_pool.cfg`) | tuned + pool fit "
        "| tuned + fit, united with spaCy's | ours, the variant best on the 150 dev sentences (test F1, which) "
        "| spaCy tok2vec on the same 200 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, shown in (("cased", ""), ("lower", ", lower-cased")):
        for name, split in EXTRA:
            cells = [rows.get(f"extra/{name}/{variant}{suffix}") for suffix in EXTRA_COLUMNS]
            if not any(cells):
                continue
            best = max(c["f1"] for c in cells if c)
            text = [
                "—"
                if c is None
                else (f"**{c['f1']:.1f}**" if c["f1"] == best else f"{c['f1']:.1f}") + f" ({c['p']:.1f} / {c['r']:.1f})"
                for c in cells
            ]
            chosen = chosen_on_dev(rows, name, variant)
            text.insert(-1, "—" if chosen is None else f"{chosen[0]['f1']:.1f} ({chosen[1]})")
            n = next(c["docs"] for c in cells if c)
            lines.append(f"| {name}{shown} ({n:,}, {split}) | " + " | ".join(text) + " |")
    return "\n".join(lines)


TABLES = {"quality": quality_table, "extra": extra_table}


def render(readme: str, root: Path) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"readme_tables: README.md has no <!-- table:{name} --> ... <!-- /table:{name} --> block")
        table = make(root)
        readme = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), readme)
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the metrics give")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (README.md and metrics/)")
    args = parser.parse_args(argv)
    path = args.root / "README.md"
    old = path.read_text(encoding="utf8")
    new = render(old, args.root)
    if args.check:
        if new != old:
            print("readme_tables: README.md's tables differ from metrics/: run python scripts/readme_tables.py")
            return 1
        print("readme_tables: up to date")
        return 0
    path.write_text(new, encoding="utf8")
    print(f"readme_tables: wrote {', '.join(TABLES)} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
