"""Bad inputs and faults against ``llm_lar_ner``: what the component does with each, one line per case.

    python scripts/probe_bad_input.py [--markdown]

Runs without the LLM (a canned backend answers as a faithful model would: the format's own rendering of the gold
entities) and against small loopback servers of its own, so it runs the same on any tree: point PYTHONPATH at an
older checkout to see how that one behaved. Each case prints ``ok`` / ``error: <message>`` / ``warning: ...`` and
what came out.
"""

import json
import re
import shutil
import sys
import tempfile
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import spacy

from spacy_llmner.backends.base import BackendBase
from spacy_llmner.formats import FORMATS
from spacy_llmner.prompt import display
from spacy_llmner.ty import Generation


class Canned(BackendBase):
    def __init__(self, answer):
        self.answer = answer

    def identity(self):
        return {"backend": "canned"}

    def generate(self, requests):
        return [Generation(self.answer(r.prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0])) for r in requests]


def pipeline(labels=("person", "organisation", "location"), fmt="lines", answer=lambda q: "none", **config):
    nlp = spacy.blank("en")
    cfg = {"labels": list(labels), "format": {"@misc": f"spacy_llmner.{FORMATS[fmt].__name__}.v1"}, **config}
    ner = nlp.add_pipe("llm_lar_ner", config=cfg)
    ner.backend = Canned(answer)
    ner.constrained = False
    ner.set_demonstrations([{"text": "Ada met Bob.", "spans": [{"start": 0, "end": 3, "label": "person"}]}])
    return nlp, ner


def faithful(fmt, text, mark, label):
    """What a model that marks ``mark`` writes in this format (the format's own rendering)."""
    shown = display(text)
    start = shown.index(mark)
    return lambda q: FORMATS[fmt]().render(shown, [(start, start + len(mark), label)])


def ents(doc, key="llm_ner"):
    return [(s.text, s.label_) for s in doc.spans.get(key, [])]


