"""The shipped configs assemble with spaCy's own CLI and load back with their demonstrations."""

import subprocess
import sys
from pathlib import Path

import pytest
import spacy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["onepass.cfg", "openai_server.cfg"])
def test_config_assembles_and_loads_without_network(config, tmp_path):
    out = tmp_path / "pipe"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "spacy",
            "assemble",
            str(ROOT / "configs" / config),
            str(out),
            "--paths.demonstrations",
            str(ROOT / "assets" / "demonstrations.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    nlp = spacy.load(out)
    ner = nlp.get_pipe("llm_lar_ner")
    assert "person" in ner.labels and len(ner.demonstrations) == 6
    assert (out / "llm_lar_ner" / "demonstrations.jsonl").exists()


def _tiny_source_ner(path, data=None, steps=40):
    """A real tok2vec + ner pipeline trained for a moment on ``data`` ((text, [(start, end, label)]); default two
    fixture sentences, PER / LOC)."""
    import random

    from spacy.training import Example

    nlp = spacy.blank("en")
    nlp.add_pipe("tok2vec")
    nlp.add_pipe("ner", config={"model": {"tok2vec": {"@architectures": "spacy.Tok2VecListener.v1", "width": 96}}})
    data = data or [
        ("Angela Merkel visited Germany .", [(0, 13, "PER"), (22, 29, "LOC")]),
        ("Olaf Scholz flew to France .", [(0, 11, "PER"), (20, 26, "LOC")]),
    ]
    examples = [Example.from_dict(nlp.make_doc(t), {"entities": e}) for t, e in data]
    optimizer = nlp.initialize(lambda: examples)
    random.seed(0)
    for _ in range(steps):
        nlp.update(examples, sgd=optimizer, drop=0.0)
    nlp.to_disk(path)


def test_lar_config_assembles_with_a_sourced_ner_and_learns_its_alignment(tmp_path):
    import srsly

    _tiny_source_ner(tmp_path / "source")
    corpus = tmp_path / "train.jsonl"
    srsly.write_jsonl(
        corpus,
        [
            {
                "text": "Angela Merkel visited Germany .",
                "spans": [{"start": 0, "end": 13, "label": "politician"}, {"start": 22, "end": 29, "label": "country"}],
            },
            {
                "text": "Olaf Scholz flew to France .",
                "spans": [{"start": 0, "end": 11, "label": "politician"}, {"start": 20, "end": 26, "label": "country"}],
            },
        ],
    )
    out = tmp_path / "pipe"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "spacy",
            "assemble",
            str(ROOT / "configs" / "lar.cfg"),
            str(out),
            "--paths.source",
            str(tmp_path / "source"),
            "--paths.train",
            str(corpus),
            "--paths.demonstrations",
            str(ROOT / "assets" / "demonstrations.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    alignment = spacy.load(out).get_pipe("llm_lar_ner").alignment
    assert alignment.candidates("PER", 1)[0][0] == "politician"
    assert alignment.candidates("LOC", 1)[0][0] == "country"


@pytest.mark.model
def test_pool_fit_config_fits_at_assemble_time_and_loads_its_fit(tmp_path):
    """configs/pool_fit.cfg with the shipped model: spacy assemble annotates the pool (the six shipped
    demonstrations) to fit it, and the saved pipeline loads the fit back."""
    out = tmp_path / "pipe"
    res = subprocess.run(
        [sys.executable, "-m", "spacy", "assemble", str(ROOT / "configs" / "pool_fit.cfg"), str(out)]
        + ["--paths.train", str(ROOT / "assets" / "demonstrations.jsonl")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    fit = spacy.load(out).get_pipe("llm_lar_ner").pool_fit
    assert fit.report["docs"] == 6 and len(fit.lexicon) > 0
    assert fit.report["fitted_f"] >= fit.report["lexicon_f"]


@pytest.mark.model
def test_pool_student_config_unites_the_fitted_llm_and_a_spacy_model(tmp_path):
    """configs/pool_student.cfg with the shipped model and a spaCy NER trained on the same pool (the six shipped
    demonstrations), whose union chooses its sources per label on a dev set (the pool again, for the plumbing): it
    assembles, loads back, and its entities are the spans of the members each label's sources name, united, the
    LLM's winning overlaps."""
    import srsly

    pool = ROOT / "assets" / "demonstrations.jsonl"
    data = [(d["text"], [(s["start"], s["end"], s["label"]) for s in d["spans"]]) for d in srsly.read_jsonl(pool)]
    _tiny_source_ner(tmp_path / "student", data, steps=60)
    out = tmp_path / "pipe"
    res = subprocess.run(
        [sys.executable, "-m", "spacy", "assemble", str(ROOT / "configs" / "pool_student.cfg"), str(out)]
        + ["--paths.train", str(pool), "--paths.student", str(tmp_path / "student"), "--paths.dev", str(pool)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    nlp = spacy.load(out)
    ens = nlp.get_pipe("llm_ner_ensemble")
    assert ens.voting == "union" and nlp.get_pipe("llm_lar_ner").pool_fit is not None
    assert ens.fitted["dev_docs"] == 6 and ens.fitted["dev_f1"] >= ens.fitted["union_dev_f1"]
    found = {"llm": set(), "student": set()}
    for text, _ in data[:3] + [("Angela Merkel met the Red Cross in Geneva.", [])]:
        doc = nlp(text)
        ents = {(e.start, e.end, e.label_) for e in doc.ents}
        llm = {(s.start, s.end, s.label_) for s in doc.spans["llm_ner_ensemble:llm_lar_ner"]}
        student = {(s.start, s.end, s.label_) for s in doc.spans["llm_ner_ensemble:student_ner"]}
        found["llm"] |= llm
        found["student"] |= student
        # the spans that count: those of the members each label's sources name (all members where none are named)
        llm = {s for s in llm if "llm_lar_ner" in ens.sources.get(s[2], ("llm_lar_ner",))}
        student = {s for s in student if "student_ner" in ens.sources.get(s[2], ("student_ner",))}

        def alone(span, others):
            return not any(o != span and o[0] < span[1] and span[0] < o[1] for o in others)

        assert ents <= llm | student
        assert {s for s in student if alone(s, llm)} <= ents  # what only the student found is added
        assert {s for s in llm if alone(s, llm)} <= ents  # the LLM's spans win over the student's
    assert found["llm"] and found["student"]  # both members contributed
