"""The shipped NER adapter: its file matches its manifest, its training data allows redistribution, it is what the
llama.cpp backend applies by default to gemma3-270m (and to nothing else), the GGUF LoRA export's layout, and (real
model) the adapter is applied in every llama.cpp context the backend makes."""

import json

import numpy as np
import pytest

from spacy_llmner import adapters
from spacy_llmner.backends.llamacpp import LlamaCppBackend, resolve_adapter
from spacy_llmner.finetune.package import attribution, licence_of, package_adapter, sha256
from spacy_llmner.ty import BackendError


@pytest.mark.parametrize("name", ["ner-v1", "ner-v2"])
def test_the_shipped_adapter_matches_its_manifest(name):
    manifest = adapters.manifest(name)
    path = adapters.adapter_path(name)
    assert path.stat().st_size == manifest["bytes"] <= 5_000_000
    assert sha256(path) == manifest["sha256"]
    assert manifest["base_model"] == "gemma3-270m" and not manifest["local_only"]
    sources = manifest["data"]["sources"]
    assert sources and all(s["redistributable"] for s in sources)
    assert not any("conll" in s["path"].lower() or "research" in s["licence"].lower() for s in sources)
    assert not any("conll" in name for name in manifest["data"]["examples_by_dataset"])
    folder = adapters.folder(name)
    attribution = (folder / "ATTRIBUTION.md").read_text()
    assert "CrossNER" in attribution and "GENIA" in attribution and "Creative Commons Attribution 3.0" in attribution
    assert "conll2003" not in (folder / "tuning.cfg").read_text().lower()


def test_research_only_data_is_refused_for_a_shipped_adapter(tmp_path):
    src = tmp_path / "crossner" / "conll2003" / "train.txt"
    src.parent.mkdir(parents=True)
    src.write_text("EU\tB-organisation\n")
    assert not licence_of(str(src))["redistributable"]
    assert licence_of("/data/crossner/politics/train.txt")["redistributable"]
    assert licence_of("/data/genia/genia_nested.train.jsonl")["redistributable"]
    assert not licence_of("/data/somewhere/else.jsonl")["redistributable"]  # unknown: not shippable
    with pytest.raises(ValueError, match="does not allow redistributing"):
        package_adapter(
            tmp_path / "lora",
            tmp_path / "out",
            base_model="gemma3-270m",
            base_path=str(src),
            sources=[str(src)],
            config_path=src,
            name="x",
        )
    assert not (tmp_path / "out").exists()


def test_the_extra_sets_licences_and_credits_follow_the_sources():
    """BTC, SEC filings and AnEM allow a derived model, each credited in ATTRIBUTION.md only when tuned on; re3d's
    licences differ per source and wikigold is held out of tuning: neither counts as shippable data."""
    for path in ("/d/extra/btc/a.conll", "/d/extra/sec_filings/train.FIN5.txt", "/d/extra/anem/AnEM.train"):
        assert licence_of(path)["redistributable"], path
    assert not licence_of("/d/extra/re3d/x/y.conll")["redistributable"]
    text = attribution(["/d/crossner/ai/train.txt", "/d/extra/btc/a.conll", "/d/extra/btc/b.conll"])
    assert "CrossNER" in text and text.count("Broad Twitter Corpus**") == 1 and "AnEM" not in text
    assert "BY-SA" in attribution(["/d/extra/anem/AnEM.train"]) and "GENIA" not in text


def test_the_backend_applies_ner_v2_to_gemma_by_default_and_nothing_else():
    assert LlamaCppBackend().adapter == "ner-v2"
    assert LlamaCppBackend(adapter=None).adapter is None
    assert LlamaCppBackend(model="smollm2-135m").adapter is None  # auto: no adapter for another model
    assert resolve_adapter("gemma3-270m", "ner-v1") == "ner-v1"
    with pytest.raises(BackendError, match="neither a shipped adapter"):
        LlamaCppBackend(adapter="ner-v9")
    with pytest.raises(BackendError, match="trained for model 'gemma3-270m'"):
        LlamaCppBackend(model="smollm2-135m", adapter="ner-v1")
    # answers differ with the adapter: cached answers of the base model are never served for it
    assert LlamaCppBackend().identity() != LlamaCppBackend(adapter=None).identity()
    assert "adapter" not in LlamaCppBackend(adapter=None).identity()
    # two adapters of one rank have one file size: named by content, a cache never serves one's answers for the other
    assert adapters.adapter_path("ner-v1").stat().st_size == adapters.adapter_path("ner-v2").stat().st_size
    assert LlamaCppBackend(adapter="ner-v1").identity() != LlamaCppBackend(adapter="ner-v2").identity()


