"""Turns a tuned LoRA (``scripts/tune_adapter.py``'s output) into a shippable adapter folder:

    adapter.gguf      the GGUF LoRA llama.cpp applies at load (``export.export_lora_gguf``)
    peft/             the same adapter in peft's format (safetensors, transformers' module names): what vLLM
                      serves with ``--enable-lora`` (``backends.weights.write_peft_adapter``; derived from
                      adapter.gguf, so neither tracked nor packaged: ``spacy-llmner adapter-peft`` writes it again)
    manifest.json     base model and its hash, the adapter's hash and size, rank, the training data (each source's
                      path, licence and sha256; examples per dataset), the tuning settings, device and time, and the
                      commands that rebuild it
    tuning.cfg        the config whose examples it was tuned on
    ATTRIBUTION.md    the data's credits and licences

Only sources whose licence allows redistributing a derived model may go into a shipped adapter; a research-only
source (CoNLL-2003, Reuters text) is refused unless ``local=True`` (an adapter that stays on this machine).
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

# (path fragment, licence, whether a derived model may be redistributed, credit)
LICENCES = [
    (
        "crossner/conll2003",
        "CoNLL-2003 (Reuters RCV1 text): research use only",
        False,
        "Tjong Kim Sang & De Meulder 2003",
    ),
    ("conll2003", "CoNLL-2003 (Reuters RCV1 text): research use only", False, "Tjong Kim Sang & De Meulder 2003"),
    ("crossner/", "MIT (CrossNER annotations; text from Wikipedia)", True, "Liu et al., CrossNER, AAAI 2021"),
    (
        "genia",
        "CC BY 3.0 (GENIA annotations (c) GENIA Project; abstracts from PubMed)",
        True,
        "Kim et al., GENIA corpus, 2003",
    ),
    ("extra/wikigold", "CC BY 4.0 (wikigold; text from Wikipedia)", True, "Balasuriya et al., wikigold, 2009"),
    ("extra/btc", "CC BY 4.0 (Broad Twitter Corpus)", True, "Derczynski et al., Broad Twitter Corpus, COLING 2016"),
    (
        "extra/sec_filings",
        "CC BY 3.0 (SEC filings NER data)",
        True,
        "Salinas Alvarado et al., Domain adaption of named entity recognition to support credit risk assessment, 2015",
    ),
    ("extra/anem", "CC BY-SA 3.0 (AnEM corpus; share-alike)", True, "Ohta et al., AnEM, 2012"),
]

# each dataset's credit, licence and changes, written into ATTRIBUTION.md when its files are among the sources
ATTRIBUTIONS = {
    "crossner/": """\
- **CrossNER** (politics, science, music, literature, ai train splits): Zihan Liu, Yan Xu, Tiezheng Yu, Wenliang
  Dai, Ziwei Ji, Samuel Cahyawijaya, Andrea Madotto, Pascale Fung. "CrossNER: Evaluating Cross-Domain Named Entity
  Recognition", AAAI 2021. https://github.com/zliucr/CrossNER. Annotations under the MIT License, Copyright (c) 2020
  Zihan Liu; sentences from Wikipedia (CC BY-SA).""",
    "genia": """\
