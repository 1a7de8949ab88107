"""Throughput of corpus annotation on this machine: plain ``nlp.pipe`` against the local and Ray engines, with the
embedded model or llama-cpp-python servers, 1 → 2 actors and 1 → 2 servers; writes metrics/scale.json.

    python benchmarks/scale.py --data ../shared/data --n 200 --out metrics/scale.json

The corpus is the first --n CrossNER politics test sentences in shards of --shard sentences; the pipeline is
llm_lar_ner with 3 fixed demonstrations (Gemma 3 270M). A quiet machine is assumed: servers and actors share its
cores, so the figures say where the machine, not the engine, bounds throughput.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import spacy

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spacy_llmner.scale import annotate_corpus  # noqa: E402

from common import CROSSNER_LABELS, fixed_demonstrations, load_split  # noqa: E402


def save_pipeline(path, labels, demos, backend):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("llm_lar_ner", config={"labels": labels, "backend": backend})
    ner.set_demonstrations(demos)
    nlp.to_disk(path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--shard", type=int, default=25)
    ap.add_argument("--out", default="metrics/scale.json")
    ap.add_argument("--servers-only", action="store_true", help="only the server setups; rows already in --out stay")
    ap.add_argument("--engines", default="local:1,ray:1,ray:2", help="ENGINE:ACTORS setups run (a subset: a quick run)")
    ap.add_argument("--servers", type=int, default=2, help="llama-cpp-python servers started (0: no server setups)")
    args = ap.parse_args()
    engines = [(e, int(c)) for e, c in (x.split(":") for x in args.engines.split(","))]
    import servers

    work = Path(tempfile.mkdtemp(prefix="scale-"))
    blank = spacy.blank("en")
    labels = CROSSNER_LABELS["politics"].split()
    demos = fixed_demonstrations(load_split(args.data, "politics", "train", blank), 3)
    texts = [d.text for d in load_split(args.data, "politics", "test", blank, limit=args.n)]
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(0, len(texts), args.shard):
        (corpus / f"part-{i // args.shard:03d}.txt").write_text("\n".join(texts[i : i + args.shard]) + "\n")
    rows = json.loads(Path(args.out).read_text())["rows"] if args.servers_only and Path(args.out).exists() else []

    def record(name, seconds, **extra):
        rows.append(
            {
                "setup": name,
                "docs": len(texts),
                "seconds": round(seconds, 1),
                "docs_per_second": round(len(texts) / seconds, 3),
                **extra,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    embedded = save_pipeline(work / "embedded", labels, demos, {"@llm_models": "spacy_llmner.LlamaCpp.v1"})
    if not args.servers_only:
        nlp = spacy.load(embedded)
        t0 = time.perf_counter()
        list(nlp.pipe(texts, batch_size=16))
        record("nlp.pipe, embedded model", time.perf_counter() - t0)
        del nlp
    for engine, concurrency in () if args.servers_only else engines:
        out = work / f"out-embedded-{engine}-{concurrency}"
        m = annotate_corpus(embedded, [corpus], out, engine=engine, concurrency=concurrency)
        record(f"{engine} engine, {concurrency} actor(s), embedded model", m["seconds"], manifest_docs=m["docs"])
    procs, urls = [], []
    try:
        for i in range(args.servers):
            (work / f"server{i}").mkdir()
            threads = str(max(1, (os.cpu_count() or 2) // 2))
            proc, url = servers.start_llama_server(
                "gemma3-270m", "gemma", work / f"server{i}", "--n_threads", threads, "--n_ctx", "4096"
            )
            procs.append(proc)
            urls.append(url)
        for n_servers, engine, concurrency in ((1, "local", 1), (1, "ray", 1), (1, "ray", 2), (2, "ray", 2)):
            if n_servers > args.servers or (engine, concurrency) not in engines:
                continue
            backend = {
                "@llm_models": "spacy_llmner.OpenAICompat.v1",
                "base_url": urls[:n_servers],
                "model": "gemma",
                "grammar_field": "llama.cpp",
            }
            path = save_pipeline(work / f"served{n_servers}", labels, demos, backend)
            out = work / f"out-served-{n_servers}-{engine}-{concurrency}"
            m = annotate_corpus(path, [corpus], out, engine=engine, concurrency=concurrency)
            record(
                f"{engine} engine, {concurrency} actor(s), {n_servers} server(s)",
                m["seconds"],
                manifest_docs=m["docs"],
                endpoints=m["endpoints"],
            )
    finally:
        for proc in procs:
            servers.stop(proc)
        try:
            import ray

            ray.shutdown()
        except ImportError:
            pass
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "corpus": f"first {len(texts)} CrossNER politics test sentences, shards of {args.shard}",
        "pipeline": "llm_lar_ner, Gemma 3 270M, 3 fixed demonstrations",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
