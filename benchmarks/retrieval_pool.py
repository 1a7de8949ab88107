"""Pool scale: build time, load time, query latency and memory of a 100,000-sentence pool.

Encodes CoNLL-2003 train (CrossNER relabelling, 14,041 sentences) for real, then tiles it to --size sentences
(the synthetic pool the issue allows), saves, reloads memory-mapped and queries it with every strategy.

    python benchmarks/retrieval_pool.py --data ../shared/data --size 100000
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from spacy_llmner.corpora import read_bio
from spacy_llmner.demonstrations import load_demonstrations
from spacy_llmner.retrieval import Pool, Retriever

from common import blank


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tile(pool: Pool, size: int) -> Pool:
    reps = -(-size // len(pool))
    n = len(pool)

    def offsets(off):
        sizes = np.tile(np.diff(off), reps)[:size]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    piece_off, span_off = offsets(pool.piece_offsets), offsets(pool.span_offsets)
    return (
        Pool(
            (pool.demonstrations * reps)[:size],
            sentence=np.tile(pool.sentence, (reps, 1))[:size],
            pieces=np.tile(pool.pieces, (reps, 1))[: piece_off[-1]],
            piece_ids=np.tile(pool.piece_ids, reps)[: piece_off[-1]],
            piece_offsets=piece_off,
            spans=np.tile(pool.spans, (reps, 1))[: span_off[-1]],
            span_offsets=span_off,
        )
        if size > n
        else pool
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--size", type=int, default=100000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--out", default="metrics/retrieval_pool.json")
    ap.add_argument("--tmp", default="/tmp/spacy_llmner_pool")
    ap.add_argument("--query-only", action="store_true", help="load the saved pool and query it (fresh process)")
    args = ap.parse_args()
    if args.query_only:
        return query_only(args)
    nlp = blank()
    train = read_bio(Path(args.data) / "crossner/conll2003/train.txt", nlp.vocab)
    queries = [d.text for d in read_bio(Path(args.data) / "crossner/conll2003/test.txt", nlp.vocab)[: args.queries]]
    demos = load_demonstrations(train)
    r = Retriever("word", k=8)
    t0 = time.perf_counter()
    r.build(demos)
    build_s = time.perf_counter() - t0
    big = tile(r.pool, args.size)
    big.to_disk(args.tmp)
    disk_mb = sum(f.stat().st_size for f in Path(args.tmp).iterdir()) / 2**20
    t0 = time.perf_counter()
    loaded = Pool.from_disk(args.tmp)
    load_s = time.perf_counter() - t0
    result = {
        "real_sentences_encoded": len(r.pool),
        "build_seconds": build_s,
        "build_sentences_per_second": len(r.pool) / build_s,
        "pool_size": len(loaded),
        "disk_mb": disk_mb,
        "load_seconds": load_s,
        "strategies": {},
    }
    for strategy in ("sentence", "bm25", "word", "span", "random"):
        q = Retriever(strategy, k=8)
        q.encoder, q.pool = r.encoder, loaded
        q.retrieve(queries[:2])  # warm-up: BM25 index build, model load
        t0 = time.perf_counter()
        q.retrieve(queries[:2])
        one = []
        for text in queries:
            t1 = time.perf_counter()
            q.retrieve([text])
            one.append(time.perf_counter() - t1)
        t0 = time.perf_counter()
        q.retrieve(queries)
        batch = time.perf_counter() - t0
        result["strategies"][strategy] = {
            "median_ms_per_query": 1000 * statistics.median(one),
            "batched_ms_per_query": 1000 * batch / len(queries),
        }
        print(strategy, result["strategies"][strategy], flush=True)
    result["peak_rss_mb_build_process"] = rss_mb()
    # Memory of a pipeline that loads the saved pool and queries it, measured in a fresh process.
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--query-only",
            "--data",
            args.data,
            "--tmp",
            args.tmp,
            "--queries",
            str(args.queries),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result["query_process"] = json.loads(out.stdout.strip().splitlines()[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def query_only(args):
    nlp = blank()
    queries = [d.text for d in read_bio(Path(args.data) / "crossner/conll2003/test.txt", nlp.vocab)[: args.queries]]
    base = rss_mb()
    t0 = time.perf_counter()
    pool = Pool.from_disk(args.tmp)
    load_s = time.perf_counter() - t0
    r = Retriever("word", k=8)
    r.pool = pool
    r.retrieve(queries)
    after_encoder = rss_mb()
    res = {"load_seconds": load_s, "rss_mb_before_load": base, "peak_rss_mb_after_word_queries": after_encoder}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