- **GENIA** term corpus 3.02: Jin-Dong Kim, Tomoko Ohta, Yuka Tateisi, Jun'ichi Tsujii. "GENIA corpus — a
  semantically annotated corpus for bio-textmining", Bioinformatics 19 (suppl. 1), 2003. Annotations (c) GENIA
  Project, licensed under Creative Commons Attribution 3.0 (https://creativecommons.org/licenses/by/3.0/).
  Changes: entity types reduced to DNA, RNA, cell_line, cell_type, protein; sentences rendered as tuning prompts.""",
    "extra/btc": """\
- **Broad Twitter Corpus**: Leon Derczynski, Kalina Bontcheva, Ian Roberts. "Broad Twitter Corpus: A Diverse
  Named Entity Recognition Resource", COLING 2016. Licensed under Creative Commons Attribution 4.0
  (https://creativecommons.org/licenses/by/4.0/). Changes: labels PER / ORG / LOC named person / organisation /
  location; tweets rendered as tuning prompts.""",
    "extra/sec_filings": """\
- **SEC filings NER data**: Julio Cesar Salinas Alvarado, Karin Verspoor, Timothy Baldwin. "Domain Adaption of
  Named Entity Recognition to Support Credit Risk Assessment", ALTA 2015. Licensed under Creative Commons
  Attribution 3.0 Unported (http://creativecommons.org/licenses/by/3.0/). Changes: labels renamed as above;
  sentences rendered as tuning prompts.""",
    "extra/anem": """\
- **AnEM** anatomical entity mentions: Tomoko Ohta, Sampo Pyysalo, Jun'ichi Tsujii, Sophia Ananiadou.
  "Open-domain Anatomical Entity Mention Detection", ACL 2012 Workshop DSSD; http://www.nactem.ac.uk/anatomy/.
  Annotations licensed under Creative Commons BY-SA 3.0 (http://creativecommons.org/licenses/by-sa/3.0/); texts from
  PubMed (U.S. National Library of Medicine). Changes: sentences rendered as tuning prompts. As far as this adapter is
  an adaptation of AnEM's annotations, it is shared under CC BY-SA 3.0, as that licence asks.""",
}


def attribution(sources: List[str]) -> str:
    """ATTRIBUTION.md for an adapter tuned on ``sources``: the credit of every dataset among them."""
    paths = [str(s).replace("\\", "/") for s in sources]
    credits = [text for fragment, text in ATTRIBUTIONS.items() if any(fragment in p for p in paths)]
    return (
        "# Attribution\n\nThis adapter is a model derived from the following data. It contains no text of it.\n\n"
        + "\n".join(credits)
        + "\n"
        + """
The base model, Gemma 3 270M, is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
"""
    )


def licence_of(source: str):
    for fragment, text, shippable, credit in LICENCES:
        if fragment in source.replace("\\", "/"):
            return {"licence": text, "redistributable": shippable, "credit": credit}
    return {"licence": "unknown", "redistributable": False, "credit": ""}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tuning_log(lora_dir) -> Dict[str, Any]:
    """The ``tuning.json`` of scripts/tune_adapter.py for a LoRA folder: beside the adapter, or one folder up (the
    script saves checkpoints as ``<out>/ckpt-<fraction>/`` and the log as ``<out>/tuning.json``); {} if none."""
    for folder in (Path(lora_dir), Path(lora_dir).parent):
        if (folder / "tuning.json").exists():
            return json.loads((folder / "tuning.json").read_text(encoding="utf8"))
    return {}


def package_adapter(
    lora_dir,
    out_dir,
    *,
    base_model: str,
    base_path: str,
    sources: List[str],
    config_path,
    name: str,
    rank: Optional[int] = None,
    local: bool = False,
    commands: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Writes ``out_dir`` (see the module's docstring); returns the manifest."""
    from ..backends.llamacpp import HF_NAMES
    from ..backends.weights import write_peft_adapter
    from . import source_files
    from .export import export_lora_gguf

    entries = []
    for source in (f for pattern in sources for f in source_files(str(pattern))):
        entry = {"path": str(source), "sha256": sha256(source), **licence_of(str(source))}
        if not entry["redistributable"] and not local:
            raise ValueError(
                f"adapter {name}: {source} ({entry['licence']}) does not allow redistributing a derived model; "
                "leave it out or package with local=True (an adapter that is never shipped)"
            )
        entries.append(entry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported = export_lora_gguf(lora_dir, base_path, out / "adapter.gguf", rank=rank)
    write_peft_adapter(str(out / "adapter.gguf"), base_path, out / "peft", HF_NAMES.get(base_model))
    tuning = tuning_log(lora_dir)
    shutil.copyfile(config_path, out / "tuning.cfg")
    (out / "ATTRIBUTION.md").write_text(attribution([e["path"] for e in entries]), encoding="utf8")
    settings = dict(tuning.get("settings", {}))
    for key in ("model", "data", "out"):
        settings.pop(key, None)
    manifest = {
        "name": name,
        "base_model": base_model,
        "base_model_sha256": sha256(base_path),
        "file": "adapter.gguf",
        "sha256": sha256(out / "adapter.gguf"),
        "bytes": exported["bytes"],
        "rank": rank or settings.get("r"),
        "trained_rank": settings.get("r"),
        "svd_worst_dropped_share": exported["worst_dropped_share"],
        "local_only": local,
        "data": {
            "sources": entries,
            "examples_by_dataset": tuning.get("examples_by_dataset"),
            "examples": tuning.get("examples"),
        },
        "training": {
            "settings": settings,
            "steps_planned": tuning.get("steps"),
            "steps_done": tuning.get("steps_done"),
            "device": tuning.get("device"),
            "versions": tuning.get("versions"),
            "seconds": tuning.get("seconds"),
            "reference_loss": tuning.get("reference_loss"),
        },
        "commands": commands or [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf8")
    return manifest
