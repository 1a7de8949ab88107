"""Bad input: control characters and odd Unicode in the text, damaged files of a saved pipeline, settings the
backend cannot honour, text the tokenizer cannot split."""

import json
import shutil
import warnings

import catalogue
import pytest
import spacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacy_llmner.formats import FORMATS, gbnf
from spacy_llmner.prompt import CONTROL, display
from spacy_llmner.reading import FileReadError

from fakes import FakeBackend, add_fake_ner

ENTITIES = {"Angela Merkel": "person", "Paris": "location", "Acme Corp": "organisation", "Oslo": "location"}
FILLER = ["met", "in", "the", "café", "and", "visited", "ok", "x"]
# (lone surrogates cannot be in a Doc: spaCy's tokenizer refuses them; they can be in demonstrations, below)
ODD = [
    "\x00",
    "\x07",
    "\x1b[31m",
    "\x7f",
    "\x85",
    "\x9b",
    "\x1c",
    "\u200d",
    "\u200f",
    "\u202e",
    "\u0301",
    "\ufeff",
    "\t",
    "\n",
    "\r\n",
]
odd = st.lists(st.sampled_from(ODD), min_size=1, max_size=3).map("".join)
# a word: filler, maybe with odd characters glued on (combining marks, escapes, joiners inside a non-entity word)
word = st.one_of(st.sampled_from(FILLER), st.tuples(st.sampled_from(FILLER), odd).map("".join), odd)
pieces = st.lists(st.one_of(word, st.sampled_from(sorted(ENTITIES))), min_size=1, max_size=10)


class Faithful(FakeBackend):
    """Names every entity of ENTITIES the shown text holds, in the request's format; records what it was shown."""

    def __init__(self, fmt):
        self.fmt = FORMATS[fmt]()
        self.shown = []
        super().__init__(self.answer_for)

    def answer_for(self, query: str) -> str:
        self.shown.append(query)
        spans = []
        for name, label in ENTITIES.items():
            start = query.find(name)
            while start >= 0:
                spans.append((start, start + len(name), label))
                start = query.find(name, start + 1)
        return self.fmt.render(query, sorted(spans))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(FORMATS)), parts=pieces)
def test_control_characters_never_reach_the_model_or_a_span(fmt, parts):
    text = " ".join(parts)
    nlp = spacy.blank("en")
    fmt_cfg = {"@misc": f"spacy_llmner.{FORMATS[fmt].__name__}.v1"}
    ner = add_fake_ner(nlp, None, labels=sorted(set(ENTITIES.values())), format=fmt_cfg)
    ner.backend = backend = Faithful(fmt)
    ner.constrained = True  # the grammar is built for the text and must accept the faithful answer
    doc = nlp(text)  # never crashes
    for req in backend.requests:
        assert not CONTROL.search(req.prompt), "a control character reached the model"
        req.prompt.encode("utf8")  # no lone surrogate: every backend can send it
        answer = backend.answer_for(req.prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0])
        assert gbnf.accepts(req.grammar, answer + FORMATS[fmt]().stop[0]), answer
    for span in doc.spans["llm_ner"]:
        assert doc.text[span.start_char : span.end_char] == span.text
        assert not CONTROL.search(span.text)
    # the entities of the clean text are found where the odd characters sit outside them (between words)
    assert ENTITIES.items() >= {(s.text, s.label_) for s in doc.spans["llm_ner"]}
    expected = {p for p in parts if p in ENTITIES}
    assert {s.text for s in doc.spans["llm_ner"]} == expected


def test_text_reaches_the_model_intact_but_for_control_characters(nlp):
    ner = add_fake_ner(nlp, lambda q: "none")
    # a demonstration read from JSON may hold a lone surrogate ("\ud800" escapes): not encodable as UTF-8
    ner.set_demonstrations([{"text": "Ada\ud800 met\x00 Bob.", "spans": [{"start": 0, "end": 3, "label": "person"}]}])
    text = "Barack\x00 Obama met\u200d Ang\u0301ela \u202eMerkel\x1b[31m in \x9bParis\x07."
    nlp(text)
    prompt = ner.backend.requests[0].prompt
    shown = prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
    assert shown == display(text).rstrip()
    assert len(display(text)) == len(text)  # offsets kept
    assert "Barack  Obama met\u200d Ang\u0301ela \u202eMerkel [31m in  Paris ." == shown
    assert "Sentence: Ada  met  Bob." in prompt
    prompt.encode("utf8")


