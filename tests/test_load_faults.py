"""The OpenAI-compatible path under faults and load: a real llama_cpp.server (the packaged SmolLM2-135M) behind a
fault-injecting proxy of the test's own, on loopback. 200 short docs through ``nlp.pipe`` with
``max_concurrency = 8`` and a cache: every doc annotated exactly once, no request retried past its budget, and a
second run over the same docs answered from the cache without a single request.

The proxy's faults are a fixed schedule keyed by each prompt and attempt (connection resets, 429 with
Retry-After, 500s, stalls past the client's timeout, bodies cut short; the docs of day 50, 150, … stall),
at most two per prompt, so with ``max_retries = 3`` every doc must come through; bounded in count and time,
loopback only.
"""

import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
import requests
import spacy

import servers

pytestmark = pytest.mark.model

N_DOCS = int(os.environ.get("SPACY_LLMNER_LOAD_DOCS", "200"))
TIMEOUT = 15.0  # the client's (8 requests queue at a serial server: ~4 s); a stall lasts longer
MAX_RETRIES = 3
FAULTS = ("reset", "429", "500", "stall", "cut")
STALLED = re.compile(r" on day \d*50\.")  # the docs that stall at their first attempt, besides the drawn ones


def schedule(prompt: str, attempt: int):
    """The fault (or None) for this prompt's attempt: ~16 % of first attempts fail, a quarter of those fail again;
    stalls are rarer (each costs a worker TIMEOUT seconds), and the docs of day 50, 150, … draw one."""
    if attempt == 0 and STALLED.search(prompt):
        return "stall"
    h = int(hashlib.sha256(f"{prompt}\x00{attempt}".encode()).hexdigest()[:8], 16) % 1000
    if attempt == 0:
        return (
            "stall"
            if h < 5
            else "reset"
            if h < 48
            else "429"
            if h < 88
            else "500"
            if h < 128
            else "cut"
            if h < 168
            else None
        )
    if attempt == 1:
        return None if h >= 250 else FAULTS[h % 5] if h % 5 != 3 else "500"
    return None


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.lock = threading.Lock()
        self.attempts = Counter()  # prompt -> requests seen
        self.faults = Counter()  # fault kind -> times injected
        self.delivered = Counter()  # prompt -> intact answers sent
        self.session = threading.local()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                prompt = json.loads(raw)["prompt"]
                with outer.lock:
                    attempt = outer.attempts[prompt]
                    outer.attempts[prompt] += 1
                fault = schedule(prompt, attempt)
                if fault:
                    with outer.lock:
                        outer.faults[fault] += 1
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in ("429", "500"):
                    body = b'{"error": "injected"}'
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault == "stall":
                    time.sleep(TIMEOUT + 1.5)
                    self.close_connection = True
                    return
                try:
                    resp = outer.forward(raw)
                except Exception:  # noqa: BLE001  (upstream failed: the client sees a dropped connection)
                    self.close_connection = True
                    return
                if fault == "cut":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(resp)))
                    self.end_headers()
                    self.wfile.write(resp[: len(resp) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)
                with outer.lock:
                    outer.delivered[prompt] += 1

            def log_message(self, *args):
                pass

        self.httpd, self.url = servers.serve(Handler)

    def forward(self, raw: bytes) -> bytes:
        if not hasattr(self.session, "s"):
            self.session.s = requests.Session()
        r = self.session.s.post(
            f"{self.upstream}/completions", data=raw, headers={"Content-Type": "application/json"}, timeout=120
        )
        r.raise_for_status()
        return r.content

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    with servers.llama_server(
        "smollm2-135m", "smol", tmp_path_factory.mktemp("server"), "--n_ctx", "2048", "--n_threads", "2"
    ) as url:
        yield url


DEMOS = [
    {
        "text": "Anna Berg flew to Oslo.",
        "spans": [{"start": 0, "end": 9, "label": "person"}, {"start": 18, "end": 22, "label": "location"}],
    }
]
NAMES = ["Maria Lopez", "John Smith", "Wei Chen", "Amara Okafor", "Lars Nilsson", "Priya Patel", "Tom Baker"]
CITIES = ["Paris", "Lagos", "Lima", "Kyoto", "Bergen", "Perth", "Quito", "Cairo", "Turin", "Osaka", "Dakar"]


def texts():
    return [
        f"{NAMES[i % len(NAMES)]} met {NAMES[(i // 7) % len(NAMES)]} in {CITIES[i % len(CITIES)]} on day {i}."
        for i in range(N_DOCS)
    ]


def pipeline(url, cache):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": ["person", "location"],
            "cache_path": str(cache),
            "on_error": "skip",
            "max_new_tokens": 48,
            "backend": {
                "@llm_models": "spacy_llmner.OpenAICompat.v1",
                "base_url": url,
                "model": "smol",
                "grammar_field": "llama.cpp",
                "max_concurrency": 8,
                "max_retries": MAX_RETRIES,
                "timeout": TIMEOUT,
                "backoff": 0.05,
            },
        },
    )
    ner.set_demonstrations(DEMOS)
    return nlp, ner


