"""Saving and config validation: pipelines saved in an earlier layout load, ``exclude`` is honoured, and spaCy's
own config validation rejects a bad setting before anything runs."""

import numpy as np
import pytest
import spacy
import srsly
from confection import ConfigValidationError

from spacy_llmner.labels.alignment import LabelAlignment
from spacy_llmner.lar import SpanMemory
from spacy_llmner.prompt import Demonstration

from fakes import FakeBackend

LABELS = ["person", "location", "organisation"]
DEMOS = [
    Demonstration("Ada Lovelace lived in London.", [(0, 12, "person"), (22, 28, "location")]),
    Demonstration("The BBC is in London.", [(4, 7, "organisation"), (14, 20, "location")]),
    Demonstration("Alan Turing worked at Bletchley.", [(0, 11, "person"), (22, 31, "location")]),
]
BACKEND = {"@llm_models": "spacy_llmner.LlamaCpp.v1"}


def _pipeline():
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler", name="source")
    ruler.add_patterns([{"label": "PER", "pattern": "Ada Lovelace"}, {"label": "LOC", "pattern": "London"}])
    lar = nlp.add_pipe(
        "llm_lar_ner",
        name="lar",
        config={
            "labels": LABELS,
            "spans_key": "lar",
            "backend": BACKEND,
            "lar": {"@misc": "spacy_llmner.LAR.v1", "proposers": ["source"], "typer": "knn"},
        },
    )
    lar.set_demonstrations(DEMOS[:2])
    lar.alignment = LabelAlignment.from_cooccurrence([("PER", "person"), ("LOC", "location")], ["PER", "LOC"], LABELS)
    lar.span_memory = SpanMemory.build(DEMOS, lar.encoder())
    span = nlp.add_pipe(
        "llm_lar_ner",
        name="span",
        config={
            "labels": LABELS,
            "spans_key": "span",
            "backend": BACKEND,
            "retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "bm25", "k": 2},
        },
    )
    span.initialize(pool=DEMOS)
    for name in ("lar", "span"):
        nlp.disable_pipe(name)
    ens = nlp.add_pipe("llm_ner_ensemble", config={"members": ["lar", "span"], "voting": "weighted"})
    ens.weights, ens.threshold = {"lar": 2.0, "span": 0.5}, 0.25
    return nlp


