"""Smoke runs of every script in benchmarks/ and scripts/ on the test fixtures, seconds each: an interface change
breaks a test here rather than a user's run. Each runs as a user runs it (a subprocess, from the repository root,
offline) on tests/fixtures/data and checks what it wrote or printed; some of those that load the embedded LLM call
the script's ``main`` in this process instead (``here``: its command line in ``sys.argv``), so that the model this
process has loaded is not loaded again. Scripts that need the embedded LLM run it on one or two fixture sentences
(marked ``model``); those that need a GPU or hours run a dry-run or argument-parsing path (said at each)."""

import json
import os
import re
import shlex
import site
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import spacy

from spacy_llmner.adapters import adapter_path
from spacy_llmner.backends.llamacpp import DEFAULT_ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "data"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
NOT_SCRIPTS = {"benchmarks/common.py"}  # imported by the benchmarks, run by none


def run(script, *args, cwd=ROOT, env=None):
    """Runs ``script`` (relative to the repository root) with this interpreter; its stdout, once it exited 0."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env or ENV, timeout=600)
    assert res.returncode == 0, (script, res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout


def test_every_script_has_a_smoke_run():
    source = Path(__file__).read_text()
    scripts = sorted(
        str(p.relative_to(ROOT))
        for d in ("benchmarks", "scripts")
        for p in (ROOT / d).iterdir()
        if p.suffix in (".py", ".sh")
    )
    missing = [s for s in scripts if s not in NOT_SCRIPTS and f'"{s}"' not in source]
    assert not missing, f"scripts without a smoke run in tests/test_scripts.py: {missing}"


@pytest.fixture(scope="module")
def spacy_models(tmp_path_factory):
    """Untrained (initialized) tok2vec NER pipelines from configs/tok2vec_ner.cfg, as `spacy train` would write
    them: the CoNLL source model (labels of the conll2003 fixture) and the politics target model."""
    from spacy.training import Example

    from spacy_llmner.corpora import read_bio

    out = tmp_path_factory.mktemp("spacy_models")
    for name, domain in (("source", "conll2003"), ("target", "politics")):
        nlp = spacy.util.load_model_from_config(spacy.util.load_config(ROOT / "configs/tok2vec_ner.cfg"))
        gold = read_bio(DATA / "crossner" / domain / "train.txt", nlp.vocab)
        nlp.initialize(lambda gold=gold, nlp=nlp: [Example(nlp.make_doc(d.text), d) for d in gold])
        nlp.to_disk(out / name)
    return out / "source", out / "target"


# -- without the LLM ------------------------------------------------------------------------------------------------


def test_code_metrics():
    out = run("scripts/code_metrics.py")
    assert int(re.search(r"^package modules: (\d+)$", out, re.M).group(1)) > 10
    for line in ("largest module: spacy_llmner/", "largest class: spacy_llmner/", "import cycles: "):
        assert line in out
    assert re.search(r"^private-member uses outside their module: \d+$", out, re.M)


def test_for_domains_runs_per_domain_and_skips_what_exists(tmp_path):
    (tmp_path / "b.done").write_text("")
    touch = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
    out = run(
        "scripts/for_domains.py",
        "a,b,c",
        "--creates",
        tmp_path / "{domain}.done",
        "--",
        "python",
        "-c",
        touch,
        tmp_path / "{domain}.done",
        "{domain}",
    )
    assert (tmp_path / "a.done").read_text() == "a" and (tmp_path / "c.done").read_text() == "c"
    assert (tmp_path / "b.done").read_text() == "" and "[b]" in out and "exists: skipped" in out


def test_probe_bad_input(monkeypatch):
    """Each case prints one line (its outcome: ok / error / warning) and the script exits 0."""
    probe = _script(monkeypatch, "scripts/probe_bad_input.py")
    out = run("scripts/probe_bad_input.py")
    for name, _ in probe.CASES:
        assert re.search(rf"^- {re.escape(name)}: (ok|error)", out, re.M), f"no line for case {name!r}:\n{out}"
    assert "is not a backend" not in out  # the canned backend keeps up with the Backend protocol


def test_retrieval_pool(tmp_path):
    run(
        "benchmarks/retrieval_pool.py",
        "--data",
        DATA,
        "--size",
        20,
        "--queries",
        2,
        "--out",
        tmp_path / "pool.json",
        "--tmp",
        tmp_path / "pool",
    )
    res = json.loads((tmp_path / "pool.json").read_text())
    assert res["real_sentences_encoded"] == 8 and res["pool_size"] == 20  # the conll2003 fixture, tiled
    assert set(res["strategies"]) == {"sentence", "bm25", "word", "span", "random"}
    assert {"load_seconds", "peak_rss_mb_after_word_queries"} <= set(res["query_process"])


FORMATS_RESULT = {
    "args": {"domain": "politics", "n": 2, "k": 2, "model": "gemma3-270m"},
    "date": "2026-01-01",
    "machine": "x86_64",
    "rows": [
        {
            "parallel": 2,
            "format": fmt,
            "constrained": constrained,
            "f1": 50.0,
            "p": 40.0,
            "r": 66.7,
            "sentences_per_second": 1.5,
            "prompt_tokens_per_sentence": 130.0,
            "completion_tokens_per_sentence": 12.0,
            "hallucinated": 0,
        }
        for fmt in ("lines", "json")
        for constrained in (False, True)
    ],
}


def test_report_formats_table(tmp_path):
    """(The crossner report: tests/test_project.py, and below on the benchmark's own output.)"""
    (tmp_path / "formats.json").write_text(json.dumps(FORMATS_RESULT))
    readme = tmp_path / "results.md"
    readme.write_text("# Results\n")
    out = run(
        "benchmarks/report.py",
        "formats",
        tmp_path / "formats.json",
        "--markdown",
        tmp_path / "formats.md",
        "--readme",
        readme,
    )
    assert "| lines | grammar | 2 | 50.0 | 40.0 | 66.7 | 1.50 | 130 | 12.0 | 0 |" in out
    assert (tmp_path / "formats.md").read_text() == out
    assert "<!-- results:start -->\nCrossNER politics test, first 2 sentences" in readme.read_text()


SPEED_RESULT = {
    "args": {"split": "test", "n": 2, "k": 3, "lower": False},
    "peak_gflops": {"float32": 300.0, "bfloat16": 1000.0},
    "domains": {"politics": {"base": {"sentences": 2, "sentences_per_second": 1.0}}},
    "average": {
        "base": {
            "f1": 50.0,
            "p": 40.0,
            "r": 66.7,
            "sentences_per_second": 1.0,
            "prompt_tokens_per_sentence": 140.0,
            "completion_tokens_per_sentence": 20.0,
            "engine_evaluated_tokens_per_sentence": 110.0,
            "engine_gflop_per_sentence": 30.0,
            "achieved_gflops": 100.0,
        }
    },
}


def test_speed_table(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps(SPEED_RESULT))
    out = run("benchmarks/speed_table.py", tmp_path / "speed.json")
    assert "| base | test first 2/domain | k = 3 | 50.0 (40.0 / 66.7) | 1.00 | 140 / 110 / 20 | 30 " in out
    assert "| 100 (10 % of 1000) |" in out


def test_check_package_installs_wheels_into_a_fresh_venv(tmp_path):
    """A pipeline wheel (an entity ruler: no LLM) and the spacy-llmner wheel, both built offline here, installed
    with --deps reusing this environment's site-packages, as tests/test_project.py's full workflow does."""
    import shutil

    from spacy.cli.package import package

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "location", "pattern": "Paris"}])
    nlp.to_disk(tmp_path / "pipe")
    (tmp_path / "packages").mkdir()
    package(tmp_path / "pipe", tmp_path / "packages", name="smoke", version="0.0.1", create_sdist=False, force=True)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "spacy_llmner", src / "spacy_llmner", ignore=shutil.ignore_patterns("__pycache__"))
    wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir"]
    for folder, dist in ((tmp_path / "packages/en_smoke-0.0.1", "dist"), (src, tmp_path / "dist")):
        subprocess.run([*wheel, str(folder / dist), str(folder)], check=True, capture_output=True)
    run(
        "scripts/check_package.py",
        tmp_path / "packages",
        "--name",
        "en_smoke",
        "--dist",
        tmp_path / "dist",
        "--deps",
        site.getsitepackages()[0],
        "--out",
        tmp_path / "check.json",
    )
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["wheel"] == "en_smoke-0.0.1-py3-none-any.whl" and check["dependencies"] == "reused"
    assert check["pipeline"] == ["entity_ruler"] and ["Paris", "location"] in check["entities"]


