"""The demo's main job: `spacy-llmner annotate` on the real embedded model writes entities and a displaCy page."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spacy_llmner.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.model
def test_annotate_writes_entities_and_html(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("Nelson Mandela spoke at the United Nations in New York.\n\nThe weather was mild.\n")
    res = CliRunner().invoke(
        app,
        [
            "annotate",
            str(texts),
            "--demonstrations",
            str(ROOT / "assets/demonstrations.jsonl"),
            "--labels",
            "person,organisation,location,event",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "out/entities.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # blank lines are skipped, not annotated
    assert {"text": "Nelson Mandela", "label": "person", "start": 0, "end": 14} in rows[0]["entities"]
    assert "<html" in (tmp_path / "out/displacy.html").read_text().lower()
    assert "2 docs, 2 LLM calls" in res.output


def test_unknown_format_is_rejected(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("x\n")
    res = CliRunner().invoke(app, ["annotate", str(texts), "--format", "yaml"])
    assert res.exit_code != 0 and "--format must be one of" in res.output
