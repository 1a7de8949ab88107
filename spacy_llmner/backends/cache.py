"""A persistent answer cache in front of any backend (sqlite, standard library).

Key: a hash of the backend's identity (model, generation parameters), the request's limits, grammar and the full
prompt. Each answer is committed as soon as it arrives, so a crash mid-run loses nothing already answered; WAL
mode and a busy timeout make it safe for several processes and threads to share one file.
"""

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from ..ty import Generation, GenerationRequest, ScoreRequest, Scores
from .base import SpacyLLMCallable


def request_key(identity: Dict[str, Any], req: Union[GenerationRequest, ScoreRequest]) -> str:
    if isinstance(req, ScoreRequest):
        head, text = {"id": identity, "score": list(req.options)}, req.context
    else:
        head = {"id": identity, "max_tokens": req.max_tokens, "stop": list(req.stop), "grammar": req.grammar or ""}
        text = req.prompt
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode() + b"\x00" + text.encode()).hexdigest()


class AnswerCache:
    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, seconds REAL)"
            )
            conn.commit()
            self._conn = conn
        return self._conn

    def get_scores(self, key: str):
        got = self.get(key)
        return None if got is None else Scores(json.loads(got.text), got.prompt_tokens, cached=True)

    def put_scores(self, key: str, scores: Scores) -> None:
        self.put(key, Generation(json.dumps(scores.logprobs), scores.prompt_tokens, 0, scores.seconds))

    def get(self, key: str):
        with self._lock:
            row = self._db().execute(
                "SELECT text, prompt_tokens, completion_tokens, seconds FROM answers WHERE key=?", (key,)
            ).fetchone()
        if row is None:
            return None
        return Generation(text=row[0], prompt_tokens=row[1], completion_tokens=row[2], seconds=0.0, cached=True)

    def put(self, key: str, gen: Generation) -> None:
        with self._lock:
            db = self._db()
            db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                (key, gen.text, gen.prompt_tokens, gen.completion_tokens, gen.seconds),
            )
            db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM answers").fetchone()[0]


class CachedBackend(SpacyLLMCallable):
    """Answers from the cache where it can; asks the wrapped backend for the rest, storing each answer."""

    def __init__(self, backend, path: Union[str, Path]):
        self.backend = backend
        self.cache = AnswerCache(path)
        self.supports_grammar = getattr(backend, "supports_grammar", False)
        self.supports_scoring = getattr(backend, "supports_scoring", False)

    def identity(self) -> Dict[str, Any]:
        return self.backend.identity()

    def __getattr__(self, name):  # count_tokens and the like come from the wrapped backend
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        ident = self.identity()
        keys = [request_key(ident, r) for r in requests]
        out: List[Generation] = [self.cache.get(k) for k in keys]  # type: ignore[misc]
        todo = [i for i, g in enumerate(out) if g is None]
        # In groups as large as the backend decodes at once, each stored as soon as it is answered: a crash
        # loses at most the group in flight, and parallel decoding still pays off behind the cache.
        group = max(1, getattr(self.backend, "parallel", 1))
        for start in range(0, len(todo), group):
            part = todo[start : start + group]
            for i, gen in zip(part, self.backend.generate([requests[i] for i in part])):
                self.cache.put(keys[i], gen)
                out[i] = gen
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