def test_cross_kernel_tests_dry_run():
    """The script runs the whole real-model suite per kernel variant (minutes each): `bash -n`, then --dry-run,
    which prints each run's environment and pytest command; what they name must exist."""
    script = ROOT / "scripts/cross_kernel_tests.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    res = subprocess.run(
        ["bash", str(script), "--dry-run", "/some/build"],
        capture_output=True,
        text=True,
        env={**ENV, "VARIANTS": "1 8;2 3"},
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "build=/some/build threads=1 parallel=8",
        "build=/some/build threads=2 parallel=3",
    ]
    words = shlex.split(lines[0].split(": ", 1)[1])
    conftest = (ROOT / "tests/conftest.py").read_text()
    for var in (w.split("=")[0] for w in words if w.startswith("SPACY_LLMNER_")):
        assert f'"{var}"' in conftest  # the variables conftest reads to change the backend's defaults
    assert (ROOT / words[words.index("-m") - 1]).name == "python" and "model" in words
    for path in (words[i + 1] for i, w in enumerate(words) if w == "--deselect"):
        assert (ROOT / path).exists(), path


def token_file(path: Path, datasets, per: int = 3) -> None:
    """A tiny `spacy-llmner finetune-data` .npz: ``per`` examples of made-up token ids per dataset."""
    rng = np.random.default_rng(0)
    tokens, start, n_prompt, n_answer, dataset = [], [], [], [], []
    for i, _ in enumerate(datasets):
        for _ in range(per):
            p, a = int(rng.integers(8, 16)), int(rng.integers(2, 5))
            start.append(len(tokens))
            tokens.extend(rng.integers(100, 5000, p + a).tolist())
            n_prompt.append(p)
            n_answer.append(a)
            dataset.append(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        tokens=np.asarray(tokens, dtype=np.int32),
        start=np.asarray(start, dtype=np.int64),
        n_prompt=np.asarray(n_prompt, dtype=np.int32),
        n_answer=np.asarray(n_answer, dtype=np.int32),
        dataset=np.asarray(dataset, dtype=np.int16),
        datasets=np.asarray(list(datasets)),
    )


