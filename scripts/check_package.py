"""Installs a packaged pipeline wheel into a fresh virtual environment and loads it offline.

The pipeline wheel (``spacy package --build wheel``) requires ``spacy-llmner``, which is installed from the wheel
in --dist (``pip wheel . --no-deps``). ``--deps fresh`` installs every other dependency from the package index (the
real first-install experience; minutes); ``--deps <site-packages>`` points the new environment at an existing
site-packages instead (a quick check of the wheels themselves, as the tests do).
Then, with HF_HUB_OFFLINE=1 and from outside the repository: ``spacy.load(name)`` annotates a sentence.
Writes the wheel's size, install and load times and the entities found to --out.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import spacy
nlp = spacy.load(sys.argv[1])
loaded = time.perf_counter() - t0
doc = nlp("Angela Merkel met Emmanuel Macron in Paris to talk about the European Union.")
import spacy_llmner
print(json.dumps({"load_seconds": loaded, "first_doc_seconds": time.perf_counter() - t0 - loaded,
                  "pipeline": nlp.pipe_names, "entities": [[e.text, e.label_] for e in doc.ents],
                  "spacy_llmner_from": spacy_llmner.__file__}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("packages", help="folder spacy package wrote to")
    ap.add_argument("--name", required=True, help="the package name (lang_name, e.g. en_llmner_demo)")
    ap.add_argument("--dist", default="packages/dist", help="folder holding the spacy-llmner wheel")
    ap.add_argument("--deps", default="fresh", help="'fresh', or a site-packages providing the other dependencies")
    ap.add_argument("--out", default="metrics/package_check.json")
    args = ap.parse_args()
    wheels = sorted(glob.glob(f"{args.packages}/**/{args.name}-*.whl", recursive=True))
    ours = sorted(glob.glob(f"{args.dist}/spacy_llmner-*.whl"))
    if not wheels or not ours:
        sys.exit(
            f"no wheel found: pipeline {wheels or 'missing'} in {args.packages}, spacy-llmner {ours or 'missing'}"
            f" in {args.dist}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        t0 = time.perf_counter()
        if args.deps != "fresh":
            pip = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[-1], ours[-1]]
            subprocess.run(pip, check=True)
            site = subprocess.run(
                [py, "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True, text=True
            ).stdout.strip()
            # appended after the venv's own site-packages: the wheels just installed win over anything there
            Path(site, "zz_reused_deps.pth").write_text(str(Path(args.deps).resolve()) + "\n")
        else:
            links = ["--find-links", "/opt/wheels"] if os.path.isdir("/opt/wheels") else []
            subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
            subprocess.run(
                [py, "-m", "pip", "install", "-q", *links, "--find-links", args.dist, wheels[-1]], check=True
            )
        installed = time.perf_counter() - t0
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        res = subprocess.run([py, "-c", PROBE, args.name], capture_output=True, text=True, cwd=tmp, env=env)
        if res.returncode != 0:
            sys.exit(f"loading {args.name} in the fresh environment failed:\n{res.stderr[-3000:]}")
        probe = json.loads(res.stdout.strip().splitlines()[-1])
    if not probe["spacy_llmner_from"].startswith(str(venv)):
        sys.exit(f"spacy_llmner was imported from {probe['spacy_llmner_from']}, not from the installed wheel")
    report = {
        "wheel": Path(wheels[-1]).name,
        "wheel_bytes": os.path.getsize(wheels[-1]),
        "spacy_llmner_wheel_bytes": os.path.getsize(ours[-1]),
        "install_seconds": installed,
        "dependencies": "installed from the index" if args.deps == "fresh" else "reused",
        **probe,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
