"""Several servers behind one OpenAI-compatible backend: each request goes to the endpoint with the fewest requests
in flight (ties: the one used least recently); an endpoint that fails ``eject_after`` times in a row is taken out
for ``cooldown`` seconds, then tried again (one success puts it back for good). When every endpoint is out, the one
that comes back first is used: a request never waits on a dead server when a live one is there, and is never
dropped because all are out. Counts per endpoint feed the accounting (``stats``)."""

import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence


@dataclass
class Endpoint:
    url: str
    outstanding: int = 0
    failures_in_row: int = 0
    out_until: float = 0.0  # monotonic time; 0: in service
    last_used: float = 0.0
    counts: Dict[str, float] = field(
        default_factory=lambda: {
            "requests": 0,
            "failures": 0,
            "ejections": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "seconds": 0.0,
        }
    )


class EndpointPool:
    def __init__(self, urls: Sequence[str], eject_after: int = 3, cooldown: float = 30.0):
        if not urls:
            raise ValueError("OpenAI-compatible backend: base_url names no endpoint")
        self.endpoints = [Endpoint(u.rstrip("/")) for u in urls]
        self.eject_after = max(1, eject_after)
        self.cooldown = cooldown
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.endpoints)

    def acquire(self) -> Endpoint:
        """The endpoint for the next attempt (counted as in flight until ``release``)."""
        with self._lock:
            now = time.monotonic()
            live = [e for e in self.endpoints if e.out_until <= now]
            pool = live or [min(self.endpoints, key=lambda e: e.out_until)]
            chosen = min(pool, key=lambda e: (e.outstanding, e.last_used))
            chosen.outstanding += 1
            chosen.last_used = now
            chosen.counts["requests"] += 1
            return chosen

    def others_live(self, endpoint: Endpoint) -> bool:
        """Whether another endpoint is in service now (a retry can go there without waiting)."""
        now = time.monotonic()
        return any(e is not endpoint and e.out_until <= now for e in self.endpoints)

    def release(
        self, endpoint: Endpoint, ok: bool, seconds: float = 0.0, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        with self._lock:
            endpoint.outstanding -= 1
            endpoint.counts["seconds"] += seconds
            if ok:
                endpoint.failures_in_row, endpoint.out_until = 0, 0.0
                endpoint.counts["prompt_tokens"] += prompt_tokens
                endpoint.counts["completion_tokens"] += completion_tokens
                return
            endpoint.counts["failures"] += 1
            endpoint.failures_in_row += 1
            if endpoint.failures_in_row >= self.eject_after:
                endpoint.out_until = time.monotonic() + self.cooldown
                endpoint.failures_in_row = 0
                endpoint.counts["ejections"] += 1

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per endpoint URL: requests sent (attempts), failures, ejections, tokens and seconds of its answers, and
        whether it is in service now."""
        now = time.monotonic()
        with self._lock:
            return {e.url: {**e.counts, "in_service": e.out_until <= now} for e in self.endpoints}

    @property
    def urls(self) -> List[str]:
        return [e.url for e in self.endpoints]