NER_V1 = ["ai", "genia", "literature", "music", "politics", "science"]  # finetune-data names them so


def test_tune_adapter_dry_run(tmp_path):
    token_file(tmp_path / "ner-v1.npz", NER_V1)
    out = run(
        "scripts/tune_adapter.py",
        "--model",
        "gemma3-270m",
        "--data",
        tmp_path / "ner-v1.npz",
        "--exclude",
        "politics",
        "--out",
        tmp_path / "lora",
        "--batch",
        4,
        "--checkpoints",
        "0.5,1.0",
        "--dry-run",
    )
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["examples"] == 15 and "politics" not in plan["examples_by_dataset"]
    assert plan["steps"] == 4 and plan["checkpoints"] == ["ckpt-0.50", "ckpt-1.00"]
    assert not (tmp_path / "lora").exists()


# the runs of the measured H200 call (docs/tuning.md): all data, without the new sets, without one domain
GPU_RUNS = ["ner-v3:ner-v3.npz:0.54", "levers:ner-v3.npz:0.9:btc,sec_filings,anem", "loo-ai:ner-v3.npz:0.5785714:ai"]
NER_V3 = NER_V1 + ["btc", "sec_filings", "anem"]


def test_gpu_adapter_sh_calls_tune_adapter_with_arguments_it_takes(tmp_path):
    """The script needs a lent GPU machine and the stashed base model: `bash -n`, then the tune_adapter.py arguments
    it builds for each run of the measured call, as a --dry-run on a token file of ner-v3's names (no model, no GPU):
    a plan for each, the excluded datasets left out of it."""
    script = str(ROOT / "scripts/gpu_adapter.sh")
    subprocess.run(["bash", "-n", script], check=True)
    token_file(tmp_path / "data" / "ner-v3.npz", NER_V3, per=20)
    env = {**ENV, "STASH": str(tmp_path), "TUNE": str(tmp_path / "tune"), "EXPECT": "1.5728"}
    for spec in GPU_RUNS:
        args = subprocess.run(["bash", script, "args", spec], capture_output=True, text=True, env=env, check=True)
        args = args.stdout.splitlines()
        assert args[args.index("--expect-loss") + 1] == "1.5728" and "--bf16" in args
        plan = json.loads(run("scripts/tune_adapter.py", *args, "--dry-run", cwd=tmp_path).strip().splitlines()[-1])
        excluded = spec.split(":")[3].split(",") if spec.count(":") == 3 else []
        assert plan["steps"] > 0 and plan["checkpoints"] == ["ckpt-1.00"], spec
        assert set(plan["examples_by_dataset"]) == set(NER_V3) - set(excluded), spec


# -- with the embedded LLM (one or two fixture sentences) -----------------------------------------------------------


@pytest.mark.model
def test_decode_steps():
    out = run("benchmarks/decode_steps.py", "--steps", 2, "--widths", "1,2")
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| \d+ \|$", out, re.M)
    assert rows == ["1", "2"], out


@pytest.mark.model
def test_backend_memory():
    out = run("scripts/backend_memory.py", "--backends", 2)
    assert re.findall(r"^backend (\d): RSS [\d.]+ GB$", out, re.M) == ["1", "2"], out


@pytest.mark.model
def test_startup_times_the_demo_command_to_its_first_entity(tmp_path):
    out = run("benchmarks/startup.py", "--runs", 1, "--out", tmp_path / "startup.json")
    record = json.loads((tmp_path / "startup.json").read_text())
    run1 = record["runs"][0]
    # the first entity comes after the CLI's own start (it counts from after importing spaCy) and before the exit
    assert 0 < run1["cli_first_result_s"] < run1["first_entity_s"] < run1["exit_s"]
    assert record["median"] == run1 and "medians of 1" in out


@pytest.mark.model
def test_answer_snapshot(tmp_path, here):
    here("scripts/answer_snapshot.py", "--data", DATA, "--n", 1, "--out", tmp_path / "answers.json")
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert set(answers) == {"one_pass", "retrieval"}
    for rows in answers.values():
        assert len(rows) == 1 and rows[0]["text"].startswith("Margaret Thatcher")
        assert {"io", "spans"} <= set(rows[0]) and rows[0]["io"]


