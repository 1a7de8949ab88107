"""Shards: the unit of work and of output. Each input file is one shard with a deterministic output name; a
shard's results are committed atomically (written to temporary files, then renamed, the ``.done.json`` record
last), so a shard is either committed whole or not at all, and a rerun skips the committed ones."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import srsly

SUFFIXES = (".txt", ".jsonl", ".spacy")


@dataclass(frozen=True)
class Shard:
    path: str  # the input file
    name: str  # the output stem: the file's name and a hash of its full path (two "part-0.txt" never collide)

    @classmethod
    def of(cls, path: Union[str, Path]) -> "Shard":
        full = str(Path(path).resolve())
        return cls(full, f"{Path(path).stem}.{hashlib.sha1(full.encode('utf8')).hexdigest()[:10]}")

    def done(self, output: Path) -> Path:
        return output / f"{self.name}.done.json"


def list_shards(inputs: Sequence[Union[str, Path]]) -> List[Shard]:
    """Every input file (folders: their .txt / .jsonl / .spacy files, sorted), each once."""
    paths: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"spacy-llmner annotate: input not found: {p}")
    shards = list({s.name: s for s in map(Shard.of, paths)}.values())
    if not shards:
        raise ValueError(f"spacy-llmner annotate: no .txt, .jsonl or .spacy files in {list(map(str, inputs))}")
    return shards


def read_texts(path: Union[str, Path], vocab=None) -> List[str]:
    """A file's documents: a DocBin's texts, a jsonl's ``text`` fields, or a text file's non-empty lines."""
    path = Path(path)
    if path.suffix == ".spacy":
        from ..corpora import read_docbin

        return [d.text for d in read_docbin(path, vocab)]
    if path.suffix == ".jsonl":
        texts = []
        for n, row in enumerate(srsly.read_jsonl(path), 1):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: a jsonl document needs a 'text' string")
            texts.append(row["text"])
        return texts
    return [line for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


def commit(output: Path, shard: Shard, docs: Iterable, record: Dict) -> Dict:
    """Writes ``<name>.spacy`` and ``<name>.jsonl`` through temporary files, then ``<name>.done.json``: a shard
    is committed when its record exists. Returns the record (with the shard's name, input and doc count)."""
    from spacy.tokens import DocBin

    output.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    docs = list(docs)
    rows = [
        {
            "text": d.text,
            "entities": [{"start": e.start_char, "end": e.end_char, "label": e.label_, "text": e.text} for e in d.ents],
        }
        for d in docs
    ]
    spacy_tmp, jsonl_tmp = output / f"{shard.name}.spacy{suffix}", output / f"{shard.name}.jsonl{suffix}"
    DocBin(docs=docs, store_user_data=True).to_disk(spacy_tmp)
    srsly.write_jsonl(jsonl_tmp, rows)
    record = {"shard": shard.name, "input": shard.path, "docs": len(docs), **record}
    done_tmp = output / f"{shard.name}.done.json{suffix}"
    done_tmp.write_text(json.dumps(record))
    os.replace(spacy_tmp, output / f"{shard.name}.spacy")  # atomic on one file system
    os.replace(jsonl_tmp, output / f"{shard.name}.jsonl")
    os.replace(done_tmp, shard.done(output))
    return record


def committed(output: Path, shard: Shard) -> Optional[Dict]:
    done = shard.done(output)
    return json.loads(done.read_text()) if done.exists() else None
