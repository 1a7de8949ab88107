"""Reading the files the package is made of and saves (a pipeline's labels, demonstrations, alignment, span
memory and pool; an adapter's manifest and calibration map): a file that cannot be read is a ``FileReadError``
naming who read it (the component), the file, the line where the file is one record per line, and what to do."""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Union

# what reading and parsing a damaged or hand-edited file raises (a missing file is FileNotFoundError, kept as is)
DAMAGED = (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, OSError)


class FileReadError(ValueError):
    """A file of a saved pipeline or an adapter could not be read."""

    def __init__(self, owner: str, path: Union[str, Path], problem: object, line: Optional[int] = None):
        super().__init__(owner, str(path), str(problem), line)  # the args it is made from: it pickles
        self.owner, self.path, self.problem, self.line = owner, Path(path), str(problem), line

    def __str__(self) -> str:
        where = f"{self.path}, line {self.line}" if self.line is not None else str(self.path)
        return (
            f"{self.owner}: cannot read {where}: {self.problem}. The file is damaged or was edited by hand: restore "
            "it, or save the pipeline (or rebuild the file) again."
        )

    def for_owner(self, owner: str) -> "FileReadError":
        """The same error, named for ``owner`` (a component reading through its backend)."""
        return FileReadError(f"{owner} ({self.owner})", self.path, self.problem, self.line)


@contextmanager
def reading(owner: str, path: Union[str, Path]) -> Iterator[None]:
    """Errors raised while reading ``path`` become a ``FileReadError`` naming ``owner`` and the file."""
    try:
        yield
    except (FileReadError, FileNotFoundError):
        raise
    except DAMAGED as e:
        raise FileReadError(owner, path, f"{type(e).__name__}: {e}") from e


def read_json(owner: str, path: Union[str, Path], parse: Callable[[Any], Any] = lambda data: data) -> Any:
    """``parse`` of the JSON in ``path``."""
    with reading(owner, path):
        return parse(json.loads(Path(path).read_text(encoding="utf8")))


def read_jsonl(owner: str, path: Union[str, Path], parse: Callable[[Any], Any] = lambda row: row) -> List[Any]:
    """``parse`` of each JSON line of ``path`` (blank lines skipped); an error names the line."""
    out = []
    with reading(owner, path), open(path, encoding="utf8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except DAMAGED as e:
                raise FileReadError(owner, path, f"{type(e).__name__}: {e}", line=n) from e
    return out


def list_of_strings(data: Any) -> List[str]:
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ValueError(f"expected a list of strings, got {str(data)[:80]}")
    return data
