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
        [sys.executable, "-m", "spacy", "assemble", str(ROOT / "configs" / config), str(out),
         "--paths.demonstrations", str(ROOT / "assets" / "demonstrations.jsonl")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    nlp = spacy.load(out)
    ner = nlp.get_pipe("llm_lar_ner")
    assert "person" in ner.labels and len(ner.demonstrations) == 6
    assert (out / "llm_lar_ner" / "demonstrations.jsonl").exists()
