"""The spaCy projects workflow: `all` on the tiny fixture dataset (convert → train → assemble → evaluate → package →
install check), like explosion/projects' ner_demo test; plus the converters, the configs and the report."""

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import spacy
from spacy.tokens import DocBin

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "data"
SKIP = {
    ".venv",
    ".git",
    "training",
    "corpus",
    "pipelines",
    "packages",
    "metrics",
    "demo_output",
    ".pytest_cache",
    "__pycache__",
    ".hypothesis",
    "build",
    "dist",
    "project.lock",
    ".cache",
}


def _cli(*args, cwd=ROOT):
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout


def test_convert_bio_and_nested_jsonl(tmp_path):
    _cli("-m", "spacy_llmner.cli", "convert", str(FIXTURES / "crossner/politics/train.txt"), str(tmp_path / "t.spacy"))
    docs = list(DocBin().from_disk(tmp_path / "t.spacy").get_docs(spacy.blank("en").vocab))
    assert len(docs) == 12
    assert [(e.text, e.label_) for e in docs[0].ents] == [
        ("Angela Merkel", "politician"),
        ("Christian Democratic Union", "politicalparty"),
        ("Germany", "country"),
    ]
    nested = tmp_path / "nested.jsonl"
    nested.write_text(
        json.dumps(
            {
                "text": "IL-2 gene expression requires NF-kappa B.",
                "entities": [
                    {"start": 0, "end": 9, "label": "DNA"},
                    {"start": 0, "end": 4, "label": "protein"},
                    {"start": 30, "end": 40, "label": "protein"},
                ],
            }
        )
        + "\n"
    )
    out = _cli("-m", "spacy_llmner.cli", "convert", str(nested), str(tmp_path / "n.spacy"))
    assert "+1 nested" in out
    (doc,) = DocBin().from_disk(tmp_path / "n.spacy").get_docs(spacy.blank("en").vocab)
    assert sorted((s.text, s.label_) for s in doc.spans["sc"]) == [
        ("IL-2", "protein"),
        ("IL-2 gene", "DNA"),
        ("NF-kappa B", "protein"),
    ]
    assert [e.text for e in doc.ents] == ["IL-2 gene", "NF-kappa B"]


def test_nested_scorer_counts_nested_spans():
    from spacy.training import Example

    from spacy_llmner.corpora import nested_scorer

    nlp = spacy.blank("en")
    gold, pred = nlp.make_doc("IL-2 gene expression"), nlp.make_doc("IL-2 gene expression")
    gold.spans["sc"] = [gold.char_span(0, 9, "DNA"), gold.char_span(0, 4, "protein")]
    pred.spans["sc"] = [pred.char_span(0, 4, "protein")]
    scores = nested_scorer("sc")([Example(pred, gold)])
    assert scores["spans_sc_p"] == 1.0 and scores["spans_sc_r"] == 0.5


def test_report_writes_the_readme_block_table_and_plot(tmp_path):
    rows = []
    for domain, f in (("politics", 50.0), ("ai", 30.0)):
        for system, kind, add in (("spacy_ner", "system", 0), ("ens:weighted", "ensemble", 5)):
            rows.append(
                {
                    "domain": domain,
                    "system": system,
                    "kind": kind,
                    "n": 40,
                    "f1": f + add,
                    "seconds_per_sentence": 0.5 if kind == "ensemble" else 0.01,
                    "calls_per_sentence": 1,
                    "prompt_tokens_per_sentence": 100,
                    "completion_tokens_per_sentence": 10,
                }
            )
    result = {
        "args": {"n": 40, "dev_n": 40, "baseline_n": 10},
        "date": "2026-11-26T03:00",
        "machine": "x86_64",
        "models": {"gemma": "Gemma"},
        "rows": rows,
    }
    (tmp_path / "r.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- crossner:start -->\nold\n<!-- crossner:end -->\n\nafter\n")
    _cli(
        str(ROOT / "benchmarks" / "report.py"),
        "crossner",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "p.png"),
        "--readme",
        str(readme),
    )
    text = readme.read_text()
    assert "old" not in text and text.endswith("\n\nafter\n")
    assert "| spacy_ner | 50.0 | 30.0 | 40.0 | 100.00 |" in text and "| **ens:weighted** | 55.0 | 35.0 | 45.0 |" in text
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_every_shipped_config_parses_and_fills():
    from spacy_llmner.finetune import load_settings

    for cfg in sorted((ROOT / "configs").glob("*.cfg")):
        if cfg.name.startswith(
            ("finetune_", "adapter_")
        ):  # tuning settings: they name the pipeline config they tune for
            settings = load_settings(cfg)
            assert settings["data"]["sources"] and (ROOT / settings["prompt"]["config"]).exists(), cfg.name
            continue
        config = spacy.util.load_config(cfg)
        assert config["nlp"]["pipeline"], cfg.name


