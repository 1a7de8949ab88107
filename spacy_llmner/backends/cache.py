"""A persistent answer cache in front of any backend (sqlite, standard library).

Key: a hash of the backend's identity (model, generation parameters), the request's limits, grammar and the full
prompt. Each answer is committed as soon as it arrives, so a crash mid-run loses nothing already answered; WAL
mode and a busy timeout make it safe for several processes and threads to share one file.

A cache file that sqlite cannot read (corrupt, truncated, not a database) is moved aside to ``<name>.corrupt-<n>``
with a warning, and every answer that can still be read from it is copied into a fresh file: nothing readable is
dropped, nothing is silently overwritten. A fault that appears mid-run raises ``CacheError`` naming the file.
"""

import hashlib
import json
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..ty import Backend, BackendError, Generation, GenerationRequest, ScoreRequest, Scores
from .base import BackendBase

_COLUMNS = "key, text, prompt_tokens, completion_tokens, seconds"


class CacheError(BackendError):
    """The answer cache cannot be read or written."""


def request_key(identity: Dict[str, Any], req: Union[GenerationRequest, ScoreRequest]) -> str:
    if isinstance(req, ScoreRequest):
        head, text = {"id": identity, "score": list(req.options)}, req.context
    else:
        head = {"id": identity, "max_tokens": req.max_tokens, "stop": list(req.stop), "grammar": req.grammar or ""}
        text = req.prompt
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode() + b"\x00" + text.encode()).hexdigest()


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
            "prompt_tokens INTEGER, completion_tokens INTEGER, seconds REAL)"
        )
        # per-token log-probabilities of an answer, where the backend gave them (a table of its own: caches
        # written before it existed still open, their answers simply have none)
        conn.execute("CREATE TABLE IF NOT EXISTS token_logprobs (key TEXT PRIMARY KEY, data TEXT NOT NULL)")
        conn.commit()
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def _readable_rows(path: Path, give_up_after: int = 5000) -> List[tuple]:
    """The answers that can still be read from a damaged cache file. Each row is looked up by its rowid on its own,
    so a lost page costs only the rows it held; the search ends after ``give_up_after`` rowids in a row yield
    nothing."""
    rows: List[tuple] = []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        # a truncated file is shorter than its header says: sqlite refuses it unless told to read what is there
        conn.execute("PRAGMA writable_schema=ON")
    except sqlite3.Error:
        return rows
    try:
        rowid, misses = 0, 0
        while misses < give_up_after:
            rowid += 1
            try:
                row = conn.execute(f"SELECT {_COLUMNS} FROM answers WHERE rowid = ?", (rowid,)).fetchone()
            except sqlite3.Error:
                row = None
            if row is None or row[1] is None:
                misses += 1
                continue
            misses = 0
            rows.append(row)
    finally:
        conn.close()
    return rows


