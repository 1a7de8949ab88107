"""LoRA adapters shipped with the package, applied by llama.cpp when it loads the base model.

``ner-v2`` (the default) and ``ner-v1`` (its predecessor, kept so that earlier results reproduce: the same
examples, tuned for part of a schedule whose learning rate never annealed): NER instruction tuning of the packaged
Gemma 3 270M (``gemma3-270m``) on the component's own prompts (lines format, 0-8 retrieved demonstrations, a quarter
lower-cased), trained only on data whose licence allows redistributing a derived model: the five CrossNER train
splits (MIT; Wikipedia text) and GENIA (CC BY 3.0). Each folder holds the GGUF adapter, ``manifest.json`` (base
model, training data with licences and hashes, settings, the commands that rebuild it, the adapter's own hash),
``tuning.cfg`` and ``ATTRIBUTION.md``. The llama.cpp backend applies ``ner-v2`` by default for ``gemma3-270m``
(``adapter = "auto"``); ``adapter = null`` serves the base model. Other packages add adapters through the
entry-point group ``spacy_llmner_adapters`` (a function returning the adapter's folder).
"""

from pathlib import Path
from typing import Any, Dict

import catalogue

HERE = Path(__file__).parent
ADAPTER_FILE = "adapter.gguf"

adapters = catalogue.create("spacy_llmner", "adapters", entry_points=True)
adapters.register("ner-v1", func=lambda: HERE / "ner-v1")
adapters.register("ner-v2", func=lambda: HERE / "ner-v2")


def folder(name: str) -> Path:
    """The folder of a registered adapter (its ``adapter.gguf`` and ``manifest.json``)."""
    if name not in adapters:
        known = ", ".join(sorted(adapters.get_all()))
        raise KeyError(f"no adapter named {name!r}; registered adapters: {known}")
    return Path(adapters.get(name)())


def manifest(name: str) -> Dict[str, Any]:
    """The adapter's manifest; a damaged one is a ``reading.FileReadError`` naming the adapter and the file."""
    from ..reading import read_json

    return read_json(f"adapter {name!r}", folder(name) / "manifest.json")


def adapter_path(name: str) -> Path:
    return folder(name) / ADAPTER_FILE
