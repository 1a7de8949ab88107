"""Scale-out: balancing across servers, exactly-once shard output, the local and Ray engines, n_process.

Plumbing runs against small HTTP servers of the test's own; the fault test runs a real local Ray cluster (a head
and two worker nodes on loopback) and two llama-cpp-python servers with the packaged model, and kills a worker
node and a server mid-run."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
import spacy
import srsly

from spacy_llmner.backends.endpoints import EndpointPool
from spacy_llmner.backends.openai_compat import OpenAICompatBackend
from spacy_llmner.scale import annotate_corpus, list_shards
from spacy_llmner.ty import GenerationRequest

import servers

LABELS = ["person", "location"]


class CapitalsHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible completions server that names the first capitalised word of the query a person."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        query = body["prompt"].rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
        words = re.findall(r"\b[A-Z][a-z]+\b", query)
        answer = f"{words[0]} | person\n" if words else "\n"
        out = json.dumps({"choices": [{"text": answer}], "usage": {"prompt_tokens": 10, "completion_tokens": 3}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args):
        pass


class DownHandler(CapitalsHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        self.end_headers()


def _pipeline(path, urls, **backend):
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": LABELS,
            "zero_shot": True,
            "backend": {"@llm_models": "spacy_llmner.OpenAICompat.v1", "base_url": urls, "backoff": 0.01, **backend},
        },
    )
    nlp.to_disk(path)
    return path


def _corpus(folder, shards, per_shard):
    folder.mkdir()
    texts = []
    for s in range(shards):
        rows = [f"Doc {s}-{i} says Anna{s}x{i} lives here." for i in range(per_shard)]
        (folder / f"part-{s:02d}.txt").write_text("\n".join(rows) + "\n")
        texts += rows
    return texts


def _output_texts(output):
    return [row["text"] for f in sorted(output.glob("*.jsonl")) for row in srsly.read_jsonl(f)]


# ---- balancing and fail-over ----------------------------------------------------------------------------------
def test_the_pool_picks_the_least_busy_server_and_ejects_one_that_keeps_failing():
    pool = EndpointPool(["http://a/v1", "http://b/v1"], eject_after=2, cooldown=0.2)
    first, second = pool.acquire(), pool.acquire()
    assert {first.url, second.url} == {"http://a/v1", "http://b/v1"}  # one each while both are busy
    pool.release(second, ok=True)
    assert pool.acquire() is second  # the other one is still busy
    pool.release(second, ok=True)
    pool.release(first, ok=False)  # one failure: still in service
    assert pool.stats()[first.url]["in_service"]
    first.outstanding += 1
    pool.release(first, ok=False)  # two in a row: out
    assert not pool.stats()[first.url]["in_service"] and pool.stats()[first.url]["ejections"] == 1
    picked = [pool.acquire() for _ in range(5)]
    assert all(e is second for e in picked)  # out of service: never chosen while another is up
    time.sleep(0.25)
    assert pool.stats()[first.url]["in_service"]  # cool-down over: tried again
    assert pool.acquire() is first  # and, being least busy, chosen


def test_a_dead_server_costs_retries_not_answers():
    live, live_url = servers.serve(CapitalsHandler)
    dead, dead_url = servers.serve(DownHandler)
    try:
        backend = OpenAICompatBackend(
            base_url=[dead_url, live_url], max_concurrency=2, backoff=0.01, eject_after=2, cooldown=60
        )
        requests = [GenerationRequest(f"Sentence: Hello Berta{i} there\nEntities:", 8) for i in range(20)]
        answers = backend.generate(requests)
        assert [a.text for a in answers] == ["Hello | person\n"] * 20
        stats = backend.endpoints.stats()
        assert stats[live_url]["failures"] == 0 and stats[live_url]["completion_tokens"] == 60
        assert stats[dead_url]["failures"] >= 2 and stats[dead_url]["ejections"] == 1
        assert not stats[dead_url]["in_service"]
        assert backend.identity()["base_url"] == sorted([dead_url, live_url])  # one cache key for the replica set
    finally:
        live.shutdown()
        dead.shutdown()


# ---- exactly once, local engine -------------------------------------------------------------------------------
def test_local_engine_writes_every_doc_once_and_a_rerun_skips_committed_shards(tmp_path):
    httpd, url = servers.serve(CapitalsHandler)
    try:
        pipeline = _pipeline(tmp_path / "p", [url])
        texts = _corpus(tmp_path / "in", shards=3, per_shard=4)
        manifest = annotate_corpus(pipeline, [tmp_path / "in"], tmp_path / "out")
        assert sorted(_output_texts(tmp_path / "out")) == sorted(texts)
        assert manifest["docs"] == 12 and manifest["shards"] == 3 and manifest["shards_skipped"] == 0
        assert manifest["usage"]["llm_lar_ner"]["calls"] == 12
        assert manifest["endpoints"][url]["requests"] == 12
        docs = list(
            spacy.tokens.DocBin().from_disk(next((tmp_path / "out").glob("*.spacy"))).get_docs(spacy.blank("en").vocab)
        )
        assert [e.label_ for e in docs[0].ents] == ["person"]
        # a shard lost mid-write (its record removed): the rerun redoes that one only
        lost = sorted((tmp_path / "out").glob("*.done.json"))[1]
        lost.unlink()
        again = annotate_corpus(pipeline, [tmp_path / "in"], tmp_path / "out")
        assert again["shards_skipped"] == 2 and again["docs_this_run"] == 4 and again["docs"] == 12
        assert sorted(_output_texts(tmp_path / "out")) == sorted(texts)
        assert json.loads((tmp_path / "out" / "manifest.json").read_text())["docs"] == 12
    finally:
        httpd.shutdown()


def test_shard_names_are_deterministic_and_distinct(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "part-0.txt").write_text("x\n")
    names = [s.name for s in list_shards([tmp_path / "a", tmp_path / "b"])]
    assert len(set(names)) == 2 and names == [s.name for s in list_shards([tmp_path / "a", tmp_path / "b"])]
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_shards([tmp_path / "nowhere"])


# ---- a real local Ray cluster, two real servers, a node and a server killed mid-run ------------------------------
@pytest.mark.model
def test_ray_cluster_annotates_every_doc_exactly_once_through_node_and_server_failures(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    texts = _corpus(tmp_path / "in", shards=20, per_shard=10)  # 200 short docs
    procs, urls = [], []
    cluster = None
    try:
        for i in range(2):
            (tmp_path / f"server{i}").mkdir()
            proc, url = servers.start_llama_server(
                "gemma3-270m", "gemma", tmp_path / f"server{i}", "--n_threads", "1", "--n_ctx", "1024"
            )
            procs.append(proc)
            urls.append(url)
        pipeline = _pipeline(tmp_path / "p", urls, model="gemma", eject_after=2, cooldown=60, max_retries=6)
        config = spacy.util.load_config(tmp_path / "p" / "config.cfg")
        config["components"]["llm_lar_ner"]["max_new_tokens"] = 4  # short answers: the test is about the docs
        config.to_disk(tmp_path / "p" / "config.cfg")
        memory = 80 * 2**20
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": memory})
        nodes = [cluster.add_node(num_cpus=2, object_store_memory=memory) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        killed = {}

        def saboteur():  # a worker node that has committed a shard dies; later one server dies
            deadline = time.time() + 600
            while time.time() < deadline and len(killed) < 2:
                records = [json.loads(f.read_text()) for f in (tmp_path / "out").glob("*.done.json")]
                if "node" not in killed and len(records) >= 3:
                    busy = records[-1]["worker"].split(":")[0]
                    victim = next(n for n in nodes if n.node_id == busy)
                    cluster.remove_node(victim)
                    killed["node"] = (busy, len(records))
                if "server" not in killed and len(records) >= 8:
                    procs[1].kill()
                    killed["server"] = (urls[1], len(records))
                time.sleep(0.2)

        (tmp_path / "out").mkdir()
        watcher = threading.Thread(target=saboteur, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        manifest = annotate_corpus(
            pipeline, [tmp_path / "in"], tmp_path / "out", engine="ray", concurrency=2, address=cluster.address
        )
        seconds = time.perf_counter() - t0
        watcher.join(timeout=5)
        assert set(killed) == {"node", "server"}, killed
        out = _output_texts(tmp_path / "out")
        assert len(out) == 200 and sorted(out) == sorted(texts)  # every doc once: none lost, none twice
        assert len(list((tmp_path / "out").glob("*.done.json"))) == 20
        assert manifest["docs"] == 200 == sum(r["docs"] for r in manifest["records"])
        usage = manifest["usage"]["llm_lar_ner"]
        assert usage["docs"] == 200 and usage["calls"] == 200 and usage["errors"] == 0
        servers_seen = manifest["endpoints"]
        answered = sum(c["requests"] - c["failures"] for c in servers_seen.values())
        assert answered == usage["calls"]  # every call answered once, by one server
        assert servers_seen[urls[1]]["failures"] >= 1 and servers_seen[urls[0]]["failures"] == 0
        workers = {r["worker"].split(":")[0] for r in manifest["records"]}
        assert killed["node"][0] in workers and len(workers) == 2  # shards from the dead node and the survivor
        print(
            "\nray fault test:",
            json.dumps(
                {
                    "seconds": round(seconds, 1),
                    "docs_per_s": round(200 / seconds, 2),
                    "killed": killed,
                    "endpoints": servers_seen,
                }
            ),
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for proc in procs:
            servers.stop(proc)


# ---- one machine: spaCy's own multiprocessing ----------------------------------------------------------------
N_PROCESS_SCRIPT = """
import json, sys
import spacy
sys.path.insert(0, sys.argv[1])
from test_llamacpp_e2e import DEMOS, LABELS

nlp = spacy.blank("en")
ner = nlp.add_pipe("llm_lar_ner", config={"labels": LABELS})
ner.set_demonstrations(DEMOS)
texts = [d["text"] for d in DEMOS] * 2
one = [[(e.text, e.label_) for e in doc.ents] for doc in nlp.pipe(texts, batch_size=2)]
# the parent has now loaded and run the model: each child must load its own
docs = list(nlp.pipe(texts, batch_size=2, n_process=2))
two = [[(e.text, e.label_) for e in doc.ents] for doc in docs]
print(json.dumps({"one": one, "two": two, "calls": [d._.llm_ner_usage["llm_lar_ner"]["calls"] for d in docs]}))
"""


@pytest.mark.model
def test_nlp_pipe_with_two_processes_gives_the_same_entities_as_one():
    """In a fresh interpreter (a hang would be a timeout here, not a stuck suite), as a user's script runs it."""
    import subprocess
    import sys
    from pathlib import Path

    res = subprocess.run(
        [sys.executable, "-c", N_PROCESS_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["two"] == got["one"] and any(got["one"])
    assert got["calls"] == [1] * len(got["two"])