class AnswerCache:
    def __init__(self, path: Union[str, Path], owner: str = "llm_lar_ner"):
        self.path = Path(path)
        self.owner = owner  # named in warnings and errors (the component)
        self._lock = threading.Lock()
        self._conn = None

    def db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = _open(self.path)
            except sqlite3.DatabaseError as e:
                self._conn = self._recover(e)
        return self._conn

    def _recover(self, error: Exception) -> sqlite3.Connection:
        n = 1
        while Path(f"{self.path}.corrupt-{n}").exists():
            n += 1
        aside = Path(f"{self.path}.corrupt-{n}")
        self.path.rename(aside)
        for suffix in ("-wal", "-shm"):  # sqlite's side files belong to the damaged database
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                side.rename(Path(f"{aside}{suffix}"))
        rows = _readable_rows(aside)
        try:
            conn = _open(self.path)
            conn.executemany(f"INSERT OR REPLACE INTO answers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)", rows)
            conn.commit()
        except sqlite3.Error as e:
            raise CacheError(f"{self.owner}: cannot create the answer cache {self.path}: {e}") from e
        warnings.warn(
            f"{self.owner}: the answer cache {self.path} could not be read ({error}); it was moved to {aside} "
            f"and the {len(rows)} answer(s) still readable in it were copied into a new {self.path.name}",
            stacklevel=2,
        )
        return conn

    def _fault(self, error: Exception) -> CacheError:
        return CacheError(
            f"{self.owner}: the answer cache {self.path} failed: {error}. Answers already returned are kept; "
            f"move the file aside (mv {self.path} {self.path}.bad) to start a new cache, or point cache_path elsewhere"
        )

    def get_scores(self, key: str):
        got = self.get(key)
        return None if got is None else Scores(json.loads(got.text), got.prompt_tokens, cached=True)

    def put_scores(self, key: str, scores: Scores) -> None:
        self.put(key, Generation(json.dumps(scores.logprobs), scores.prompt_tokens, 0, scores.seconds))

    def get(self, key: str) -> Optional[Generation]:
        with self._lock:
            db = self.db()
            try:
                row = db.execute(
                    "SELECT text, prompt_tokens, completion_tokens, seconds FROM answers WHERE key=?", (key,)
                ).fetchone()
                lp = db.execute("SELECT data FROM token_logprobs WHERE key=?", (key,)).fetchone() if row else None
            except sqlite3.DatabaseError as e:
                raise self._fault(e) from e
        if row is None:
            return None
        logprobs = tuple((int(end), float(v)) for end, v in json.loads(lp[0])) if lp else ()
        return Generation(
            text=row[0],
            prompt_tokens=row[1],
            completion_tokens=row[2],
            seconds=0.0,
            cached=True,
            token_logprobs=logprobs,
        )

    def put(self, key: str, gen: Generation) -> None:
        with self._lock:
            db = self.db()
            try:
                db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                    (key, gen.text, gen.prompt_tokens, gen.completion_tokens, gen.seconds),
                )
                if gen.token_logprobs:
                    db.execute(
                        "INSERT OR REPLACE INTO token_logprobs VALUES (?, ?)",
                        (key, json.dumps([[end, round(v, 5)] for end, v in gen.token_logprobs])),
                    )
                db.commit()
            except sqlite3.DatabaseError as e:
                raise self._fault(e) from e

    def __len__(self) -> int:
        with self._lock:
            return self.db().execute("SELECT COUNT(*) FROM answers").fetchone()[0]


class CachedBackend(BackendBase):
    """Answers from the cache where it can; asks the wrapped backend for the rest, storing each answer."""

    def __init__(self, backend: Backend, path: Union[str, Path], owner: str = "llm_lar_ner"):
        self.backend = backend
        self.cache = AnswerCache(path, owner)

    # what the wrapped backend offers, unchanged
    @property
    def supports_grammar(self) -> bool:
        return self.backend.supports_grammar

    @property
    def supports_scoring(self) -> bool:
        return self.backend.supports_scoring

    @property
    def parallel(self) -> int:
        return max(1, self.backend.parallel)

    @property
    def remote(self) -> bool:
        return self.backend.remote

    @property
    def calibration(self):
        return self.backend.calibration

    def identity(self) -> Dict[str, Any]:
        return self.backend.identity()

    def count_tokens(self, text: str) -> int:
        return self.backend.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        ident = self.identity()
        keys = [request_key(ident, r) for r in requests]
        out: List[Generation] = [self.cache.get(k) for k in keys]  # type: ignore[misc]
        for gen, req in zip(out, requests):
            if gen is not None:  # not stored: a stored answer that used its whole budget was cut there
                gen.truncated = gen.completion_tokens >= req.max_tokens
        todo = [i for i, g in enumerate(out) if g is None]
        if not todo:
            return out

        def store(j: int, gen: Generation) -> None:  # each answer is committed the moment it arrives
            self.cache.put(keys[todo[j]], gen)
            out[todo[j]] = gen

        pending = [requests[i] for i in todo]
        self.backend.generate_each(pending, store)
        return out

    def score(self, requests: Sequence[ScoreRequest]) -> List[Scores]:
        ident = self.identity()
        keys = [request_key(ident, r) for r in requests]
        out: List[Scores] = [self.cache.get_scores(k) for k in keys]  # type: ignore[misc]
        todo = [i for i, s in enumerate(out) if s is None]
        for i, scores in zip(todo, self.backend.score([requests[i] for i in todo]) if todo else []):
            self.cache.put_scores(keys[i], scores)
            out[i] = scores
        return out
