"""How long `make demo`'s command takes to its first result, as after an install: each run launches the command in a
fresh process with an empty ``HOME`` (so the packaged model is assembled again and nothing cached is found) and
times, from the launch, the first entity line it prints, its own "first result after" (counted from after its
``import spacy``) and its exit. Medians of --runs runs, one after another.

    python benchmarks/startup.py --runs 5 --out metrics/speed/startup/demo.json --label "main at <commit>"
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [  # the Makefile's `demo` target
    "-m",
    "spacy_llmner.cli",
    "annotate",
    "assets/sample_texts.txt",
    "--demonstrations",
    "assets/demonstrations.jsonl",
    "--labels",
    "person,organisation,location,event",
]


def one_run(python: str) -> dict:
    home, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    try:
        env = {**os.environ, "HOME": home, "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        proc = subprocess.Popen(
            [python, *COMMAND, "--output", out], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        first, cli = None, None
        for line in proc.stdout:
            if first is None and line.startswith("    '"):  # an entity line: its text, then its label
                first = time.perf_counter() - started
            if "first result after " in line:
                cli = float(line.split("first result after ")[1].split("s;")[0])
        if proc.wait() != 0:
            raise SystemExit(f"startup: the demo command exited {proc.returncode}")
        if first is None:
            raise SystemExit("startup: the demo command printed no entity")
        return {
            "first_entity_s": round(first, 2),
            "cli_first_result_s": cli,
            "exit_s": round(time.perf_counter() - started, 2),
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python", default=sys.executable, help="the interpreter of the environment to measure")
    ap.add_argument("--out", default=None, help="a JSON file for the runs and their medians")
    ap.add_argument("--label", default="", help="what was measured (the code, the machine's state), kept in --out")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.python))
        print(f"run {i + 1}: {runs[-1]}", flush=True)
    medians = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
    print(f"medians of {len(runs)}: {medians}")
    if args.out:
        record = {
            "command": "python " + " ".join(COMMAND),
            "label": args.label,
            "runs": runs,
            "median": medians,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "date": datetime.date.today().isoformat(),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf8")


if __name__ == "__main__":
    main()