def test_project_yml_loads_as_spacy_project_reads_it():
    """weasel's own checks (a workflow named like a command, unknown steps) run on every `spacy project run`."""
    from weasel.util import load_project_config

    config = load_project_config(ROOT)
    commands = {c["name"] for c in config["commands"]}
    assert not commands & set(config["workflows"])
    for name, steps in config["workflows"].items():
        assert set(steps) <= commands, name
    assert config["workflows"]["distill"] == ["distill-data", "distill-run"]


@pytest.mark.model
def test_all_workflow_on_the_fixture_dataset_then_package_and_install(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    deps = site.getsitepackages()[0]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "spacy",
            "project",
            "run",
            "all",
            str(project),
            "--vars.data",
            str(FIXTURES),
            "--vars.steps",
            "20",
            "--vars.eval_every",
            "10",
            "--vars.n",
            "3",
            "--vars.package_name",
            "llmner_test",
            "--vars.install_from",
            deps,
        ],
        capture_output=True,
        text=True,
        cwd=project,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-4000:])
    for split, n in (("train", 12), ("dev", 4), ("test", 4), ("test_3", 3)):
        docs = list(DocBin().from_disk(project / f"corpus/politics/{split}.spacy").get_docs(spacy.blank("en").vocab))
        assert len(docs) == n
    baseline = json.loads((project / "metrics/politics_baseline_test3.json").read_text())
    llm = json.loads((project / "metrics/politics_retrieval_test3.json").read_text())
    assert "ents_per_type" in llm and 0.0 <= llm["ents_f"] <= 1.0 and 0.0 <= baseline["ents_f"] <= 1.0
    pipe = spacy.load(project / "pipelines/politics_retrieval").get_pipe("llm_lar_ner")
    assert set(pipe.labels) == {
        "country",
        "election",
        "event",
        "location",
        "organisation",
        "person",
        "politicalparty",
        "politician",
    }  # taken from the pool: none configured
    assert len(pipe.retriever.pool) == 12
    check = json.loads((project / "metrics/package_check.json").read_text())
    assert check["pipeline"] == ["llm_lar_ner"] and check["wheel_bytes"] > 0
    assert "/site-packages/spacy_llmner/" in check["spacy_llmner_from"]  # the wheel, not this checkout
    # the packaged demo pipeline carries only the project's own demonstrations, never benchmark data
    import zipfile

    wheel = zipfile.ZipFile(next((project / "packages").glob("**/en_llmner_test-*.whl")))
    packaged = {
        json.loads(line)["text"]
        for n in wheel.namelist()
        if n.endswith(".jsonl")
        for line in wheel.read(n).decode("utf8").splitlines()
        if line.strip()
    }
    ours = {
        json.loads(line)["text"]
        for line in (ROOT / "assets/demonstrations.jsonl").read_text().splitlines()
        if line.strip()
    }
    assert packaged and packaged <= ours


