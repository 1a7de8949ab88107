"""Writes the README's results table from benchmark output (metrics/formats_*.json), with date, machine and model.

    python benchmarks/report.py metrics/formats_politics_parallel1.json metrics/formats_politics_parallel8.json
"""

import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def table(results) -> str:
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


def main():
    results = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    readme = Path("README.md")
    text = readme.read_text()
    block = f"{START}\n{table(results)}\n{END}"
    if START in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.replace("RESULTS_TABLE", block)
    readme.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
