"""Faults: damaged cache files, a run killed mid-batch, saved pipelines with files missing, servers that ignore
the grammar field or cut their answers short. Each must end in the right answer or a clear error, losing nothing."""

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
import spacy

from spacy_llmner.backends.cache import AnswerCache, CachedBackend, request_key
from spacy_llmner.backends.openai_compat import OpenAICompatBackend
from spacy_llmner.ty import Generation, GenerationRequest

import servers
from fakes import FakeBackend, add_fake_ner


# ---- a small OpenAI-compatible server of the test's own ----------------------------------------------------------
class Server:
    """Answers /v1/completions with ``answer(prompt, attempt)``: a dict (the JSON body), or raw bytes (sent as
    they are, with a Content-Length that may lie), after ``delay`` seconds. Records every request."""

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay = answer, delay
        self.requests = []  # (prompt, body)
        self.answered = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    attempt = sum(1 for p, _ in outer.requests if p == body["prompt"])
                    outer.requests.append((body["prompt"], body))
                time.sleep(outer.delay)
                out = outer.answer(body["prompt"], attempt)
                if isinstance(out, dict):
                    data, length = json.dumps(out).encode(), None
                else:
                    data, length = out
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length if length is not None else len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if length is not None:
                    self.close_connection = True
                with outer.lock:
                    outer.answered += 1

            def log_message(self, *args):
                pass

        self.httpd, self.url = servers.serve(Handler)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text):
    return {"choices": [{"text": text}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


def sentence_of(prompt):
    return prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]


# ---- cache files that sqlite cannot read ---------------------------------------------------------------------------
def test_a_garbage_cache_file_is_moved_aside_with_a_warning(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    nlp = spacy.blank("en")
    ner = add_fake_ner(nlp, lambda q: "Paris | location", name="my_ner")
    ner.backend = CachedBackend(ner.backend, path, owner=ner.name)
    with pytest.warns(
        UserWarning,
        match=r"my_ner: the answer cache .*cache.sqlite could not be read .*moved to "
        r".*cache.sqlite.corrupt-1",
    ):
        doc = nlp("Paris is big.")
    assert [(e.text, e.label_) for e in doc.ents] == [("Paris", "location")]
    assert (tmp_path / "cache.sqlite.corrupt-1").read_bytes().startswith(b"this is not")  # kept, not deleted
    assert len(ner.backend.cache) == 1


def test_a_truncated_cache_keeps_every_readable_answer(tmp_path):
    path = tmp_path / "cache.sqlite"
    cache = AnswerCache(path)
    for i in range(400):
        cache.put(f"k{i:04d}", Generation(f"answer {i} " + "x" * 200, 10, 3))
    cache.db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache.db().close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * 0.6))
    with pytest.warns(UserWarning, match=r"(\d+) answer\(s\) still readable"):
        again = CachedBackend(FakeBackend(lambda q: "none"), path, owner="ner_x")
        assert again.cache.get("k0000") is not None
    kept = [again.cache.get(f"k{i:04d}") for i in range(400)]
    readable = [i for i, g in enumerate(kept) if g is not None]
    assert 0 < len(readable) < 400
    assert all(kept[i].text.startswith(f"answer {i} ") for i in readable)
    assert (tmp_path / "cache.sqlite.corrupt-1").exists()


def test_a_cache_that_fails_mid_run_names_the_component_and_the_file(tmp_path):
    path = tmp_path / "cache.sqlite"
    cache = AnswerCache(path, owner="ner_y")
    cache.put("a", Generation("x"))
    cache.db().execute("DROP TABLE answers")  # what a foreign writer could do to a shared file
    with pytest.raises(Exception, match=r"ner_y: the answer cache .*cache.sqlite failed: .*move the file aside"):
        cache.get("a")


# ---- a run killed with SIGKILL mid-batch -------------------------------------------------------------------------
RUN = textwrap.dedent("""
    import json, sys, spacy
    url, cache, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    nlp = spacy.blank("en")
    nlp.add_pipe("llm_lar_ner", config={"labels": ["location"], "zero_shot": True, "cache_path": cache,
        "backend": {"@llm_models": "spacy_llmner.OpenAICompat.v1", "base_url": url, "max_concurrency": 4}})
    for doc in nlp.pipe(texts, batch_size=8):
        print(json.dumps([(e.text, e.label_) for e in doc.ents]), flush=True)
""")