def test_pre_annotate_then_train_the_distilled_student(tmp_path):
    """Silver data from a pipeline (an entity ruler stands in for the LLM pipeline), then configs/student.cfg
    trains on gold + silver through the MixedCorpus reader."""
    teacher = spacy.blank("en")
    teacher.add_pipe("entity_ruler").add_patterns(
        [{"label": "politician", "pattern": "Olaf Scholz"}, {"label": "country", "pattern": "Germany"}]
    )
    teacher.to_disk(tmp_path / "teacher")
    texts = tmp_path / "texts.txt"
    texts.write_text("Olaf Scholz visited Germany .\nGermany voted .\nNothing here .\n")
    out = _cli(
        "-m", "spacy_llmner.cli", "pre-annotate", str(tmp_path / "teacher"), str(texts), str(tmp_path / "silver.spacy")
    )
    assert "3 docs annotated" in out
    silver = list(DocBin().from_disk(tmp_path / "silver.spacy").get_docs(spacy.blank("en").vocab))
    assert [[(e.text, e.label_) for e in d.ents] for d in silver] == [
        [("Olaf Scholz", "politician"), ("Germany", "country")],
        [("Germany", "country")],
        [],
    ]
    _cli("-m", "spacy_llmner.cli", "convert", str(FIXTURES / "crossner/politics/train.txt"), str(tmp_path / "g.spacy"))
    _cli(
        "-m",
        "spacy",
        "train",
        str(ROOT / "configs/student.cfg"),
        "--paths.train",
        str(tmp_path / "g.spacy"),
        "--paths.silver",
        str(tmp_path / "silver.spacy"),
        "--paths.dev",
        str(tmp_path / "g.spacy"),
        "--vars.max_steps",
        "6",
        "--vars.eval_frequency",
        "3",
        "--output",
        str(tmp_path / "student"),
    )
    student = spacy.load(tmp_path / "student" / "model-best")
    assert "politician" in student.get_pipe("ner").labels


def test_mixed_corpus_yields_gold_then_silver(tmp_path):
    from spacy_llmner.corpora import mixed_corpus

    nlp = spacy.blank("en")
    for name, text in (("gold", "Gold sentence ."), ("silver", "Silver sentence .")):
        DocBin(docs=[nlp.make_doc(text)] * 2).to_disk(tmp_path / f"{name}.spacy")
    read = mixed_corpus(str(tmp_path / "gold.spacy"), str(tmp_path / "silver.spacy"), silver_limit=1)
    assert [eg.reference.text for eg in read(nlp)] == ["Gold sentence ."] * 2 + ["Silver sentence ."]


@pytest.mark.model
def test_transformer_student_trains_offline_on_the_packaged_minilm(tmp_path):
    """configs/student_trf.cfg through `spacy-llmner train-student`: spacy-transformers over the packaged MiniLM
    folder (HF_HUB_OFFLINE: nothing downloaded), a few steps on the fixture; the saved student loads without
    that folder (the encoder travels inside the pipeline) and annotates."""
    _cli("-m", "spacy_llmner.cli", "convert", str(FIXTURES / "crossner/politics/train.txt"), str(tmp_path / "g.spacy"))
    _cli(
        "-m",
        "spacy_llmner.cli",
        "train-student",
        str(ROOT / "configs/student_trf.cfg"),
        str(tmp_path / "trf"),
        "--paths.train",
        str(tmp_path / "g.spacy"),
        "--paths.dev",
        str(tmp_path / "g.spacy"),
        "--vars.max_steps",
        "12",
        "--vars.eval_frequency",
        "6",
        "--vars.warmup_steps",
        "2",
    )
    config = (tmp_path / "trf" / "model-best" / "config.cfg").read_text()
    (tmp_path / "trf" / "model-best" / "config.cfg").write_text(
        "\n".join(
            'transformer = "/nonexistent/minilm"' if line.startswith("transformer = ") else line
            for line in config.splitlines()
        )
    )
    student = spacy.load(tmp_path / "trf" / "model-best")
    assert student.pipe_names == ["transformer", "ner"] and "politician" in student.get_pipe("ner").labels
    assert student("Angela Merkel visited Paris .").has_annotation("ENT_IOB")