@pytest.mark.model
def test_formats_then_report(tmp_path, here):
    here(
        "benchmarks/formats.py",
        "--data",
        DATA,
        "--n",
        2,
        "--k",
        2,
        "--formats",
        "lines",
        "--parallel",
        2,
        "--out",
        tmp_path / "formats.json",
    )
    res = json.loads((tmp_path / "formats.json").read_text())
    assert [(r["format"], r["constrained"]) for r in res["rows"]] == [("lines", False), ("lines", True)]
    assert {"f1", "sentences_per_second", "prompt_tokens_per_sentence", "hallucinated"} <= set(res["rows"][0])
    readme = tmp_path / "results.md"
    readme.write_text("# Results\n")
    out = here("benchmarks/report.py", "formats", tmp_path / "formats.json", "--readme", readme)
    assert "| lines | free | 2 |" in out and "| lines | grammar | 2 |" in out


@pytest.mark.model
def test_retrieval(tmp_path, here):
    out = here(
        "benchmarks/retrieval.py",
        "--data",
        DATA,
        "--domains",
        "politics",
        "--strategies",
        "span,bm25",
        "--ks",
        2,
        "--n",
        1,
        "--parallel",
        2,
        "--out",
        tmp_path / "retrieval.json",
    )
    rows = json.loads((tmp_path / "retrieval.json").read_text())["rows"]
    assert [(r["strategy"], r["k"], r["n"]) for r in rows] == [("span", 2, 1), ("bm25", 2, 1)]
    assert "| span | 2 | " in out and "| bm25 | 2 | " in out


@pytest.mark.model
def test_lar(tmp_path, spacy_models, here):
    source, _ = spacy_models
    here(
        "benchmarks/lar.py",
        "--data",
        DATA,
        "--source",
        source,
        "--domains",
        "politics",
        "--variants",
        "onepass,source>knn",
        "--n",
        1,
        "--k",
        2,
        "--out",
        tmp_path / "lar.json",
    )
    res = json.loads((tmp_path / "lar.json").read_text())
    assert [(r["variant"], r["n"]) for r in res["rows"]] == [("onepass", 1), ("source>knn", 1)]
    assert res["rows"][0]["calls_per_sentence"] == 1 and res["rows"][1]["calls_per_sentence"] == 0
    assert "politics" in res["alignments"]


@pytest.mark.model
def test_crossner_then_revote_and_report(tmp_path, spacy_models, here):
    """Three systems (one LLM member) and the ensemble of the three; then --revote from the saved outputs, and
    the report on the result."""
    source, target = spacy_models
    out = tmp_path / "crossner.json"
    args = ["--data", DATA, "--domains", "politics", "--n", 1, "--dev-n", 1, "--source", source, "--out", out]
    here("benchmarks/crossner.py", *args, "--target-models", target, "--systems", "spacy_ner,knn,gemma_span")
    res = json.loads(out.read_text())
    f1 = {r["system"]: r["f1"] for r in res["rows"]}
    assert set(f1) == {
        "spacy_ner",
        "knn",
        "gemma_span",
        "ens_spacy+knn+gemma:majority",
        "ens_spacy+knn+gemma:weighted",
    }
    raw = json.loads(out.with_suffix(".outputs.json").read_text())
    assert {"truth", "test", "dev", "usage", "seconds"} <= set(raw["politics"]) and len(raw["politics"]["truth"]) == 1
    here("benchmarks/crossner.py", "--out", out, "--revote")
    assert {r["system"]: r["f1"] for r in json.loads(out.read_text())["rows"]} == f1
    readme = tmp_path / "results.md"
    readme.write_text("# Results\n")
    table = here("benchmarks/report.py", "crossner", out, "--plot", tmp_path / "c.png", "--readme", readme)
    assert "| gemma_span | " in table and "| **ens_spacy+knn+gemma:weighted** | " in table
    assert (tmp_path / "c.png").stat().st_size > 10_000


@pytest.mark.model
def test_finetune_then_speed_table(tmp_path, here):
    here(
        "benchmarks/finetune.py",
        "--data",
        DATA,
        "--system",
        "base=gemma3-270m+none",
        "--domains",
        "politics",
        "--n",
        1,
        "--k",
        2,
        "--batched",
        "--out",
        tmp_path / "speed.json",
    )
    res = json.loads((tmp_path / "speed.json").read_text())
    base = res["domains"]["politics"]["base"]
    assert base["sentences"] == 1 and base["calls_per_sentence"] == 1 and base["engine_evaluated_tokens_per_sentence"]
    assert set(res["peak_gflops"]) == {"float32", "bfloat16", "int8"} and set(res["average"]) == {"base"}
    out = here("benchmarks/speed_table.py", tmp_path / "speed.json")
    assert out.splitlines()[-1].startswith("| base | test first 1/domain | k = 2 | ")


@pytest.mark.model
def test_confidence(tmp_path, here):
    """With the shipped adapter's calibration (--fit needs 20 scored spans: more than the fixture gives quickly)."""
    here(
        "benchmarks/confidence.py",
        "--data",
        DATA,
        "--domains",
        "politics",
        "--n",
        2,
        "--k",
        2,
        "--out",
        tmp_path / "reliability.json",
    )
    res = json.loads((tmp_path / "reliability.json").read_text())
    assert res["spans"] > 0 and res["gold"] > 0 and res["bins"] and len(res["thresholds"]) == 8
    assert res["calibration"]["knots"] and res["calibrated"]["bins"]
    assert (tmp_path / "reliability.png").exists()


