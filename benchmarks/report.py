"""Writes the results tables (docs/results.md) from benchmark output, with the date, machine and models named.

    python benchmarks/report.py formats metrics/formats_politics_parallel1.json metrics/formats_politics_parallel8.json
    python benchmarks/report.py crossner metrics/crossner.json --markdown metrics/crossner.md \\
        --plot metrics/crossner.png --readme docs/results.md
"""

import argparse
import json
import os
import platform
from datetime import date
from pathlib import Path

MARKERS = {"formats": ("<!-- results:start -->", "<!-- results:end -->"),
           "crossner": ("<!-- crossner:start -->", "<!-- crossner:end -->")}


def formats_table(results) -> str:
    result = results[0]
    args = result["args"]
    lines = [
        f"CrossNER {args['domain']} test, first {args['n']} sentences, {args['k']} fixed demonstrations, "
        f"model `{args['model']}`; measured {result.get('date', date.today().isoformat())} on "
        f"{result.get('machine', platform.machine())}, {os.cpu_count()} cores, no GPU.",
        "",
        "| format | decoding | parallel | F1 | P | R | sentences/s | prompt tokens/sent | completion tokens/sent "
        "| hallucinated spans |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for res in results for r in res["rows"]]
    for r in sorted(rows, key=lambda r: (r["format"] != "lines", r["format"], r["constrained"], r.get("parallel", 1))):
        lines.append(
            f"| {r['format']} | {'grammar' if r['constrained'] else 'free'} | {r.get('parallel', 1)} | "
            f"{r['f1']:.1f} | {r['p']:.1f} | "
            f"{r['r']:.1f} | {r['sentences_per_second']:.2f} | {r['prompt_tokens_per_sentence']:.0f} | "
            f"{r['completion_tokens_per_sentence']:.1f} | {r['hallucinated']} |"
        )
    return "\n".join(lines)


def crossner_summary(result):
    """Per system: F1 per domain, average, and cost averaged over domains."""
    rows = result["rows"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    out = []
    for s in systems:
        sel = {r["domain"]: r for r in rows if r["system"] == s}
        if not sel:
            continue
        mean = lambda key: sum(r[key] for r in sel.values()) / len(sel)  # noqa: E731
        out.append({"system": s, "kind": next(iter(sel.values()))["kind"], "f1": {d: sel[d]["f1"] for d in sel},
                    "average": mean("f1"), "n": next(iter(sel.values()))["n"],
                    "seconds_per_sentence": mean("seconds_per_sentence"),
                    "calls": mean("calls_per_sentence"), "prompt_tokens": mean("prompt_tokens_per_sentence"),
                    "completion_tokens": mean("completion_tokens_per_sentence")})
    return domains, out


def crossner_table(result) -> str:
    args = result["args"]
    domains, summary = crossner_summary(result)
    lines = [
        f"CrossNER test, first {args['n']} sentences per domain (spacy-llm NER.v3: first {args.get('baseline_n')}); "
        f"ensemble weights fitted on the first {args['dev_n']} dev sentences; strict micro F1. "
        f"Measured {result['date']} on {result['machine']}; models: {', '.join(result['models'].values())}. "
        f"Written by `benchmarks/report.py` from `metrics/crossner.json`.",
        "",
        "| system | " + " | ".join(domains) + " | average | sentences/s | LLM calls/sent | prompt tok/sent "
        "| gen tok/sent |",
        "|---|" + "---|" * (len(domains) + 5),
    ]
    for s in summary:
        name = f"**{s['system']}**" if s["kind"] == "ensemble" else s["system"]
        sps = 1 / s["seconds_per_sentence"] if s["seconds_per_sentence"] else float("inf")
        lines.append(f"| {name} | " + " | ".join(f"{s['f1'].get(d, float('nan')):.1f}" for d in domains)
                     + f" | {s['average']:.1f} | {sps:.2f} | {s['calls']:.1f} | {s['prompt_tokens']:.0f} "
                     f"| {s['completion_tokens']:.0f} |")
    return "\n".join(lines)


def crossner_plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, summary = crossner_summary(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / len(summary)
    for i, s in enumerate(summary):
        xs = [j + i * width for j in range(len(domains))]
        left.bar(xs, [s["f1"].get(d, 0) for d in domains], width, label=s["system"])
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    left.set_ylabel("strict F1")
    left.set_title("F1 per domain")
    left.legend(fontsize=6, ncol=2)
    for s in summary:
        right.scatter(s["seconds_per_sentence"], s["average"], marker="s" if s["kind"] == "ensemble" else "o")
        right.annotate(s["system"], (s["seconds_per_sentence"], s["average"]), fontsize=6)
    right.set_xscale("log")
    right.set_xlabel("seconds per sentence (log; 2 CPU cores)")
    right.set_ylabel("average F1")
    right.set_title("F1 vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_block(readme: Path, kind: str, table: str) -> None:
    start, end = MARKERS[kind]
    text = readme.read_text()
    block = f"{start}\n{table}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=sorted(MARKERS))
    ap.add_argument("results", nargs="+")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--readme", default="docs/results.md")
    args = ap.parse_args()
    results = [json.loads(Path(p).read_text()) for p in args.results]
    if args.kind == "formats":
        table = formats_table(results)
    else:
        table = crossner_table(results[0])
        if args.plot:
            crossner_plot(results[0], Path(args.plot))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.readme:
        write_block(Path(args.readme), args.kind, table)
    print(table)


if __name__ == "__main__":
    main()