def run(case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = case()
            status = "ok"
        except Exception as e:  # noqa: BLE001  (the point is to report it)
            message = re.sub(r"/tmp/[\w/.-]*/p/", "<tmp>/", str(e))  # the saved copy's folder, shortened
            out, status = None, f"error ({type(e).__name__}): {message[:160]}"
    warned = [str(w.message)[:120] for w in caught if issubclass(w.category, UserWarning)]
    return status, out, warned


def syntax_case(fmt, text, mark, label="organisation"):
    """A faithful model marks ``mark`` (a run of whole tokens, as the grammar allows); strict alignment, so a
    mention read wrongly shows as a wrong or missing span rather than being widened to its token."""

    def case():
        nlp, _ = pipeline(fmt=fmt, answer=faithful(fmt, text, mark, label), alignment_mode="strict")
        doc = nlp(text)
        u = doc._.llm_ner_usage["llm_lar_ner"]
        return ents(doc), {k: u[k] for k in ("hallucinated", "malformed", "unknown_labels") if u[k]}

    return case


def missing_demos():
    nlp, _ = pipeline()
    d = Path(tempfile.mkdtemp())
    nlp.to_disk(d / "p")
    (d / "p" / "llm_lar_ner" / "demonstrations.jsonl").unlink()
    loaded = spacy.load(d / "p")
    loaded.get_pipe("llm_lar_ner").backend = Canned(lambda q: "Obama spoke in Paris. | person")
    shutil.rmtree(d)
    return ents(loaded("Obama spoke in Paris."))


def empty_demos_saved():
    nlp, ner = pipeline()
    ner.set_demonstrations([])
    d = Path(tempfile.mkdtemp())
    nlp.to_disk(d / "p")
    spacy.load(d / "p")
    shutil.rmtree(d)
    return "loaded"


def cache_case(content: bytes):
    def case():
        d = Path(tempfile.mkdtemp())
        (d / "c.sqlite").write_bytes(content)
        nlp, ner = pipeline(answer=lambda q: "Paris | location", cache_path=str(d / "c.sqlite"))
        from spacy_llmner.backends.cache import CachedBackend

        ner.backend = CachedBackend(Canned(lambda q: "Paris | location"), d / "c.sqlite")
        out = ents(nlp("Paris is big."))
        shutil.rmtree(d)
        return out

    return case


def server(answer_bytes):
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = answer_bytes
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


def http_case(body: bytes, grammar_field=None):
    def case():
        httpd, url = server(body)
        try:
            nlp = spacy.blank("en")
            nlp.add_pipe(
                "llm_lar_ner",
                config={
                    "labels": ["location"],
                    "backend": {
                        "@llm_models": "spacy_llmner.OpenAICompat.v1",
                        "base_url": url,
                        "max_retries": 1,
                        "backoff": 0.01,
                        "grammar_field": grammar_field,
                    },
                },
            )
            ner = nlp.get_pipe("llm_lar_ner")
            ner.set_demonstrations([{"text": "Oslo.", "spans": [{"start": 0, "end": 4, "label": "location"}]}])
            doc = nlp("Paris is big.")
            return ents(doc), ner.usage.to_dict().get("grammar_ignored", "n/a")
        finally:
            httpd.shutdown()

    return case


ENTITIES = {"Barack Obama": "person", "Angela Merkel": "person", "Paris": "location"}


class CString(Canned):
    """A faithful model behind a C API, as llama.cpp is: the prompt ends at its first NUL; it names the entities
    it sees in what is left of the query."""

    def generate(self, requests):
        out = []
        for r in requests:
            query = r.prompt.split("\x00", 1)[0].rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
            found = [f"{name} | {label}" for name, label in ENTITIES.items() if name in query]
            out.append(Generation("\n".join(found) or query.split()[0] + " | person"))
        return out


def c_string_case(text):
    def case():
        nlp, ner = pipeline()
        ner.backend = CString(None)
        return ents(nlp(text))

    return case


def cut_answer():
    """A model whose answer is cut at max_tokens words (as a decoder stops at its token limit)."""

    class Cut(Canned):
        def generate(self, requests):
            full = "Angela Merkel | person\nParis | location"
            out = []
            for r in requests:
                gen = Generation(" ".join(full.split(" ")[: r.max_tokens]))
                if hasattr(gen, "truncated"):  # trees that count cut answers
                    gen.truncated = r.max_tokens < len(full.split(" "))
                out.append(gen)
            return out

    nlp, ner = pipeline(max_new_tokens=1)
    ner.backend = Cut(None)
    doc = nlp("Angela Merkel visited Paris.")
    return ents(doc), {"truncated": doc._.llm_ner_usage["llm_lar_ner"].get("truncated", "not counted")}


def corrupt_adapter():
    import subprocess

    from spacy_llmner.adapters import adapter_path

    d = Path(tempfile.mkdtemp())
    cut = d / "adapter.gguf"
    cut.write_bytes(adapter_path("ner-v2").read_bytes()[:300_000])
    code = (
        "import spacy; nlp = spacy.blank('en'); nlp.add_pipe('llm_lar_ner', config={'labels': ['person'], "
        f"'zero_shot': True, 'backend': {{'@llm_models': 'spacy_llmner.LlamaCpp.v1', 'adapter': {str(cut)!r}}}}}); "
        "print(nlp('Angela Merkel spoke.').ents)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    shutil.rmtree(d)
    last = (res.stderr.strip().splitlines() or [""])[-1]
    return f"exit {res.returncode}: {last.replace(str(d), '<tmp>')[:150]}"


def cut_line_2(path):
    lines = path.read_text(encoding="utf8").splitlines()
    lines[1] = lines[1][:15]
    path.write_text("\n".join(lines) + "\n", encoding="utf8")


def damaged_file(name, damage):
    def case():
        nlp, ner = pipeline()
        ner.set_demonstrations(
            [{"text": f"Ada met Bob {i}.", "spans": [{"start": 0, "end": 3, "label": "person"}]} for i in range(3)]
        )
        d = Path(tempfile.mkdtemp())
        nlp.to_disk(d / "p")
        damage(d / "p" / "llm_lar_ner" / name)
        try:
            spacy.load(d / "p")
        finally:
            shutil.rmtree(d)
        return "loaded"

    return case


def torch_smollm2():
    nlp = spacy.blank("en")
    backend = {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": "smollm2-135m", "engine": "torch"}
    nlp.add_pipe("llm_lar_ner", config={"labels": ["person"], "zero_shot": True, "backend": backend})
    return "constructed (refused only at the first batch, after loading)"


def chinese_in_english():
    nlp, ner = pipeline(answer=lambda q: "北京 | location")
    text = "我昨天去了北京，见到了很多朋友，然后我们一起去吃了烤鸭，晚上还看了一场非常精彩的京剧表演。"
    doc = nlp(text * 3)
    return ents(doc)


CASES = [
    ("empty text", lambda: ents(pipeline()[0](""))),
    ("whitespace only", lambda: ents(pipeline()[0]("  \n\t "))),
    ("emoji and CJK", lambda: ents(pipeline(answer=lambda q: "東京 | location")[0]("🙂 東京 に行く"))),
    ("a 1,000-token doc", lambda: len(pipeline()[0](" ".join(["word"] * 1000)))),
    (
        "bracket: input holds [Acme|organisation]",
        syntax_case("bracket", "The [Acme|organisation] deal", "Acme|organisation"),
    ),
    (
        "xml: input holds <person>Bob</person>",
        syntax_case("xml", "Say <person>Bob</person> now", "Bob</person", "person"),
    ),
    ("json: input holds JSON", syntax_case("json", 'He wrote {"text": "x", "label": "loc"} here', "x")),
    ("lines: mention starts with '- '", syntax_case("lines", "- Paris is far", "- Paris")),
    ("lines: input holds ' | '", syntax_case("lines", "Acme | Corp sued", "Acme | Corp")),
    ("newlines and tabs in text", syntax_case("bracket", "Acme\nCorp\tsued", "Acme")),
    (
        "labels with spaces / punctuation",
        lambda: ents(
            pipeline(labels=["political party", "B/W"], answer=lambda q: "Labour | political_party")[0]("Labour won.")
        ),
    ),
    ("labels that collide in prompts", lambda: pipeline(labels=["B/W", "B W"])),
    ("no labels", lambda: pipeline(labels=[])[0]("x")),
    ("on_error = 'ignore'", lambda: pipeline(on_error="ignore")),
    ("demonstrations file that does not exist", lambda: pipeline()[1].set_demonstrations("/nonexistent.jsonl")),
    (
        "demonstration span outside its text",
        lambda: pipeline()[1].set_demonstrations(
            [{"text": "ab", "spans": [{"start": 0, "end": 9, "label": "person"}]}]
        ),
    ),
    ("saved pipeline missing demonstrations.jsonl", missing_demos),
    ("saved pipeline with no demonstrations, zero_shot unset", empty_demos_saved),
    ("retriever without a pool", lambda: pipeline(retriever={"@misc": "spacy_llmner.Retriever.v1"})[0]("x")),
    ("cache file that is not a database", cache_case(b"garbage" * 500)),
    ("cache file truncated to its header", cache_case(b"SQLite format 3\x00" + b"\x10\x00" + b"\x00" * 80)),
    ("server answers 200 with a cut body", http_case(b'{"choices": [{"te')),
    ("server answers 200 with HTML", http_case(b"<html>busy</html>")),
    (
        "server ignores the grammar field",
        http_case(
            json.dumps({"choices": [{"text": "Sure, Paris is a city."}]}).encode(), grammar_field="guided_grammar"
        ),
    ),
    ("NUL byte in the text", c_string_case("Barack\x00 Obama met Angela Merkel in Paris.")),
    ("escape sequence and bell around an entity", c_string_case("They saw \x1b[31mAngela Merkel\x07 in Paris.")),
    ("answer cut by max_new_tokens = 1", cut_answer),
    ("corrupt adapter GGUF (truncated; a subprocess)", corrupt_adapter),
    ("saved pipeline: labels.json damaged", damaged_file("labels.json", lambda p: p.write_text('["person", nul'))),
    ("saved pipeline: demonstrations.jsonl line 2 broken", damaged_file("demonstrations.jsonl", cut_line_2)),
    ("engine = 'torch' with SmolLM2 (construction only)", torch_smollm2),
    ("Chinese text in a blank English pipeline", chinese_in_english),
]


def main():
    md = "--markdown" in sys.argv
    if md:
        print("| case | outcome | output | warnings |\n|---|---|---|---|")
    for name, case in CASES:
        status, out, warned = run(case)
        if md:
            print(
                f"| {name} | {status.replace('|', '/')} | {str(out).replace('|', '/')[:80]} | "
                f"{'; '.join(warned).replace('|', '/')[:160]} |"
            )
        else:
            print(f"- {name}: {status} -> {out!r}" + (f"  [warning: {'; '.join(warned)}]" if warned else ""))


if __name__ == "__main__":
    main()
