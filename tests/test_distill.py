"""Distillation (spacy_llmner.annotation.distill, `spacy-llmner distill`): silver labels partial or hard, shards
that resume, clear errors, and the whole command with the real teacher: annotated corpus, mixed gold, a trained
and packaged student, a report; a rerun redoes nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import spacy
from spacy.tokens import Doc, DocBin, Span

from spacy_llmner.annotation.distill import DistillSettings, silver, write_shards

ROOT = Path(__file__).resolve().parents[1]
POLITICS = ROOT / "tests" / "fixtures" / "data" / "crossner" / "politics"


@pytest.fixture
def nlp():
    return spacy.blank("en")


def teacher_doc(nlp, spans, scores):
    doc = Doc(nlp.vocab, words="Angela Merkel met Joe Biden in Paris .".split())
    doc.spans["llm_ner"] = [Span(doc, s, e, label=lab) for s, e, lab in spans]
    doc.spans["llm_ner"].attrs["scores"] = scores
    doc.ents = [Span(doc, s, e, label=lab) for (s, e, lab), c in zip(spans, scores) if c is None or c >= 0.3]
    return doc


def test_partial_silver_leaves_unsure_spans_unannotated(nlp):
    doc = teacher_doc(nlp, [(0, 2, "person"), (3, 5, "person"), (6, 7, "location")], [0.9, 0.4, None])
    out, kept, missing = silver(doc, "llm_ner", 0.5, "partial")
    assert (kept, missing) == (2, 1)
    assert [(e.text, e.label_) for e in out.ents] == [("Angela Merkel", "person"), ("Paris", "location")]
    # the unsure "Joe Biden" is missing annotation (no loss), every other token a definite "O"
    assert [t.ent_iob_ for t in out] == ["B", "I", "O", "", "", "O", "B", "O"]
    hard, kept, missing = silver(doc, "llm_ner", 0.5, "hard")
    assert [e.text for e in hard.ents] == ["Angela Merkel", "Joe Biden", "Paris"] and missing == 0
    assert all(t.ent_iob_ in "BIO" for t in hard)


def test_a_second_opinion_the_teacher_lacks_is_left_unannotated(nlp):
    """The gold-only student finds "Joe Biden" (characters 18-27), which the teacher missed, and "Merkel", inside a
    kept teacher entity: the first becomes missing annotation, the second changes nothing."""
    doc = teacher_doc(nlp, [(0, 2, "person")], [0.9])
    out, kept, missing = silver(doc, "llm_ner", 0.5, "partial", check=[(18, 27, "person"), (7, 13, "location")])
    assert (kept, missing) == (1, 1) and [e.text for e in out.ents] == ["Angela Merkel"]
    assert [t.ent_iob_ for t in out] == ["B", "I", "O", "", "", "O", "O", "O"]


def test_an_unsure_span_inside_a_kept_entity_stays_that_entity(nlp):
    doc = teacher_doc(nlp, [(0, 2, "person"), (1, 2, "location")], [0.8, 0.1])
    out, kept, missing = silver(doc, "llm_ner", 0.5)
    assert [e.text for e in out.ents] == ["Angela Merkel"] and missing == 0


def test_shards_are_named_by_their_texts(tmp_path):
    texts = [f"text {i}" for i in range(5)]
    first = write_shards(texts, tmp_path, 2)
    assert [len(p.read_text().splitlines()) for p in first] == [2, 2, 1]
    assert write_shards(texts, tmp_path, 2) == first  # the same texts: the same shards
    fewer = write_shards(texts[:3], tmp_path, 2)
    assert fewer[0] == first[0] and fewer[1] != first[1]  # a changed shard is a new one, never a stale match


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"silver": "soft"}, "silver must be one of"),
        ({"students": ("tok2vec", "bert")}, "no config for student(s) ['bert']"),
    ],
)
def test_settings_refuse_what_they_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        DistillSettings(**kwargs)


def test_the_transformer_student_needs_its_extra(monkeypatch, tmp_path):
    """spacy-transformers is an extra (spaCy imports every installed plugin at start-up, and it brings transformers'
    model code): without it the default students leave the transformer one out, and asking for it is refused before
    any teacher annotation, naming the extra."""
    import importlib.metadata as md

    from spacy_llmner.annotation import distill as D

    core = [r for r in md.requires("spacy-llmner") if "extra ==" not in r]
    assert not [r for r in core if r.startswith("spacy-transformers")], core
    monkeypatch.chdir(ROOT)  # the student configs are named relative to the project
    monkeypatch.setattr(D, "has_spacy_transformers", lambda: False)
    assert D.default_students() == ("tok2vec",) and DistillSettings().students == ("tok2vec",)
    with pytest.raises(ValueError, match=r"student_trf.cfg needs spacy-transformers.*spacy-llmner\[student\]"):
        DistillSettings(students=("tok2vec", "trf"))
    with pytest.raises(ValueError, match="needs spacy-transformers"):
        D.train_student("configs/student_trf.cfg", tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(D, "has_spacy_transformers", lambda: True)
    assert DistillSettings().students == ("tok2vec", "trf")


def cli(*args, cwd=ROOT):
    # COLUMNS: typer's error panel (rich) wraps at the terminal's width; a long tmp path would be cut across lines
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}
    cmd = [sys.executable, "-m", "spacy_llmner.cli", "distill", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_bad_input_is_named_before_any_model_loads(tmp_path):
    res = cli(tmp_path / "nope.spacy", POLITICS / "test.txt", tmp_path / "out")
    assert res.returncode != 0 and "gold file not found" in res.stderr and "nope.spacy" in res.stderr
    res = cli(POLITICS / "train.txt", tmp_path / "corpus.txt", tmp_path / "out")
    assert res.returncode != 0 and "corpus not found" in res.stderr
    res = cli(POLITICS / "train.txt", POLITICS / "test.txt", tmp_path / "out", "--silver", "soft")
    assert res.returncode != 0 and "silver must be one of" in res.stderr
    assert not (tmp_path / "out" / "teacher").exists()


@pytest.mark.model
def test_distill_with_the_real_teacher_and_a_rerun_that_resumes(tmp_path):
    """Gold: the politics fixture's train sentences; corpus: its test sentences as text; one tok2vec student of a
    few steps, packaged. The teacher is the shipped default pipeline."""
    corpus = tmp_path / "corpus.txt"
    gold = spacy_docs(POLITICS / "test.txt")
    corpus.write_text("".join(d.text + "\n" for d in gold), encoding="utf8")
    args = [POLITICS / "train.txt", corpus, tmp_path / "out", "--dev", POLITICS / "dev.txt"]
    args += ["--students", "tok2vec", "--max-steps", 6, "--threshold", 0.5]
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher"]["texts"] == len(gold) and report["teacher"]["sentences_per_second"] > 0
    assert report["teacher"]["usage"]["llm_lar_ner"]["calls"] >= len(gold)
    silver_path = tmp_path / "out" / "train" / "silver.spacy"
    silver_docs = list(DocBin().from_disk(silver_path).get_docs(spacy.blank("en").vocab))
    assert [d.text for d in silver_docs] == [d.text for d in gold]
    # the teacher finds entities here (a confident case: politicians and parties in news sentences)
    assert report["silver"]["entities"] >= len(gold)
    assert sum(len(d.ents) for d in silver_docs) == report["silver"]["entities"]
    assert "groups" in report["mixing"] and report["silver"]["checked_by_gold_only_student"]
    assert 0 <= report["gold_only"]["dev"]["f1"] <= 100
    student = report["students"]["tok2vec"]
    assert Path(student["package"]["wheel"]).exists() and student["package"]["megabytes"] > 0.1
    assert student["words_per_second"] > 0 and 0 <= student["dev"]["f1"] <= 100
    assert (tmp_path / "out" / "report.md").read_text().count("| tok2vec |") == 1
    # a rerun finds every shard annotated and the student trained: nothing is redone
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already annotated" in again.stdout and "training the tok2vec student" not in again.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["students"] == report["students"]


def spacy_docs(path):
    from spacy_llmner.corpora import read_bio

    return read_bio(path, spacy.blank("en").vocab)
