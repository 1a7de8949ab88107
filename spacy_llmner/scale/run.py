"""The engines behind ``annotate_corpus``: each uncommitted shard is read, annotated by the saved pipeline and
committed (``shards.commit``); the manifest sums what every shard's record says. ``local`` runs in this process;
``ray`` runs shards as tasks of a Ray Data actor pool (one ``spacy.load`` per actor, actors restarted and tasks
retried when a node dies: a lost shard is redone, a committed one is never written twice)."""

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ..usage import Usage
from .shards import Shard, commit, committed, list_shards, read_texts


def endpoint_stats(nlp) -> Dict[str, Dict[str, float]]:
    """Per server URL, what the pipeline's OpenAI-compatible backends sent there (cumulative in this process)."""
    from ..backends.cache import CachedBackend
    from ..backends.openai_compat import OpenAICompatBackend
    from ..component import LLMNER

    out: Dict[str, Dict[str, float]] = {}
    for _, proc in nlp.components:
        if isinstance(proc, LLMNER):
            backend = proc.backend.backend if isinstance(proc.backend, CachedBackend) else proc.backend
            if isinstance(backend, OpenAICompatBackend):
                for url, counts in backend.endpoints.stats().items():
                    mine = out.setdefault(url, {})
                    for key, value in counts.items():
                        if key != "in_service":
                            mine[key] = mine.get(key, 0) + value
    return out


def _difference(after: Dict[str, Dict[str, float]], before: Dict[str, Dict[str, float]]) -> Dict:
    return {url: {k: v - before.get(url, {}).get(k, 0) for k, v in counts.items()} for url, counts in after.items()}


def annotate_shard(nlp, shard: Shard, output: Path, batch_size: int = 16, worker: str = "local") -> Dict[str, Any]:
    """Annotates one shard and commits it (or returns its record if it is already committed)."""
    done = committed(output, shard)
    if done is not None:
        return {**done, "skipped": True}
    texts = read_texts(shard.path, nlp.vocab)
    before, t0 = endpoint_stats(nlp), time.perf_counter()
    docs = list(nlp.pipe(texts, batch_size=batch_size))
    usage: Dict[str, Usage] = {}
    for doc in docs:
        for name, counts in (doc._.llm_ner_usage or {}).items():
            usage.setdefault(name, Usage()).add(Usage(**counts))
    record = {
        "seconds": time.perf_counter() - t0,
        "worker": worker,
        "usage": {name: u.to_dict() for name, u in usage.items()},
        "endpoints": _difference(endpoint_stats(nlp), before),
    }
    return {**commit(output, shard, docs, record), "skipped": False}


class ShardWorker:
    """A Ray Data actor: loads the pipeline once, then annotates one shard per row of its batches."""

    def __init__(self, pipeline: str, output: str, batch_size: int = 16):
        import os

        import ray
        import spacy

        self.nlp = spacy.load(pipeline)
        self.output = Path(output)
        self.batch_size = batch_size
        self.worker = f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"  # the Ray node and process

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        records = []
        for path, name in zip(batch["path"], batch["name"]):
            shard = Shard(str(path), str(name))
            records.append(json.dumps(annotate_shard(self.nlp, shard, self.output, self.batch_size, self.worker)))
        return {"record": records}


def _run_ray(
    pipeline: str,
    shards: List[Shard],
    output: Path,
    concurrency: int,
    batch_size: int,
    address: Optional[str],
    progress: Callable[[Dict], None],
) -> List[Dict]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    ds = ray.data.from_items([{"path": s.path, "name": s.name} for s in shards], override_num_blocks=len(shards))
    done = ds.map_batches(
        ShardWorker,
        fn_constructor_kwargs={"pipeline": pipeline, "output": str(output), "batch_size": batch_size},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1,
        # Ray Data's actor pools restart a lost actor elsewhere and retry its task there, without limit (its
        # defaults, max_restarts = max_task_retries = -1): a shard on a dead node is redone, then committed once
    )
    records = []
    for row in done.iter_rows():  # as shards finish, on whichever actor
        records.append(json.loads(row["record"]))
        progress(records[-1])
    return records


def annotate_corpus(
    pipeline: Union[str, Path],
    inputs: Sequence[Union[str, Path]],
    output: Union[str, Path],
    engine: str = "local",
    concurrency: int = 1,
    batch_size: int = 16,
    address: Optional[str] = None,
    progress: Optional[Callable[[Dict], None]] = None,
) -> Dict[str, Any]:
    """Annotates every input shard not yet committed under ``output`` with the saved ``pipeline``; writes and
    returns the manifest (``output/manifest.json``): per shard its record, and totals — docs, docs/s over the
    run's wall time, LLM calls, tokens, failures per component and per server. ``progress(record)`` is called as
    each shard is done (or found committed)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    shards = list_shards(inputs)
    progress = progress or (lambda record: None)
    t0 = time.perf_counter()
    if engine == "ray":
        records = _run_ray(str(pipeline), shards, output, concurrency, batch_size, address, progress)
    elif engine == "local":
        import spacy

        nlp = spacy.load(pipeline)
        records = []
        for shard in shards:
            records.append(annotate_shard(nlp, shard, output, batch_size))
            progress(records[-1])
    else:
        raise ValueError(f"spacy-llmner annotate: engine must be 'local' or 'ray', not {engine!r}")
    manifest = summarize(records, time.perf_counter() - t0)
    for stale in output.glob("*.tmp-*"):  # every shard is committed now: left by attempts that died mid-write
        stale.unlink(missing_ok=True)
    manifest.update({"pipeline": str(pipeline), "engine": engine, "concurrency": concurrency})
    tmp = output / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(output / "manifest.json")
    return manifest


def summarize(records: Sequence[Dict], seconds: float) -> Dict[str, Any]:
    """Totals over shard records: docs, docs/s, usage per component, counts per server, shards skipped."""
    usage: Dict[str, Usage] = {}
    servers: Dict[str, Dict[str, float]] = {}
    for r in records:
        for name, counts in r.get("usage", {}).items():
            usage.setdefault(name, Usage()).add(Usage(**counts))
        for url, counts in r.get("endpoints", {}).items():
            mine = servers.setdefault(url, {})
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value
    new = [r for r in records if not r.get("skipped")]
    docs = sum(r["docs"] for r in new)
    return {
        "shards": len(records),
        "shards_skipped": len(records) - len(new),
        "docs": sum(r["docs"] for r in records),
        "docs_this_run": docs,
        "seconds": seconds,
        "docs_per_second": docs / seconds if seconds else 0.0,
        "usage": {name: u.to_dict() for name, u in usage.items()},
        "endpoints": servers,
        "records": sorted(records, key=lambda r: r["shard"]),
    }
