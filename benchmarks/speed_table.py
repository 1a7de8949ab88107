"""The speed table of docs/speed.md from benchmarks/finetune.py outputs (metrics/speed/*.json): per system, F1,
sentences/s, tokens per sentence (prompt as the prompts hold them; evaluated through the body, padding and shared
prefix once; generated), GFLOP per sentence, achieved GFLOP/s and its share of the machine's bf16 matrix-product
peak measured in the same run.

    python benchmarks/speed_table.py metrics/speed/same_run_k3_n20.json metrics/speed/full_test_k0.json
"""

import json
import sys


def rows(path):
    data = json.load(open(path))
    args = data["args"]
    n = "all" if not args["n"] else f"first {args['n']}/domain"
    peak = data["peak_gflops"]["bfloat16"]
    for name, avg in data["average"].items():
        per = [d[name] for d in data["domains"].values()]
        if all("sentences" in d for d in per):  # throughput over all sentences, not the mean of the domains' rates
            avg = dict(
                avg,
                sentences_per_second=sum(d["sentences"] for d in per)
                / sum(d["sentences"] / d["sentences_per_second"] for d in per),
            )
        # the engine's counters; files written before they were prefixed with engine_ hold them unprefixed (their
        # prompt_tokens_per_sentence is then the torch engine's: the shared prefix once)
        avg = {**{k[len("engine_") :]: v for k, v in avg.items() if k.startswith("engine_")}, **avg}
        gflops = avg.get("achieved_gflops")
        yield (
            f"| {name} | {args['split']} {n}{' lower-cased' if args.get('lower') else ''} | k = {args['k']} "
            f"| {avg['f1']:.1f} ({avg['p']:.1f} / {avg['r']:.1f}) | {avg['sentences_per_second']:.2f} "
            f"| {avg['prompt_tokens_per_sentence']:.0f} / {avg.get('evaluated_tokens_per_sentence', 0):.0f} / "
            f"{avg['completion_tokens_per_sentence']:.0f} | {avg.get('gflop_per_sentence', 0):.0f} "
            f"| {gflops or 0:.0f} ({100 * (gflops or 0) / peak:.0f} % of {peak:.0f}) |"
        )


def main():
    print(
        "| system | sentences | demos | F1 (P / R) | sent/s | tokens/sent: prompt / evaluated / generated "
        "| GFLOP/sent | achieved GFLOP/s (share of bf16 peak) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        for row in rows(path):
            print(row)


if __name__ == "__main__":
    main()
