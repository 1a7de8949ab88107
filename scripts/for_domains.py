"""Runs one command per domain (weasel commands have no loops): ``{domain}`` in the command is replaced.
Skips a domain whose ``--creates`` path (with ``{domain}`` replaced) already exists, so reruns are incremental.

    python scripts/for_domains.py politics,science --creates training/{domain}_baseline/model-best -- \\
        python -m spacy train configs/tok2vec_ner.cfg --paths.train corpus/{domain}/train.spacy ...
"""

import subprocess
import sys
from pathlib import Path


def main(argv):
    if "--" not in argv:
        sys.exit("usage: for_domains.py DOMAINS [--creates PATH] -- COMMAND ...")
    split = argv.index("--")
    head, command = argv[:split], argv[split + 1 :]
    domains = head[0].split(",")
    creates = head[head.index("--creates") + 1] if "--creates" in head else None
    for domain in domains:
        if creates and Path(creates.format(domain=domain)).exists():
            print(f"[{domain}] {creates.format(domain=domain)} exists: skipped", flush=True)
            continue
        cmd = [sys.executable if part == "python" else part.replace("{domain}", domain) for part in command]
        print(f"[{domain}] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