@pytest.mark.model
def test_annotation_study(tmp_path):
    """Every stage but `package` (wheels into ./packages) and `speed` (a re-measure), on the first 3 sentences of
    each split: the teacher on the llama.cpp engine with the shipped adapter (the study's torch engine and
    leave-one-domain-out adapters take minutes), one tok2vec student trained 2 steps."""
    run(
        "benchmarks/annotation_study.py",
        "--data",
        DATA,
        "--domains",
        "politics",
        "--stages",
        "prepare,teacher,students,report",
        "--students",
        "tok2vec",
        "--conditions",
        "d_mixed_pool",
        "--steps-tok2vec",
        2,
        "--engine",
        "llama.cpp",
        "--adapter",
        "ner-v2",
        "--limit",
        3,
        "--out",
        tmp_path / "study",
        "--report",
        tmp_path / "study.json",
    )
    res = json.loads((tmp_path / "study.json").read_text())["domains"]["politics"]
    assert res["teacher"]["sentences"] == 3 and "f1" in res["teacher"]
    assert {"all_additions", "merged_additions", "threshold_sweep"} <= set(res["refine"])
    assert set(res["students"]) == {"tok2vec_d_mixed_pool"} and "f1" in res["students"]["tok2vec_d_mixed_pool"]


@pytest.mark.model
def test_scale(tmp_path, here):
    """The local engine only (Ray's start-up costs tens of seconds) and one llama-cpp-python server."""
    here(
        "benchmarks/scale.py",
        "--data",
        DATA,
        "--n",
        2,
        "--shard",
        1,
        "--engines",
        "local:1",
        "--servers",
        1,
        "--out",
        tmp_path / "scale.json",
    )
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [r["setup"] for r in rows] == [
        "nlp.pipe, embedded model",
        "local engine, 1 actor(s), embedded model",
        "local engine, 1 actor(s), 1 server(s)",
    ]
    assert all(r["docs"] == 2 for r in rows) and rows[1]["manifest_docs"] == 2


@pytest.mark.model
def test_tune_adapter_steps_and_resumes(tmp_path):
    """LoRA on four made-up examples, two optimizer steps on the CPU: once straight through, once stopped after the
    first step (--max-minutes 0) and run again, which continues from <out>/resume.pt to the same losses and the same
    adapter; a rerun with another LoRA rank is refused before the model loads (loading dominates the time)."""
    from safetensors.numpy import load_file

    token_file(tmp_path / "data.npz", ["politics"], per=4)
    args = ["--model", "gemma3-270m", "--data", tmp_path / "data.npz", "--device", "cpu", "--batch", 2, "--r", 2]
    args += ["--max-steps", 2, "--save-every", 1]
    out = run("scripts/tune_adapter.py", *args, "--out", tmp_path / "whole")
    assert "tune_adapter: done, 2/2 steps" in out
    whole = json.loads((tmp_path / "whole/tuning.json").read_text())
    assert whole["steps_done"] == 2 and whole["checkpoints"] == ["ckpt-1.00"] and whole["examples"] == 4
    assert whole["resumed_after_step"] == 0

    out = run("scripts/tune_adapter.py", *args, "--out", tmp_path / "stopped", "--max-minutes", 0)
    assert "stopped after 0" in out and "step 1/2" in out and "tune_adapter: stopped, 1/2 steps" in out
    assert json.loads((tmp_path / "stopped/tuning.json").read_text())["steps_done"] == 1
    out = run("scripts/tune_adapter.py", *args, "--out", tmp_path / "stopped")
    assert "resumed after step 1/2" in out
    resumed = json.loads((tmp_path / "stopped/tuning.json").read_text())
    assert resumed["steps_done"] == 2 and resumed["resumed_after_step"] == 1
    assert resumed["losses"] == whole["losses"]
    a, b = (load_file(tmp_path / f / "ckpt-1.00" / "adapter_model.safetensors") for f in ("whole", "stopped"))
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-3) for k in a)
    assert any(np.abs(a[k]).max() > 0 for k in a if "lora_B" in k)  # trained: B starts at zero

    cmd = [sys.executable, str(ROOT / "scripts/tune_adapter.py"), *map(str, args), "--r", "4"]
    res = subprocess.run([*cmd, "--out", str(tmp_path / "stopped")], capture_output=True, text=True, env=ENV)
    assert res.returncode != 0 and "other settings (r)" in res.stderr and "--fresh" in res.stderr


@pytest.mark.model
def test_documents(tmp_path, here):
    """Two test sentences as one two-sentence document, every condition; the answer cache in tmp_path."""
    here(
        "benchmarks/documents.py",
        "--data",
        DATA,
        "--domains",
        "politics",
        "--n",
        2,
        "--per",
        2,
        "--k",
        2,
        "--cache",
        tmp_path / "cache.sqlite",
        "--out",
        tmp_path / "documents.json",
    )
    res = json.loads((tmp_path / "documents.json").read_text())
    got = res["domains"]["politics"]
    assert list(got) == ["sentences", "packed", "sentencizer", "doc_sents"]
    assert got["sentences"]["docs"] == 2 and got["packed"]["docs"] == 1 and got["packed"]["sentences"] == 2
    assert all({"f1", "prompts", "decoded", "truncated"} <= set(r) for r in got.values())
    assert set(res["f1_gap_to_sentences"]) == {"packed", "sentencizer", "doc_sents"}