def pipeline_keys(url, cache, texts):
    """The cache key of each text's request, as the component in RUN computes it."""
    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": ["location"],
            "zero_shot": True,
            "backend": {"@llm_models": "spacy_llmner.OpenAICompat.v1", "base_url": url, "max_concurrency": 4},
        },
    )
    return [request_key(ner.backend.identity(), ner.request(nlp.make_doc(t)[:])) for t in texts]


def test_a_run_killed_mid_batch_resumes_without_asking_again(tmp_path):
    texts = [f"Town number {i} lies near Paris." for i in range(48)]
    server = Server(lambda prompt, attempt: completion("Paris | location"), delay=0.15)
    cache = tmp_path / "cache.sqlite"
    args = [sys.executable, "-c", RUN, server.url, str(cache), json.dumps(texts)]
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while server.answered < 14 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # mid-batch: batches of 8, 4 requests in flight
        proc.wait()
        answered_first = server.answered
        keys = pipeline_keys(server.url, str(cache), texts)
        with sqlite3.connect(cache) as db:  # what the killed run committed (sqlite replays the WAL on open)
            committed = {k for (k,) in db.execute("SELECT key FROM answers")}
        assert 14 <= answered_first < len(texts)
        # at most the requests in flight when the kill came were answered by the server but not yet committed
        assert answered_first - 4 <= len(committed) <= answered_first
        first_requests = len(server.requests)
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        again = [p for p, _ in server.requests[first_requests:]]
        asked = {keys[texts.index(sentence_of(p))] for p in again}
        assert not asked & committed  # nothing it had already answered is asked again
        assert len(again) == len(texts) - len(committed)  # and everything else is asked exactly once
        lines = done.stdout.strip().splitlines()
        assert len(lines) == len(texts) and all(json.loads(line) == [["Paris", "location"]] for line in lines)
    finally:
        server.close()


# ---- saved pipelines with files missing --------------------------------------------------------------------------
DEMOS = [{"text": "Paris is big.", "spans": [{"start": 0, "end": 5, "label": "location"}]}]


def saved(tmp_path, **config):
    nlp = spacy.blank("en")
    add_fake_ner(nlp, lambda q: "none", labels=["location"], **config)
    nlp.get_pipe("llm_lar_ner").set_demonstrations(DEMOS)
    nlp.to_disk(tmp_path / "p")
    return tmp_path / "p"


def test_a_pipeline_missing_its_demonstrations_does_not_load(tmp_path):
    path = saved(tmp_path, zero_shot=False)
    assert spacy.load(path).get_pipe("llm_lar_ner").demonstrations[0].text == "Paris is big."
    (path / "llm_lar_ner" / "demonstrations.jsonl").unlink()
    with pytest.raises(ValueError, match=r"llm_lar_ner: the saved component at .* is missing demonstrations.jsonl"):
        spacy.load(path)
    (path / "llm_lar_ner" / "files.json").unlink()  # a pipeline saved before files.json existed: same check
    with pytest.raises(ValueError, match=r"is missing demonstrations.jsonl"):
        spacy.load(path)


def test_every_file_the_component_wrote_is_required(tmp_path):
    path = saved(tmp_path, zero_shot=False)
    written = json.loads((path / "llm_lar_ner" / "files.json").read_text())
    assert written == ["labels.json", "demonstrations.jsonl"]
    (path / "llm_lar_ner" / "labels.json").unlink()
    with pytest.raises(ValueError, match=r"missing labels.json"):
        spacy.load(path)


def test_no_demonstrations_must_be_declared_in_the_config(tmp_path):
    nlp = spacy.blank("en")
    add_fake_ner(nlp, lambda q: "none", labels=["location"], zero_shot=False)
    with pytest.warns(UserWarning, match="no demonstrations"):
        nlp("Paris is big.")
    nlp.to_disk(tmp_path / "p")
    with pytest.raises(ValueError, match=r"holds no demonstrations .* set zero_shot = true"):
        spacy.load(tmp_path / "p")
    assert spacy.load(tmp_path / "p", config={"components": {"llm_lar_ner": {"zero_shot": True}}})