def _write_as_51c609b(nlp, path):
    """The pipeline folder as commit 51c609b's ``to_disk`` wrote it: no files.json, no ``zero_shot`` setting; per
    component labels.json, demonstrations.jsonl, alignment.json, span_memory.npy + .json, pool/ (jsonl + arrays);
    the ensemble's votes.json."""
    nlp.to_disk(path)
    config = (path / "config.cfg").read_text()
    (path / "config.cfg").write_text(
        "\n".join(line for line in config.splitlines() if not line.startswith("zero_shot"))
    )
    for name in ("lar", "span"):
        ner, folder = nlp.get_pipe(name), path / name
        for f in sorted(folder.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        srsly.write_jsonl(folder / "demonstrations.jsonl", [d.to_dict() for d in ner.demonstrations])
        srsly.write_json(folder / "labels.json", list(ner.labels))
        if ner.alignment is not None:
            srsly.write_json(folder / "alignment.json", ner.alignment.to_dict())
        if ner.span_memory is not None:
            np.save(folder / "span_memory.npy", ner.span_memory.vectors, allow_pickle=False)
            srsly.write_json(folder / "span_memory.json", ner.span_memory.labels)
        if ner.retriever is not None:
            pool = ner.retriever.pool
            (folder / "pool").mkdir()
            srsly.write_jsonl(folder / "pool" / "demonstrations.jsonl", [d.to_dict() for d in pool.demonstrations])
            for array in ("sentence", "pieces", "piece_ids", "piece_offsets", "spans", "span_offsets"):
                np.save(folder / "pool" / f"{array}.npy", np.asarray(getattr(pool, array)), allow_pickle=False)
    ens = nlp.get_pipe("llm_ner_ensemble")
    srsly.write_json(
        path / "llm_ner_ensemble" / "votes.json",
        {"weights": ens.weights, "label_weights": ens.label_weights, "threshold": ens.threshold, "fitted": ens.fitted},
    )


def test_a_pipeline_saved_by_51c609b_loads_with_everything_it_held(tmp_path):
    nlp = _pipeline()
    _write_as_51c609b(nlp, tmp_path / "old")
    assert not list((tmp_path / "old").rglob("files.json"))
    loaded = spacy.load(tmp_path / "old")
    for name in ("lar", "span"):
        before, after = nlp.get_pipe(name), loaded.get_pipe(name)
        assert after.labels == before.labels
        assert [d.to_dict() for d in after.demonstrations] == [d.to_dict() for d in before.demonstrations]
    assert loaded.get_pipe("lar").alignment.to_dict() == nlp.get_pipe("lar").alignment.to_dict()
    assert np.array_equal(loaded.get_pipe("lar").span_memory.vectors, nlp.get_pipe("lar").span_memory.vectors)
    assert [d.text for d in loaded.get_pipe("span").retriever.pool.demonstrations] == [d.text for d in DEMOS]
    assert loaded.get_pipe("llm_ner_ensemble").weights == {"lar": 2.0, "span": 0.5}
    assert loaded.get_pipe("llm_ner_ensemble").threshold == 0.25
    # and it runs: the LAR member types the source's spans by their nearest gold spans in the loaded memory
    loaded.get_pipe("span").backend = FakeBackend(lambda q: "")
    doc = loaded("Ada Lovelace visited London.")
    assert [(s.text, s.label_) for s in doc.spans["llm_ner_ensemble:lar"]] == [
        ("Ada Lovelace", "person"),
        ("London", "location"),
    ]


def test_exclude_leaves_out_a_piece_on_disk_and_in_bytes(tmp_path):
    nlp = _pipeline()
    lar, span = nlp.get_pipe("lar"), nlp.get_pipe("span")
    span.to_disk(tmp_path / "span", exclude=["pool"])
    assert not (tmp_path / "span" / "pool").exists()
    assert not any(f.startswith("pool/") for f in srsly.read_json(tmp_path / "span" / "files.json"))
    lar.to_disk(tmp_path / "lar", exclude=["span_memory"])
    assert not (tmp_path / "lar" / "span_memory.npy").exists() and (tmp_path / "lar" / "alignment.json").exists()
    data = lar.to_bytes(exclude=["alignment"])
    fresh = _pipeline().get_pipe("lar")
    fresh.alignment = None
    fresh.from_bytes(data)
    assert fresh.alignment is None and np.array_equal(fresh.span_memory.vectors, lar.span_memory.vectors)
    fresh.from_bytes(lar.to_bytes(), exclude=["span_memory"])
    assert fresh.alignment.to_dict() == lar.alignment.to_dict()


@pytest.mark.parametrize(
    "name,config",
    [
        ("llm_lar_ner", {"on_error": "ignore"}),
        ("llm_lar_ner", {"alignment_mode": "loose"}),
        ("llm_lar_ner", {"backend": {"@misc": "spacy_llmner.LinesFormat.v1"}}),  # a format is no backend
        ("llm_lar_ner", {"retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "dense"}}),
        ("llm_lar_ner", {"lar": {"@misc": "spacy_llmner.LAR.v1", "typer": "oracle"}}),
        ("llm_ner_ensemble", {"members": ["a"], "voting": "ranked"}),
    ],
)
def test_spacy_config_validation_rejects_a_bad_setting(name, config):
    nlp = spacy.blank("en")
    with pytest.raises(ConfigValidationError):
        nlp.add_pipe(name, config={"labels": LABELS, **config} if name == "llm_lar_ner" else config)