def test_readme_tables(tmp_path):
    """The README's generated tables are what metrics/ gives (--check), and a changed metrics file changes them."""
    assert "up to date" in run("scripts/readme_tables.py", "--check")
    for name in (
        "full_test_base_k3",
        "full_test_v2_k3",
        "full_test_v2_k3_lower",
        "full_test_v2_k3_kept_pieces_amd_epyc_zen4",
        "full_test_v2_k3_before_kept_pieces_amd_epyc_zen4",
        "full_test_v2_k3_before_wider_amd_epyc_zen4",
        "full_test_v2_k3_parallel_amd_epyc_zen4_lark",
        "engine/avx2/full_test_v2_k3_amd_epyc_zen3_store",
    ):
        data = json.loads((ROOT / "metrics" / "speed" / f"{name}.json").read_text())
        for systems in data["domains"].values():
            for row in systems.values():
                row["f1"] = 12.5
        copy = tmp_path / "metrics" / "speed" / f"{name}.json"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(json.dumps(data))
    data = json.loads((ROOT / "metrics" / "real_use.json").read_text())
    for key, row in data["rows"].items():
        row["f1"] = 12.5 if key.startswith("paragraphs/") else row["f1"]
    # the dev choice follows the dev rows: the union made best on wikigold's dev sentences is the one shown
    data["rows"]["extra-dev/wikigold/cased@ner-v2+fit+spacy"]["f1"] = 99.0
    union_test = data["rows"]["extra/wikigold/cased@ner-v2+fit+spacy"]["f1"]
    (tmp_path / "metrics" / "real_use.json").write_text(json.dumps(data))
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    res = subprocess.run([sys.executable, str(ROOT / "scripts/readme_tables.py"), "--check", "--root", str(tmp_path)])
    assert res.returncode == 1
    assert "wrote quality" in run("scripts/readme_tables.py", "--root", tmp_path)
    assert "| **12.5** (" in (tmp_path / "README.md").read_text()
    wikigold = next(
        line for line in (tmp_path / "README.md").read_text().splitlines() if line.startswith("| wikigold (")
    )
    assert f"| {union_test:.1f} (fit ∪ spaCy) |" in wikigold


@pytest.mark.model
def test_distill_study(tmp_path):
    """The CrossNER politics fixture as the set: 4 gold, 2 dev, pools of 3 and all 6; tok2vec students of 4 steps
    and one transformer student of 2 on the condition best on dev (the teacher is the real default pipeline); the
    gold student again with a second seed; the best tok2vec and the transformer student packaged."""
    out = run(
        "benchmarks/distill_study.py",
        "--data",
        DATA,
        "--sets",
        "fixture",
        "--gold",
        4,
        "--dev",
        2,
        "--pools",
        "3,0",
        "--steps",
        "4,2",
        "--eval-every",
        "2,2",
        "--trf",
        "best",
        "--noise",
        "gold",
        "--noise-seeds",
        "1",
        "--out",
        tmp_path / "study",
        "--report",
        tmp_path / "study.json",
    )
    res = json.loads((tmp_path / "study.json").read_text())["sets"]["fixture"]
    assert res["teacher"]["test_sentences"] == 4 and res["teacher"]["pool_sentences"] == 6
    conds = (
        "gold",
        "all_gold",
        *(f"{m}_{n}" for m in ("hard", "partial", "partial_mix", "check", "check_mix") for n in ("3", "all")),
    )
    students = res["students"]
    (trf,) = [c for c in students if c.startswith("trf_")]  # --trf best: the LLM-assisted tok2vec best on dev
    assistants = {c: r["dev_f1"] for c, r in students.items() if c.startswith("tok2vec_") and "gold" not in c}
    assert students[f"tok2vec_{trf[4:]}"]["dev_f1"] == max(assistants.values())
    assert {f"tok2vec_{c}" for c in conds} | {trf} == set(students)
    assert all(r["words_per_second"] > 0 and r["test_sentences"] == 4 for r in res["students"].values())
    assert len(res["seed_noise"]["tok2vec_gold"]["f1"]) == 2  # seed 0 and seed 1
    assert students[trf]["wheel_megabytes"] > 1
    assert sum("wheel_megabytes" in r for r in res["students"].values()) == 2  # + the best tok2vec
    assert "| fixture | teacher" in out