# ---- servers: the grammar field, ignored grammars, truncated bodies ----------------------------------------------
GRAMMAR = 'root ::= "Paris | location" "\\n\\n"\n'


@pytest.mark.parametrize(
    "field,where",
    [
        ("llama.cpp", ["grammar"]),
        ("vllm", ["structured_outputs", "grammar"]),
        ("grammar", ["grammar"]),
        ("guided_grammar", ["guided_grammar"]),
        ("structured_outputs.grammar", ["structured_outputs", "grammar"]),
    ],
)
def test_grammar_goes_to_the_configured_field(field, where):
    server = Server(lambda prompt, attempt: completion("Paris | location"))
    try:
        backend = OpenAICompatBackend(base_url=server.url, grammar_field=field)
        assert backend.supports_grammar
        gen = backend.generate([GenerationRequest("p", grammar=GRAMMAR)])[0]
        body = server.requests[0][1]
        for key in where:
            body = body[key]
        assert body == GRAMMAR and not gen.grammar_ignored
    finally:
        server.close()


def test_no_grammar_field_sends_no_grammar():
    for field in (None, "none"):
        assert not OpenAICompatBackend(grammar_field=field).supports_grammar
    with pytest.raises(ValueError, match="grammar_field"):
        OpenAICompatBackend(grammar_field="structured_outputs.")


def test_a_server_that_ignores_the_grammar_is_counted_and_warned_about_once():
    server = Server(lambda prompt, attempt: completion("Sure! The entities are Paris (a city)."))
    try:
        nlp = spacy.blank("en")
        ner = nlp.add_pipe(
            "llm_lar_ner",
            config={
                "labels": ["location"],
                "zero_shot": True,
                "backend": {
                    "@llm_models": "spacy_llmner.OpenAICompat.v1",
                    "base_url": server.url,
                    "grammar_field": "guided_grammar",
                },
            },
        )
        assert ner.constrained
        with pytest.warns(UserWarning) as record:
            docs = list(nlp.pipe(["Paris is big.", "Rome is old.", "Oslo is cold."]))
        ignored = [str(w.message) for w in record if "does not follow the grammar" in str(w.message)]
        assert len(ignored) == 1 and "'guided_grammar'" in ignored[0] and '"vllm"' in ignored[0]
        assert [d._.llm_ner_usage["llm_lar_ner"]["grammar_ignored"] for d in docs] == [1, 1, 1]
        assert ner.usage.grammar_ignored == 3
    finally:
        server.close()


def test_an_answer_that_follows_the_grammar_is_not_flagged():
    # the real grammar for the input, and an answer cut at max_tokens (a prefix of a sentence of the grammar)
    server = Server(lambda prompt, attempt: completion("Paris | loc" if "Rome" in prompt else "Paris | location"))
    try:
        nlp = spacy.blank("en")
        ner = nlp.add_pipe(
            "llm_lar_ner",
            config={
                "labels": ["location"],
                "zero_shot": True,
                "backend": {
                    "@llm_models": "spacy_llmner.OpenAICompat.v1",
                    "base_url": server.url,
                    "grammar_field": "llama.cpp",
                },
            },
        )
        docs = list(nlp.pipe(["Paris is big.", "Paris and Rome."]))
        assert ner.usage.grammar_ignored == 0
        assert [(e.text, e.label_) for e in docs[0].ents] == [("Paris", "location")]
    finally:
        server.close()


@pytest.mark.parametrize("fault", ["cut_body", "not_json", "no_choices"])
def test_a_cut_or_unreadable_answer_is_retried(fault):
    good = json.dumps(completion("Paris | location")).encode()
    bad = {
        "cut_body": (good[:20], len(good)),
        "not_json": (b"<html>oops</html>", None),
        "no_choices": (b'{"error": "overloaded"}', None),
    }[fault]
    server = Server(lambda prompt, attempt: bad if attempt == 0 else completion("Paris | location"))
    try:
        backend = OpenAICompatBackend(base_url=server.url, backoff=0.01, max_retries=2, timeout=5)
        assert backend.generate([GenerationRequest("p")])[0].text == "Paris | location"
        assert len(server.requests) == 2
    finally:
        server.close()
