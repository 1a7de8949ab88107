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

MARKERS = {
    "formats": ("<!-- results:start -->", "<!-- results:end -->"),
    "crossner": ("<!-- crossner:start -->", "<!-- crossner:end -->"),
}


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
        mean = lambda key, sel=sel: sum(r[key] for r in sel.values()) / len(sel)
        out.append(
            {
                "system": s,
                "kind": next(iter(sel.values()))["kind"],
                "f1": {d: sel[d]["f1"] for d in sel},
                "average": mean("f1"),
                "n": next(iter(sel.values()))["n"],
                "seconds_per_sentence": mean("seconds_per_sentence"),
                "calls": mean("calls_per_sentence"),
                "prompt_tokens": mean("prompt_tokens_per_sentence"),
                "completion_tokens": mean("completion_tokens_per_sentence"),
            }
        )
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
        lines.append(
            f"| {name} | "
            + " | ".join(f"{s['f1'].get(d, float('nan')):.1f}" for d in domains)
            + f" | {s['average']:.1f} | {sps:.2f} | {s['calls']:.1f} | {s['prompt_tokens']:.0f} "
            f"| {s['completion_tokens']:.0f} |"
        )
    return "\n".join(lines)


def pareto_front(points):
    """The points no other point beats on both cost (lower seconds) and quality (higher F1), cheapest first."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p["seconds_per_sentence"], -p["average"])):
        if p["average"] > best:
            front.append(p)
            best = p["average"]
    return front


ENSEMBLE_MARKERS = {"majority": "^", "weighted": "s", "weighted+validation": "D"}


def crossner_plot(result, path: Path) -> None:
    """One Pareto view: average F1 against seconds per sentence (log), the frontier drawn and named; single
    systems and baselines named, ensembles grouped by vote (marker) and named only on the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, summary = crossner_summary(result)
    front = pareto_front(summary)
    on_front = {s["system"] for s in front}
    fig, ax = plt.subplots(figsize=(9, 6))
    for vote, marker in ENSEMBLE_MARKERS.items():
        group = [s for s in summary if s["kind"] == "ensemble" and s["system"].split(":", 1)[1] == vote]
        ax.scatter(
            [s["seconds_per_sentence"] for s in group],
            [s["average"] for s in group],
            marker=marker,
            color="tab:orange",
            alpha=0.45,
            label=f"ensembles, {vote} vote",
        )
    for kind, style in (("system", dict(marker="o", color="tab:blue")), ("baseline", dict(marker="x", color="k"))):
        group = [s for s in summary if s["kind"] == kind]
        ax.scatter([s["seconds_per_sentence"] for s in group], [s["average"] for s in group], label=f"{kind}s", **style)
    ax.step(
        [s["seconds_per_sentence"] for s in front],
        [s["average"] for s in front],
        where="post",
        color="tab:green",
        lw=1.5,
        label="Pareto frontier",
    )
    named = sorted(
        (s for s in summary if s["kind"] != "ensemble" or s["system"] in on_front), key=lambda s: s["average"]
    )
    for i, s in enumerate(named):
        bold = s["system"] in on_front
        ax.annotate(
            s["system"],
            (s["seconds_per_sentence"], s["average"]),
            fontsize=7 if bold else 6,
            fontweight="bold" if bold else "normal",
            xytext=(4, 3 if bold or i % 2 else -10),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("seconds per sentence (log scale; 2 CPU cores)")
    ax.set_ylabel(f"average strict F1 (first {result['args']['n']} test sentences per domain)")
    ax.set_title("CrossNER, 5 domains: quality against cost")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def write_block(readme: Path, kind: str, table: str) -> None:
    start, end = MARKERS[kind]
    text = readme.read_text()
    block = f"{start}\n{table}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
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
