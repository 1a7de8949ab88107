"""How ``llm_lar_ner`` is saved: serializer dicts for ``spacy.util.to_disk/from_disk/to_bytes/from_bytes`` (keys
honour ``exclude``), each stateful piece writing itself — labels, demonstrations, the label alignment, the span
memory, the retrieval pool, what was fitted to the pool — and ``files.json``, the list of files a loaded copy must find.

File names are those of every earlier version, so pipelines saved before this layout load (copies without
``files.json`` need their ``demonstrations.jsonl``)."""

from pathlib import Path
from typing import Callable, Dict, List

import srsly

from .labels.alignment import LabelAlignment
from .lar import SpanMemory
from .pool_fit import FILE as POOL_FIT
from .pool_fit import PoolFit
from .reading import list_of_strings, read_json
from .retrieval import Pool
from .retrieval.pool import ARRAYS

FILES = "files.json"
STORED = {
    "span_memory": ["span_memory.npy", "span_memory.json"],  # the files a serializer key writes
    "pool": ["pool/demonstrations.jsonl"] + [f"pool/{name}.npy" for name in ARRAYS],
}


def _parts(ner) -> Dict[str, object]:
    """The learned pieces the component holds now (each has to_disk/to_bytes), by serializer key."""
    parts = {
        "alignment": ner.alignment,
        "span_memory": ner.span_memory,
        "pool": ner.demos.pool,
        "pool_fit": ner.pool_fit,
    }
    return {key: part for key, part in parts.items() if part is not None}


def _load_labels(ner, labels) -> None:
    if labels and list(labels) != list(ner.label_set.labels):
        ner.set_labels(labels)  # learned in initialize() (e.g. from the pool): not in the config


def _set(ner, attr: str, load: Callable) -> Callable:
    return lambda data: setattr(ner, attr, load(data))


def byte_writers(ner) -> Dict[str, Callable[[], bytes]]:
    return {
        "labels": lambda: srsly.msgpack_dumps(list(ner.labels)),
        "demonstrations": ner.demos.to_bytes,
        **{key: part.to_bytes for key, part in _parts(ner).items()},
    }


def byte_readers(ner) -> Dict[str, Callable[[bytes], None]]:
    def pool(data: bytes) -> None:
        if ner.retriever is not None:
            ner.retriever.use_pool(Pool.from_bytes(data))

    return {
        "labels": lambda data: _load_labels(ner, srsly.msgpack_loads(data)),
        "demonstrations": ner.demos.from_bytes,
        "alignment": _set(ner, "alignment", LabelAlignment.from_bytes),
        "span_memory": _set(ner, "span_memory", SpanMemory.from_bytes),
        "pool": pool,
        "pool_fit": _set(ner, "pool_fit", PoolFit.from_bytes),
    }


def disk_writers(ner, exclude) -> Dict[str, Callable[[Path], None]]:
    names = {"alignment": "alignment.json", "span_memory": "span_memory", "pool": "pool", "pool_fit": POOL_FIT}
    writers = {
        "labels.json": lambda path: srsly.write_json(path, list(ner.labels)),
        "demonstrations.jsonl": ner.demos.to_disk,
        **{names[key]: part.to_disk for key, part in _parts(ner).items()},
    }
    written = [name for key in writers if key.split(".")[0] not in exclude for name in STORED.get(key, [key])]
    writers[FILES] = lambda path: srsly.write_json(path, written)
    return writers


def disk_readers(ner) -> Dict[str, Callable[[Path], None]]:
    """Each piece's reader; a damaged file is a ``reading.FileReadError`` naming the component and the file."""

    def optional(load):  # pieces a component saves only when it has them
        return lambda path: load(path) if path.exists() or path.with_suffix(".npy").exists() else None

    return {
        "labels.json": optional(lambda path: _load_labels(ner, read_json(ner.name, path, list_of_strings))),
        "demonstrations.jsonl": ner.demos.from_disk,
        "alignment.json": optional(
            _set(ner, "alignment", lambda path: read_json(ner.name, path, LabelAlignment.from_dict))
        ),
        "span_memory": optional(_set(ner, "span_memory", lambda stem: SpanMemory.from_disk(stem, ner.name))),
        POOL_FIT: optional(_set(ner, "pool_fit", lambda path: read_json(ner.name, path, PoolFit.from_dict))),
        "pool": lambda path: ner.retriever.from_disk(path, owner=ner.name) if ner.retriever is not None else None,
    }


def required_files(name: str, path: Path) -> List[str]:
    """The files a saved copy must hold: those ``to_disk`` listed in ``files.json``. Copies saved before that file
    existed need their demonstrations (without them a pool-less component would run silently without examples;
    a missing pool or span memory raises when first needed)."""
    return read_json(name, path / FILES, list_of_strings) if (path / FILES).exists() else ["demonstrations.jsonl"]


def check_files(name: str, path: Path, exclude) -> None:
    missing = [
        file
        for file in required_files(name, path)
        if not (path / file).exists() and file.split("/")[0].split(".")[0] not in exclude
    ]
    if missing:
        raise ValueError(
            f"{name}: the saved component at {path} is missing {', '.join(missing)}; the pipeline was not loaded "
            "(it would run without what it was saved with). Save it again with nlp.to_disk, or restore the file(s)."
        )


def check_demonstrations(ner, path: Path, exclude) -> None:
    if not ner.demonstrations and ner.retriever is None and not ner.zero_shot and "demonstrations" not in exclude:
        raise ValueError(
            f"{ner.name}: {path / 'demonstrations.jsonl'} holds no demonstrations and no retriever is configured. "
            "A component meant to run without demonstrations says so: set zero_shot = true in "
            f"[components.{ner.name}]; otherwise give it demonstrations and save it again."
        )