def test_real_use_measures_again_only_rows_of_an_engine_that_got_answers_wrong(monkeypatch):
    """A torch row measured before the attention-mask fix is stale (measured again, marked † meanwhile); one measured
    by a later revision, which changed rounding only, stands; a llama.cpp row and a spaCy row never are."""
    from spacy_llmner.backends.llamacpp import TORCH_ENGINE_REVISION

    real_use = _script(monkeypatch, "benchmarks/real_use.py")
    key = "extra/btc/cased@ner-v2"
    assert real_use.stale(key, {"f1": 50.0})  # before revisions were recorded: revision 1
    assert real_use.stale(key, {"engine": "torch", "engine_revision": real_use.FIXED_IN_REVISION - 1})
    for revision in range(real_use.FIXED_IN_REVISION, TORCH_ENGINE_REVISION + 1):
        assert not real_use.stale(key, {"engine": "torch", "engine_revision": revision})
    assert not real_use.stale(key, {"engine": "llama.cpp"}) and not real_use.stale("extra/btc/cased/spacy", {})


def test_real_use_refuses_union_sources_without_sentences_to_choose_them_on(monkeypatch):
    """The union's sources are chosen on train sentences outside the pool: only beside --union-spacy, and not where
    those sentences are the ones scored (--extra-split dev)."""
    real_use = _script(monkeypatch, "benchmarks/real_use.py")
    for more in ((), ("--union-spacy", "--extra-split", "dev")):
        with pytest.raises(SystemExit, match="--union-sources chooses the union's sources"):
            real_use.main(["--pool-fit", "--union-sources", "3", *more])