def test_hundreds_of_docs_through_faults_each_annotated_once_then_all_from_cache(smol_server, tmp_path):
    proxy = FaultProxy(smol_server)
    cache = tmp_path / "cache.sqlite"
    docs_in = texts()
    try:
        nlp, ner = pipeline(proxy.url, cache)
        t0 = time.perf_counter()
        first = list(nlp.pipe(docs_in, batch_size=100))  # a batch waits for its slowest retry
        seconds = time.perf_counter() - t0
        usage = [d._.llm_ner_usage["llm_lar_ner"] for d in first]
        failed = [d.text for d in first if d.user_data.get("llm_ner_errors")]
        attempts = list(proxy.attempts.values())
        report = {
            "docs": len(first),
            "seconds": round(seconds, 1),
            "docs_per_s": round(len(first) / seconds, 2),
            "requests": sum(attempts),
            "retries": sum(attempts) - len(proxy.attempts),
            "faults": dict(proxy.faults),
            "failed_docs": len(failed),
            "max_attempts_per_prompt": max(attempts),
            "grammar_ignored": ner.usage.grammar_ignored,
        }
        print("\nload test:", json.dumps(report))
        assert len(first) == N_DOCS and [d.text for d in first] == docs_in
        assert failed == [] and all(u["errors"] == 0 for u in usage)
        assert all(u["calls"] + u["cached_calls"] == 1 for u in usage)  # each doc annotated exactly once
        assert set(proxy.attempts) == set(proxy.delivered) and len(proxy.attempts) == N_DOCS
        assert all(n == 1 for n in proxy.delivered.values())  # one intact answer per prompt: none lost, none twice
        assert max(attempts) <= MAX_RETRIES + 1  # no request retried past its budget
        assert sum(proxy.faults.values()) > N_DOCS // 10
        assert set(proxy.faults) == set(FAULTS) or N_DOCS <= 50  # a small local run may draw no stall
        assert ner.usage.hallucinated == 0 and ner.usage.grammar_ignored == 0  # the grammar was applied
        assert len(ner.backend.cache) == N_DOCS

        before = sum(proxy.attempts.values())
        nlp2, ner2 = pipeline(proxy.url, cache)
        second = list(nlp2.pipe(docs_in, batch_size=100))
        assert sum(proxy.attempts.values()) == before  # zero requests on the second run
        assert ner2.usage.calls == 0 and ner2.usage.cached_calls == N_DOCS
        assert [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in second] == [
            [(e.start_char, e.end_char, e.label_) for e in d.ents] for d in first
        ]
    finally:
        proxy.close()


def test_a_doc_whose_requests_always_fail_is_listed_with_its_error(smol_server, tmp_path):
    """on_error="skip": the batch that cannot be answered is marked, with the error; other batches are kept."""

    class Dead(FaultProxy):
        def forward(self, raw):
            if b"Nobody" in raw:
                raise http.client.HTTPException("upstream refused")
            return super().forward(raw)

    proxy = Dead(smol_server)
    try:
        nlp, ner = pipeline(proxy.url, tmp_path / "c.sqlite")
        ner.backend.backend.max_retries = 1
        docs = list(nlp.pipe(["Maria Lopez met John Smith in Paris.", "Nobody came on day 3."], batch_size=1))
        assert not docs[0].user_data.get("llm_ner_errors")
        errors = docs[1].user_data["llm_ner_errors"]
        assert len(errors) == 1 and errors[0].startswith("llm_lar_ner: ") and "failed after 2 attempt(s)" in errors[0]
        assert docs[1]._.llm_ner_usage["llm_lar_ner"]["errors"] == 1
    finally:
        proxy.close()
