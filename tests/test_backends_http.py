"""The OpenAI-compatible backend against real servers on loopback: llama-cpp-python's server running the packaged
Gemma model, and a small HTTP server that fails before it answers (retries, backoff, errors)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import spacy

from spacy_llmner.backends.openai_compat import OpenAICompatBackend
from spacy_llmner.ty import BackendError, GenerationRequest

import servers


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with servers.llama_server("gemma3-270m", "gemma", tmp_path_factory.mktemp("server"), "--n_ctx", "4096") as url:
        yield url


@pytest.mark.model
@pytest.mark.parametrize("grammar_field", [None, "grammar"])
def test_component_against_llama_cpp_server(llama_server, grammar_field):
    from test_llamacpp_e2e import DEMOS, LABELS

    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": LABELS,
            "backend": {
                "@llm_models": "spacy_llmner.OpenAICompat.v1",
                "base_url": llama_server,
                "model": "gemma",
                "grammar_field": grammar_field,
                "api_key_env": "SPACY_LLMNER_TEST_KEY",
            },
        },
    )
    ner.set_demonstrations(DEMOS)
    assert ner.constrained == (grammar_field is not None)
    docs = list(nlp.pipe([DEMOS[2]["text"], DEMOS[0]["text"]]))
    assert ("Tony Blair", "politician") in {(e.text, e.label_) for e in docs[0].ents}
    assert ner.usage.calls == 2 and ner.usage.prompt_tokens > 200 and ner.usage.completion_tokens > 0
    if grammar_field:
        assert ner.usage.hallucinated == 0 and ner.usage.malformed == 0


class FlakyHandler(BaseHTTPRequestHandler):
    failures_left = 0
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.headers.get("Authorization"), body))
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        out = json.dumps(
            {"choices": [{"text": "Paris | location"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    server = HTTPServer(("127.0.0.1", 0), FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyHandler.seen = []
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_retries_on_503_then_succeeds_and_sends_the_key(flaky_server, monkeypatch):
    server, url = flaky_server
    FlakyHandler.failures_left = 2
    monkeypatch.setenv("SPACY_LLMNER_TEST_KEY", "sk-test")
    backend = OpenAICompatBackend(base_url=url, api_key_env="SPACY_LLMNER_TEST_KEY", backoff=0.01, max_retries=3)
    gen = backend.generate([GenerationRequest("hi", stop=("\n\n",))])[0]
    assert gen.text == "Paris | location" and gen.prompt_tokens == 7
    assert len(FlakyHandler.seen) == 3
    assert FlakyHandler.seen[-1][0] == "Bearer sk-test" and FlakyHandler.seen[-1][1]["stop"] == ["\n\n"]


def test_gives_up_after_retries_with_a_clear_error(flaky_server):
    server, url = flaky_server
    FlakyHandler.failures_left = 10
    backend = OpenAICompatBackend(base_url=url, backoff=0.01, max_retries=2)
    with pytest.raises(BackendError, match=r"failed after 3 attempt\(s\): HTTP 503"):
        backend.generate([GenerationRequest("hi")])


def test_server_down_is_a_clear_error_and_earlier_docs_are_kept():
    url = f"http://127.0.0.1:{servers.free_port()}/v1"  # nothing listens here
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": ["location"],
            "backend": {"@llm_models": "spacy_llmner.OpenAICompat.v1", "base_url": url, "max_retries": 1},
        },
    )
    nlp.get_pipe("llm_lar_ner").backend.backoff = 0.01
    with pytest.raises(BackendError, match=r"llm_lar_ner: .*ConnectionError"):
        nlp("Paris is big.")


def test_concurrent_requests_are_bounded(flaky_server):
    server, url = flaky_server
    FlakyHandler.failures_left = 0
    backend = OpenAICompatBackend(base_url=url, max_concurrency=3)
    gens = backend.generate([GenerationRequest(f"p{i}") for i in range(7)])
    assert [g.text for g in gens] == ["Paris | location"] * 7
    assert sorted(b["prompt"] for _, b in FlakyHandler.seen) == sorted(f"p{i}" for i in range(7))


def test_the_vllm_config_names_the_adapter_and_sends_the_grammar_where_vllm_reads_it(flaky_server):
    """configs/vllm_ner_v2.cfg against the project's fake server: every request names the LoRA module vLLM serves
    (the adapter's peft copy, --lora-modules ner-v2=...) and carries the grammar in structured_outputs."""
    from pathlib import Path

    server, url = flaky_server
    config = spacy.util.load_config(Path(__file__).parent.parent / "configs" / "vllm_ner_v2.cfg")
    config["components"]["llm_lar_ner"]["backend"]["base_url"] = url
    nlp = spacy.util.load_model_from_config(config, auto_fill=True)
    nlp.initialize()
    doc = nlp("We flew to Paris.")
    assert [(e.text, e.label_) for e in doc.ents] == [("Paris", "location")]
    bodies = [body for _, body in FlakyHandler.seen]
    assert bodies and all(b["model"] == "ner-v2" for b in bodies)
    assert all("location" in b["structured_outputs"]["grammar"] for b in bodies)