def _script(monkeypatch, path: str):
    """The script at ``path`` (from the repository root) as a module, its folder on ``sys.path`` for its own
    imports (benchmarks/common.py)."""
    import importlib.util

    monkeypatch.syspath_prepend(str((ROOT / path).parent))
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_here(monkeypatch, capsys, script: str, *args) -> str:
    """``script``'s ``main()`` in this process, its command line in ``sys.argv``, from the repository root
    (``run``'s environment): what it printed. A model that this process loaded before is not loaded again (seconds
    per run)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
    module = _script(monkeypatch, script)
    capsys.readouterr()
    module.main()
    return capsys.readouterr().out


@pytest.fixture
def here(monkeypatch, capsys):
    """``run`` in this process (``run_here``)."""
    return partial(run_here, monkeypatch, capsys)


@pytest.mark.model
def test_real_use(tmp_path, here):
    """Every section on the fixtures with the real default pipeline: politics as paragraphs of two sentences and
    at k = 0 / 1, the conll2003 fixture as an extra set (pool 4, beside a spaCy model of 4 steps), the made-up nested
    set; cased and lower-cased. A rerun measures nothing again (every row is there) and the table is rewritten
    alike. The first run is the command line's; the others call the script's ``main`` in this process
    (``run_here``), so that the model loads once."""
    args = (
        "--data", DATA, "--domains", "politics", "--extra", "fixture", "--genia", DATA / "nested" / "made_up",
        "--ks", "0,1", "--per", 2, "--pool", 4,
        "--spacy-dev", 2, "--spacy-steps", 4, "--spacy-eval-every", 2, "--cache", tmp_path / "cache.sqlite",
        "--work", tmp_path / "work", "--out", tmp_path / "real_use.json",
    )  # fmt: skip
    run("benchmarks/real_use.py", *args)
    rerun = partial(here, "benchmarks/real_use.py")
    res = json.loads((tmp_path / "real_use.json").read_text())
    rows, a = res["rows"], DEFAULT_ADAPTERS["gemma3-270m"]  # each key ends in @ the adapter's name
    expected = {
        f"{k}/{v}@{a}"
        for v in ("cased", "lower")
        for k in (
            *(f"paragraphs/politics/{c}" for c in ("sentences", "sentencizer", "doc_sents")),
            "lodo/politics/k0",
            "lodo/politics/k1",
            "extra/fixture",
            "genia/nested",
        )
    } | {f"extra/fixture/{v}/spacy" for v in ("cased", "lower")}
    assert set(rows) == expected
    assert rows[f"paragraphs/politics/sentences/cased@{a}"]["docs"] == 4
    assert rows[f"paragraphs/politics/sentencizer/cased@{a}"]["docs"] == 2
    assert rows[f"lodo/politics/k0/cased@{a}"]["in_domain_adapter"] is True
    assert rows[f"extra/fixture/cased@{a}"]["labels"] == ["location", "misc", "organisation", "person"]
    assert rows[f"extra/fixture/cased@{a}"]["docs"] == 3 and rows["extra/fixture/cased/spacy"]["docs"] == 3
    assert all(0 <= r["f1"] <= 100 for r in rows.values())
    assert res["cpu_seconds"] > 0 and set(res["peers"]) >= {"GLiNER-L (0.3 B), zero-shot"}
    table = (tmp_path / "real_use.md").read_text()
    assert f"| politics | cased | {a} |" in table and "GLiNER-L" in table and "| fixture | lower | 3 |" in table
    again = rerun(*args)
    assert "F1" not in again.split("# Quality where users are")[0]  # no row measured again
    assert json.loads((tmp_path / "real_use.json").read_text())["rows"] == rows
    # another adapter's rows join the same table beside the first ones: a leave-one-domain-out adapter (here
    # ner-v1 stands in for one) and the extra sets' dev sentences (outside the pool and the spaCy checkpoint's)
    one = ("--variants", "cased", "--lodo-adapters", f"politics={adapter_path('ner-v1')}", "--lodo-tag", "lodo-x")
    one += ("--sections", "lodo,extra", "--ks", "0", "--extra-split", "dev", "--dev", 3)
    rerun(*args, *one)
    more = json.loads((tmp_path / "real_use.json").read_text())["rows"]
    assert set(more) - set(rows) == {"lodo/politics/k0/cased@lodo-x", f"extra-dev/fixture/cased@{a}"}
    assert more["lodo/politics/k0/cased@lodo-x"]["in_domain_adapter"] is False
    assert "ours (lodo-x), k = 0, cased" in (tmp_path / "real_use.md").read_text()
    # --pool-fit: the extra set's row again with a pipeline fitted to its pool, beside the first one
    rerun(*args, "--variants", "cased", "--sections", "extra", "--pool-fit")
    fitted = json.loads((tmp_path / "real_use.json").read_text())["rows"][f"extra/fixture/cased@{a}+fit"]
    assert fitted["pool_fit"]["docs"] == 4 and fitted["pool_fit"]["fitted_f"] >= fitted["pool_fit"]["lexicon_f"]
    assert fitted["pool_fit"]["seconds"] > 0 and set(fitted["pool_fit"]["thresholds"]) <= set(fitted["labels"])
    assert f"ours ({a}+fit)" in (tmp_path / "real_use.md").read_text()
    # --union-spacy: configs/pool_student.cfg, the fitted LLM and the row's spaCy model united, a row of its own
    rerun(*args, "--variants", "cased", "--sections", "extra", "--pool-fit", "--union-spacy")
    united = json.loads((tmp_path / "real_use.json").read_text())["rows"]
    assert set(united) - set(more) == {f"extra/fixture/cased@{a}+fit", f"extra/fixture/cased@{a}+fit+spacy"}
    row = united[f"extra/fixture/cased@{a}+fit+spacy"]
    assert row["config"] == "configs/pool_student.cfg" and row["docs"] == 3 and 0 <= row["f1"] <= 100
    assert row["pool_fit"]["docs"] == 4 and "the union of" in (tmp_path / "real_use.md").read_text()
    # a union row whose spaCy model must be trained again (a new --work folder) scores the spaCy row again with it
    saved = json.loads((tmp_path / "real_use.json").read_text())
    del saved["rows"][f"extra/fixture/cased@{a}+fit+spacy"]
    saved["rows"]["extra/fixture/cased/spacy"]["f1"] = -1.0  # a mark a measured row never carries
    (tmp_path / "real_use.json").write_text(json.dumps(saved))
    union = ("--variants", "cased", "--sections", "extra", "--pool-fit", "--union-spacy")
    rerun(*args, *union, "--work", tmp_path / "work2")  # the last --work counts
    again = json.loads((tmp_path / "real_use.json").read_text())["rows"]
    assert 0 <= again["extra/fixture/cased/spacy"]["f1"] <= 100 and f"extra/fixture/cased@{a}+fit+spacy" in again
    assert (tmp_path / "work2" / "extra_fixture_cased_spacy" / "model" / "model-best").is_dir()
    # --union-sources: the same union, per label whose spans count, chosen on train sentences outside the pool and
    # the spaCy checkpoint's; its row scores each member alone and their plain union on the same pass
    rerun(*args, *union, "--work", tmp_path / "work2", "--union-sources", 3)
    rows = json.loads((tmp_path / "real_use.json").read_text())["rows"]
    assert set(rows) - set(again) == {f"extra/fixture/cased@{a}+fit+spacy+sources"}
    row = rows[f"extra/fixture/cased@{a}+fit+spacy+sources"]
    assert row["fitted"]["dev_docs"] >= 1 and set(row["fitted"]["sources"]) <= set(row["labels"])
    assert 0 <= row["fitted"]["union_dev_f1"] <= row["fitted"]["dev_f1"] <= 1
    assert set(row["breakdown"]) == {"llm_lar_ner", "student_ner", "union"} and row["docs"] == 3
    assert all(0 <= b["f1"] <= 100 for b in row["breakdown"].values())
    assert "+sources: the same union" in (tmp_path / "real_use.md").read_text()
    # --pool-tune: ner-v2 tuned further on the row's pool (configs/finetune_pool.cfg cut to one step), a row of its own
    from thinc.api import Config

    cfg = Config().from_disk(ROOT / "configs" / "finetune_pool.cfg", interpolate=False)
    cfg["data"]["renders"], cfg["training"]["max_steps"] = 1, 1
    cfg.to_disk(tmp_path / "finetune_pool.cfg")
    rerun(
        *args,
        "--variants",
        "cased",
        "--sections",
        "extra",
        "--pool-tune",
        tmp_path / "finetune_pool.cfg",
    )
    tuned = json.loads((tmp_path / "real_use.json").read_text())["rows"][f"extra/fixture/cased@{a}+tuned"]
    assert tuned["pool_tune"]["examples"] == 4 and tuned["docs"] == 3 and 0 <= tuned["f1"] <= 100
    assert (tmp_path / "work" / "extra_fixture_cased_tuned" / "adapter.gguf").is_file()
    assert f"ours ({a}+tuned)" in (tmp_path / "real_use.md").read_text()