def test_span_on_a_token_holding_a_control_character_is_contracted_or_dropped(nlp):
    """The model saw spaces there; a span snapped onto such a token keeps only the clean tokens of the answer."""
    add_fake_ner(nlp, lambda q: "Angela Merkel | person\nParis | location", alignment_mode="expand")
    doc = nlp("Angela Merkel\x07 visited Paris.")
    assert [(e.text, e.label_) for e in doc.spans["llm_ner"]] == [("Angela", "person"), ("Paris", "location")]
    doc = nlp("Merkel\x07 visited Paris.")  # nothing clean is left of the first: dropped
    assert [(e.text, e.label_) for e in doc.spans["llm_ner"]] == [("Paris", "location")]


# ---- a token that cannot be a word ----------------------------------------------------------------------------
def test_a_token_longer_than_any_word_warns_once_naming_the_language(nlp):
    add_fake_ner(nlp, lambda q: "none")
    chinese = "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。" * 5
    with pytest.warns(UserWarning, match=r'spacy\.blank\("zh"\)'):
        nlp(chinese)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nlp(chinese)
        nlp("A normal English sentence.")


def test_normal_text_does_not_warn_about_tokens(nlp):
    add_fake_ner(nlp, lambda q: "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nlp("Supercalifragilisticexpialidocious is long but fine, and so is https://example.org/a/b/c.")


# ---- settings the backend cannot honour -----------------------------------------------------------------------
def test_constrained_true_on_a_backend_without_grammars_is_refused_at_construction(nlp):
    backend = {"@llm_models": "spacy_llmner.OpenAICompat.v1", "base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(ValueError, match=r"llm_lar_ner: constrained = true.*grammar_field"):
        nlp.add_pipe("llm_lar_ner", config={"labels": ["x"], "backend": backend, "constrained": True})
    ner = nlp.add_pipe("llm_lar_ner", config={"labels": ["x"], "backend": backend})  # null: where it can
    assert not ner.constrained
    with_grammar = dict(backend, grammar_field="vllm")
    ner = spacy.blank("en").add_pipe("llm_lar_ner", config={"labels": ["x"], "backend": with_grammar})
    assert ner.constrained


# ---- damaged files of a saved pipeline ------------------------------------------------------------------------
def saved(tmp_path, nlp, retriever=False):
    cfg = {"retriever": {"@misc": "spacy_llmner.Retriever.v1"}} if retriever else {}
    ner = add_fake_ner(nlp, lambda q: "none", zero_shot=False, **cfg)
    demos = [
        {"text": f"Ada met Bob in Rome {i}.", "spans": [{"start": 0, "end": 3, "label": "person"}]} for i in range(9)
    ]
    if retriever:
        ner.initialize(pool=demos)
    else:
        ner.set_demonstrations(demos)
    nlp.to_disk(tmp_path / "p")
    return tmp_path / "p" / "llm_lar_ner"


@pytest.mark.parametrize(
    "file,damage,line",
    [
        ("labels.json", b'["person", nul', None),
        ("labels.json", b'{"person": 1}', None),
        ("demonstrations.jsonl", None, 7),
        ("files.json", b"[1, 2", None),
    ],
)
def test_a_damaged_file_names_the_component_the_file_and_the_line(tmp_path, nlp, file, damage, line):
    folder = saved(tmp_path, nlp)
    path = folder / file
    if damage is None:  # a broken line 7
        lines = path.read_text(encoding="utf8").splitlines()
        lines[6] = lines[6][:20]
        path.write_text("\n".join(lines) + "\n", encoding="utf8")
    else:
        path.write_bytes(damage)
    with pytest.raises(FileReadError) as err:
        spacy.load(tmp_path / "p")
    message = str(err.value)
    assert message.startswith("llm_lar_ner: ") and str(path) in message
    assert (f"line {line}" in message) == (line is not None)


def test_a_demonstration_outside_its_text_names_its_line(tmp_path, nlp):
    folder = saved(tmp_path, nlp)
    path = folder / "demonstrations.jsonl"
    lines = path.read_text(encoding="utf8").splitlines()
    lines[2] = json.dumps({"text": "ab", "spans": [{"start": 0, "end": 9, "label": "person"}]})
    path.write_text("\n".join(lines) + "\n", encoding="utf8")
    with pytest.raises(FileReadError, match=r"demonstrations\.jsonl, line 3: .*outside its text"):
        spacy.load(tmp_path / "p")


@pytest.mark.parametrize("file", ["demonstrations.jsonl", "sentence.npy", "piece_offsets.npy"])
def test_a_damaged_pool_file_names_the_component_and_the_file(tmp_path, nlp, file):
    folder = saved(tmp_path, nlp, retriever=True)
    path = folder / "pool" / file
    if file.endswith(".jsonl"):  # one demonstration fewer than the arrays hold
        path.write_text("".join(path.read_text(encoding="utf8").splitlines(keepends=True)[:-1]), encoding="utf8")
        culprit = folder / "pool" / "sentence.npy"
    else:
        path.write_bytes(path.read_bytes()[:40])
        culprit = path
    with pytest.raises(FileReadError) as err:
        spacy.load(tmp_path / "p")
    assert str(err.value).startswith("llm_lar_ner: ") and str(culprit) in str(err.value)


def test_damaged_alignment_and_span_memory_name_the_file(tmp_path):
    from spacy_llmner.labels.alignment import LabelAlignment
    from spacy_llmner.lar import SpanMemory
    from spacy_llmner.saving import disk_readers

    nlp = spacy.blank("en")
    ner = add_fake_ner(nlp, lambda q: "none")
    (tmp_path / "alignment.json").write_text('{"source": ["PER"]}')
    with pytest.raises(FileReadError, match=r"llm_lar_ner: cannot read .*alignment\.json: KeyError"):
        disk_readers(ner)["alignment.json"](tmp_path / "alignment.json")
    import numpy as np

    SpanMemory(np.ones((2, 4), dtype="float32"), ["a", "b"]).to_disk(tmp_path / "span_memory")
    (tmp_path / "span_memory.json").write_text('["a"]')
    with pytest.raises(FileReadError, match=r"llm_lar_ner: cannot read .*span_memory\.json: .*1 labels"):
        disk_readers(ner)["span_memory"](tmp_path / "span_memory")
    assert LabelAlignment  # the readers are the classes' own, called through the component's


def test_damaged_calibration_and_manifest_name_the_file(tmp_path, monkeypatch):
    from spacy_llmner import adapters
    from spacy_llmner.backends.llamacpp import LlamaCppBackend

    folder = tmp_path / "my-adapter"
    shutil.copytree(adapters.folder("ner-v2"), folder)
    (folder / "calibration.json").write_text('{"knots": [[0.1, 0.2], [0.3]]}')
    adapters.adapters.register("broken-test-adapter", func=lambda: folder)
    try:
        backend = LlamaCppBackend(adapter="broken-test-adapter")
        with pytest.raises(FileReadError, match=r"adapter 'broken-test-adapter'.*calibration\.json"):
            backend.calibration  # noqa: B018
        nlp = spacy.blank("en")
        add_fake_ner(nlp, lambda q: "none")
        monkeypatch.setattr(FakeBackend, "calibration", property(lambda self: backend.calibration), raising=False)
        with pytest.raises(FileReadError, match=r"^llm_lar_ner \(llama\.cpp backend, adapter .*calibration\.json"):
            nlp("Paris is big.")
        (folder / "manifest.json").write_text('{"base_model": ')
        with pytest.raises(FileReadError, match=r"adapter 'broken-test-adapter': cannot read .*manifest\.json"):
            LlamaCppBackend(adapter="broken-test-adapter")
    finally:
        catalogue.REGISTRY.pop(("spacy_llmner", "adapters", "broken-test-adapter"), None)


# ---- the real model ---------------------------------------------------------------------------------------------
REAL_DEMOS = [
    {
        "text": "Angela Merkel visited Paris with the Social Democratic Party.",
        "spans": [{"start": 0, "end": 13, "label": "person"}, {"start": 22, "end": 27, "label": "location"}],
    },
    {
        "text": "Tony Blair spoke in London.",
        "spans": [{"start": 0, "end": 10, "label": "person"}, {"start": 20, "end": 26, "label": "location"}],
    },
]


@pytest.mark.model
def test_real_model_control_characters_and_cut_answers():
    """A NUL used to cut the prompt there (the chunk got no entities); escapes ended up inside entities. The
    demonstrated names are found around them, no span holds a control character; an answer cut by max_new_tokens
    is counted and warned about."""
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("llm_lar_ner", config={"labels": ["person", "location"]})
    ner.set_demonstrations(REAL_DEMOS)
    doc = nlp("Barack\x00 Obama met Angela Merkel in Paris.")
    found = {(s.text, s.label_) for s in doc.spans["llm_ner"]}
    assert {("Angela Merkel", "person"), ("Paris", "location")} <= found
    doc = nlp("\x1b[31mAngela Merkel\x07 visited Paris\x00 and London.")
    assert ("London", "location") in {(s.text, s.label_) for s in doc.spans["llm_ner"]}
    assert not any(CONTROL.search(s.text) for s in doc.spans["llm_ner"])
    assert doc._.llm_ner_usage["llm_lar_ner"]["truncated"] == 0
    ner.max_new_tokens = 2
    with pytest.warns(UserWarning, match="max_new_tokens = 2"):
        doc = nlp("Angela Merkel visited Paris with the Social Democratic Party.")
    assert doc._.llm_ner_usage["llm_lar_ner"]["truncated"] == 1


def test_engine_and_adapter_the_model_cannot_take_are_refused_at_construction(tmp_path):
    """Refused when the backend is made (names and GGUF headers only, nothing loaded), not at the first batch."""
    import gguf

    from spacy_llmner import adapters
    from spacy_llmner.backends.llamacpp import LlamaCppBackend
    from spacy_llmner.ty import BackendError

    mamba = tmp_path / "mamba.gguf"  # a header alone: the architecture is all the check reads
    w = gguf.GGUFWriter(str(mamba), arch="mamba")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(BackendError, match=r"engine 'torch' runs gemma3, llama.*mamba\.gguf'? is a mamba model"):
        LlamaCppBackend(model=str(mamba), engine="torch", adapter=None)
    llama3 = tmp_path / "llama3.gguf"  # an architecture the engine runs, a tokenizer it does not build
    w = gguf.GGUFWriter(str(llama3), arch="llama")
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("llama-bpe")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(BackendError, match=r"tokenizer 'gpt2' \(pre-tokenizer 'llama-bpe'\).*engine = 'llama.cpp'"):
        LlamaCppBackend(model=str(llama3), engine="torch", adapter=None)
    with pytest.raises(BackendError, match=r"made for a gemma3 model; 'smollm2-135m' is a llama model"):
        LlamaCppBackend(model="smollm2-135m", adapter=str(adapters.adapter_path("ner-v2")))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(adapters.adapter_path("ner-v2").read_bytes()[:1000])
    with pytest.raises(BackendError, match=str(cut)):
        LlamaCppBackend(adapter=str(cut))
    nlp = spacy.blank("en")
    backend = {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": str(mamba)}
    with pytest.raises(BackendError, match="engine 'torch'"):  # the default engine
        nlp.add_pipe("llm_lar_ner", config={"labels": ["x"], "backend": backend})
    with pytest.raises(BackendError, match=r"temperature must be a number ≥ 0 \(0: greedy\), not -0.5"):
        LlamaCppBackend(temperature=-0.5)
    LlamaCppBackend(model="smollm2-135m", adapter=None)  # what it can serve is made as before
    LlamaCppBackend(model=str(mamba), engine="llama.cpp", adapter=None)


def test_a_line_repeated_past_three_copies_ends_the_answer_not_the_token_limit():
    """Greedy loops (one line written until max_new_tokens) end at the fourth copy of a line; the answer before it
    is kept. Three copies are allowed: a text may name the same entity three times."""
    from spacy_llmner.backends.batched import _Seq, extend, looping

    assert not looping("Paris | location\nParis | location\nParis | location\n")
    assert looping("Paris | location\nRome | location\nParis | location\nParis | location\nParis | location\n")
    assert not looping("\n\n\n\n\n") and not looping("a | x\nb | y\n")
    s = _Seq([], 1000, ("\n\n",), None)
    for ch in "A | x\n" * 10:  # one character per token
        if extend(s, ord(ch), ch.encode(), lambda: 0.0) is None:
            break
    assert s.looped and not s.truncated and s.text == "A | x\n" * 3
