"""Any OpenAI-compatible HTTP server: vLLM, Ollama, llama.cpp's server, llama-cpp-python's server, OpenAI.

No network at construction. The API key is read from the environment variable whose *name* is configured, at
request time, so it never reaches a config or ``to_disk``. Requests run concurrently up to a bound and are
retried with exponential backoff on 429, 5xx, timeouts and refused connections.
"""

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

from ..ty import BackendError, Generation, GenerationRequest
from .base import SpacyLLMCallable

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAICompatBackend(SpacyLLMCallable):
    remote = True  # waits on a server, not the CPU: an ensemble runs it beside its local members

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        endpoint: str = "completions",
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        grammar_field: Optional[str] = None,
        temperature: float = 0.0,
        seed: Optional[int] = 0,
        max_concurrency: int = 4,
        max_retries: int = 4,
        timeout: float = 120.0,
        backoff: float = 0.5,
    ):
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"OpenAI-compatible backend: endpoint must be 'completions' or 'chat', not {endpoint!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.api_key_env = api_key_env
        # Servers name the GBNF field differently: llama.cpp / llama-cpp-python "grammar", vLLM "guided_grammar".
        self.grammar_field = grammar_field
        self.supports_grammar = grammar_field is not None
        self.temperature = temperature
        self.seed = seed
        self.max_concurrency = max(1, max_concurrency)
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self._session = None

    def identity(self) -> Dict[str, Any]:
        return {
            "backend": "openai-compatible",
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "temperature": self.temperature,
            "seed": self.seed,
        }

    def _headers(self) -> Dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, req: GenerationRequest) -> Dict[str, Any]:
        body: Dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens, "temperature": self.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        if req.stop:
            body["stop"] = list(req.stop)[:4]  # OpenAI accepts at most four
        if req.grammar and self.grammar_field:
            body[self.grammar_field] = req.grammar
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    def _post(self, req: GenerationRequest) -> Generation:
        import requests  # a spaCy dependency; imported here to keep start-up cheap

        if self._session is None:
            self._session = requests.Session()
        url = f"{self.base_url}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"
        last = ""
        for attempt in range(self.max_retries + 1):
            t0 = time.perf_counter()
            retry_after = None
            try:
                resp = self._session.post(url, json=self._payload(req), headers=self._headers(), timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    data = resp.json()
                    choice = data["choices"][0]
                    text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
                    usage = data.get("usage") or {}
                    return Generation(
                        text=text or "",
                        prompt_tokens=usage.get("prompt_tokens", 0),
                        completion_tokens=usage.get("completion_tokens", 0),
                        seconds=time.perf_counter() - t0,
                    )
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    break
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.max_retries:
                try:
                    delay = float(retry_after) if retry_after else self.backoff * 2**attempt
                except ValueError:
                    delay = self.backoff * 2**attempt
                time.sleep(delay * (1 + 0.1 * random.random()))
        raise BackendError(f"OpenAI-compatible backend at {url} failed after {attempt + 1} attempt(s): {last}")

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        if len(requests) <= 1 or self.max_concurrency == 1:
            return [self._post(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self._post, requests))