def test_lora_export_layout_and_rank_truncation(tmp_path):
    import gguf
    from safetensors.numpy import save_file

    from spacy_llmner.backends.llamacpp import resolve_model_path
    from spacy_llmner.finetune.export import export_lora_gguf, truncate

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 640)).astype(np.float32), rng.normal(size=(1024, 8)).astype(np.float32)
    a2, b2, dropped = truncate(a, b, 8)
    assert np.allclose(b2 @ a2, b @ a, atol=1e-3) and dropped < 1e-9  # full rank: exact
    low_a, low_b, dropped = truncate(a[:2].repeat(4, 0), b[:, :2].repeat(4, 1) / 4, 2)  # a rank-2 update
    assert np.allclose(low_b @ low_a, b[:, :2] @ a[:2], atol=1e-3) and dropped < 1e-9
    _, _, dropped = truncate(a, b, 4)
    assert 0.05 < dropped < 0.95

    lora = tmp_path / "lora"
    lora.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    info = export_lora_gguf(lora, resolve_model_path("gemma3-270m"), tmp_path / "a.gguf", rank=4)
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == 4.0  # the scale is folded into B
    shapes = {t.name: (t.tensor_type.name, list(t.shape)) for t in reader.tensors}
    assert shapes == {
        "blk.0.attn_q.weight.lora_a": ("Q8_0", [640, 4]),  # ggml order: ne0 = the input width
        "blk.0.attn_q.weight.lora_b": ("F16", [4, 1024]),
    }
    assert info["worst_dropped_share"] > 0


@pytest.mark.model
def test_the_adapter_is_applied_in_the_batched_decoder_and_the_scorer():
    from spacy_llmner.ty import GenerationRequest, ScoreRequest

    prompt = (
        "Find the named entities in each sentence and give the type of each one.\n"
        "Entity types:\n- person\n- location\n- organisation\n\n"
        "Sentence: Angela Merkel met Emmanuel Macron in Paris.\nEntities:\n"
    )
    gold = "Angela Merkel | person\nEmmanuel Macron | person\nParis | location\n\n"
    base, tuned = LlamaCppBackend(adapter=None, parallel=4), LlamaCppBackend(parallel=4)
    gain = (
        tuned.score([ScoreRequest(prompt, (gold,))])[0].logprobs[0]
        - base.score([ScoreRequest(prompt, (gold,))])[0].logprobs[0]
    )
    assert gain > 2.0, gain  # the scorer's own context carries the adapter
    # the batched decoder (its own context) and llama-cpp-python's single-sequence path agree under the adapter
    reference = LlamaCppBackend(parallel=1, fast_grammar=False)
    req = GenerationRequest(prompt, max_tokens=40, stop=("\n\n",))
    assert tuned.generate([req])[0].text == reference.generate([req])[0].text
    assert tuned.generate([req])[0].text != base.generate([req])[0].text


@pytest.mark.model
def test_default_pipeline_spans_carry_confidences_and_threshold_holds():
    import spacy

    texts = ["Angela Merkel met Emmanuel Macron in Paris.", "Microsoft opened a lab in Nairobi, Kenya."]
    nlp = spacy.blank("en")
    nlp.add_pipe("llm_lar_ner", config={"labels": ["person", "organisation", "location"], "zero_shot": True})
    strict = spacy.blank("en")
    strict.add_pipe(
        "llm_lar_ner", config={"labels": ["person", "organisation", "location"], "zero_shot": True, "threshold": 0.9}
    )
    for doc, kept in zip(nlp.pipe(texts), strict.pipe(texts)):
        scores = doc.spans["llm_ner"].attrs["scores"]
        assert len(scores) == len(doc.spans["llm_ner"]) > 0
        assert all(0.0 < s <= 1.0 for s in scores)
        assert all(s >= 0.9 for s in kept.spans["llm_ner"].attrs["scores"])  # same answers, the unsure dropped
        sure = {(sp.text, sp.label_) for sp, s in zip(doc.spans["llm_ner"], scores) if s >= 0.9}
        assert {(sp.text, sp.label_) for sp in kept.spans["llm_ner"]} == sure
