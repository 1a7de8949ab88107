"""Any OpenAI-compatible HTTP server: vLLM, Ollama, llama.cpp's server, llama-cpp-python's server, OpenAI.

No network at construction. The API key is read from the environment variable whose *name* is configured, at
request time, so it never reaches a config or ``to_disk``. Requests run concurrently up to a bound and are
retried with exponential backoff (or the server's ``Retry-After``) on 429, 5xx, timeouts, refused or reset
connections and truncated or unreadable bodies, each at most ``max_retries`` times.

Servers take a grammar in different request fields: llama.cpp's server ``grammar``, vLLM ≥ 0.12
``structured_outputs: {"grammar": …}`` (it ignores the older ``guided_grammar`` without an error). A server that
ignores the field answers unconstrained: every answer is checked against its grammar, a violation is counted
(``Generation.grammar_ignored``, the component's usage) and warned about once, naming the setting.
"""

import os
import random
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

from ..formats import gbnf
from ..ty import BackendError, Generation, GenerationRequest
from .base import BackendBase
from .endpoints import EndpointPool

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Named server profiles for ``grammar_field``; any other value is a (dotted) request-body field.
GRAMMAR_FIELDS = {"llama.cpp": "grammar", "vllm": "structured_outputs.grammar", "none": None}
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is capped


def grammar_path(grammar_field: Optional[str]) -> Optional[List[str]]:
    """The request-body path a grammar goes to: a profile name or a dotted field (``structured_outputs.grammar``)."""
    field = GRAMMAR_FIELDS.get(grammar_field, grammar_field) if grammar_field is not None else None
    if field is None:
        return None
    parts = field.split(".")
    if not all(parts):
        raise ValueError(
            f"OpenAI-compatible backend: grammar_field {grammar_field!r} is not a field name, a dotted "
            f"path or one of {sorted(GRAMMAR_FIELDS)}"
        )
    return parts


class OpenAICompatBackend(BackendBase):
    """Registered as ``spacy_llmner.OpenAICompat.v1``.

    base_url (Union[str, List[str]]): the server's API root (".../v1"), or several servers' (replicas of the same
        model): requests are balanced across them (fewest in flight), and a server that keeps failing is taken out.
    model (str): the model name the server expects.
    endpoint (str): "completions" or "chat".
    api_key_env (Optional[str]): the name of the environment variable holding the API key (read per request).
    grammar_field (Optional[str]): where the GBNF grammar goes: "llama.cpp", "vllm", a dotted field, "none"/null.
    temperature (float): sampling temperature (0: greedy).
    seed (Optional[int]): sampling seed sent with each request.
    max_concurrency (int): requests in flight at once.
    max_retries (int): retries per request on 429 / 5xx / timeouts / broken connections.
    timeout (float): seconds per request.
    backoff (float): the first retry's delay in seconds (doubling, with jitter); none when another server is up.
    eject_after (int): with several servers, consecutive failures that take one out of service.
    cooldown (float): seconds an ejected server stays out before it is tried again.
    """

    remote = True  # waits on a server, not the CPU: an ensemble runs it beside its local members

    def __init__(
        self,
        base_url: Union[str, List[str]] = "http://127.0.0.1:8000/v1",
        model: str = "default",
        endpoint: Literal["completions", "chat"] = "completions",
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        grammar_field: Optional[str] = None,
        temperature: float = 0.0,
        seed: Optional[int] = 0,
        max_concurrency: int = 4,
        max_retries: int = 4,
        timeout: float = 120.0,
        backoff: float = 0.5,
        eject_after: int = 3,
        cooldown: float = 30.0,
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.endpoints = EndpointPool(urls, eject_after, cooldown)
        # the cache key: one server's URL as before; several replicas' as their sorted list
        self.base_url = self.endpoints.urls[0] if isinstance(base_url, str) else sorted(self.endpoints.urls)
        self.model = model
        self.endpoint = endpoint
        self.api_key_env = api_key_env
        # Servers name the GBNF field differently: llama.cpp / llama-cpp-python "grammar", vLLM ≥ 0.12
        # "structured_outputs.grammar" (profiles "llama.cpp", "vllm"; "none" or null: no grammar is sent).
        self.grammar_field = grammar_field
        self._grammar_path = grammar_path(grammar_field)
        self.supports_grammar = self._grammar_path is not None
        self._warned = False
        self._warn_lock = threading.Lock()
        self.temperature = temperature
        self.seed = seed
        self.max_concurrency = max(1, max_concurrency)  # per server
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
        if req.grammar and self._grammar_path:
            node = body
            for part in self._grammar_path[:-1]:
                node = node.setdefault(part, {})
            node[self._grammar_path[-1]] = req.grammar
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    def _post(self, req: GenerationRequest) -> Generation:
        import requests  # a spaCy dependency; imported here to keep start-up cheap

        if self._session is None:
            self._session = requests.Session()
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        last, tried = "", []
        for attempt in range(self.max_retries + 1):
            server = self.endpoints.acquire()
            url = f"{server.url}/{path}"
            tried.append(server.url)
            t0 = time.perf_counter()
            retry_after, gen, status = None, None, None
            try:
                resp = self._session.post(url, json=self._payload(req), headers=self._headers(), timeout=self.timeout)
                if resp.status_code == 200:
                    gen = self._read(resp.json(), req, time.perf_counter() - t0, url)
                else:
                    status = resp.status_code
                    last = f"HTTP {status} from {url}: {resp.text[:300]}"
                    retry_after = resp.headers.get("Retry-After")
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as e:
                last = f"{type(e).__name__} from {url}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # a 200 whose body is cut or not an answer
                last = f"unreadable answer from {url} ({type(e).__name__}: {e})"
            finally:
                ok = gen is not None
                self.endpoints.release(
                    server,
                    ok,
                    time.perf_counter() - t0,
                    gen.prompt_tokens if ok else 0,
                    gen.completion_tokens if ok else 0,
                )
            if gen is not None:
                return gen
            if status is not None and status not in RETRY_STATUS:
                break
            if attempt < self.max_retries and not self.endpoints.others_live(server):
                try:
                    delay = min(float(retry_after), MAX_RETRY_AFTER) if retry_after else self.backoff * 2**attempt
                except ValueError:
                    delay = self.backoff * 2**attempt
                time.sleep(max(0.0, delay) * (1 + 0.1 * random.random()))
        where = tried[0] if len(set(tried)) == 1 else ", ".join(dict.fromkeys(tried))
        raise BackendError(f"OpenAI-compatible backend at {where} failed after {attempt + 1} attempt(s): {last}")

    def _read(self, data: Dict[str, Any], req: GenerationRequest, seconds: float, url: str) -> Generation:
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        if text is not None and not isinstance(text, str):
            raise TypeError(f"answer text is {type(text).__name__}")
        text = text or ""
        usage = data.get("usage") or {}
        ignored = bool(req.grammar and self._grammar_path) and not self._follows(req, text)
        if ignored:
            with self._warn_lock:
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"OpenAI-compatible backend at {url}: an answer does not follow the grammar sent in the "
                        f"request field {'.'.join(self._grammar_path)!r}, so the server ignores that field and "
                        f'answers unconstrained. Set grammar_field to the server\'s: "llama.cpp" (grammar), '
                        f'"vllm" (structured_outputs.grammar, vLLM >= 0.12), or "none". Counted as '
                        f"grammar_ignored in the usage.",
                        stacklevel=2,
                    )
        return Generation(
            text=text,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            seconds=seconds,
            grammar_ignored=ignored,
            truncated=choice.get("finish_reason") == "length",
        )

    @staticmethod
    def _follows(req: GenerationRequest, text: str) -> bool:
        """Servers drop the stop sequence and may stop at max_tokens: a grammar-following answer is a prefix of a
        sentence of the grammar."""
        try:
            return gbnf.accepts(req.grammar or "", text, prefix=True)
        except (ValueError, KeyError, IndexError):  # not a grammar this recognizer reads: nothing to check
            return True

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        out: List[Optional[Generation]] = [None] * len(requests)

        def keep(i: int, gen: Generation) -> None:
            out[i] = gen

        self.generate_each(requests, keep)
        return out  # type: ignore[return-value]

    def generate_each(
        self, requests: Sequence[GenerationRequest], on_answer: Callable[[int, Generation], None]
    ) -> None:
        """Up to ``max_concurrency`` requests in flight; ``on_answer`` as each one arrives. When a request fails
        for good, the others already in flight finish (and are handed over) before the error is raised."""
        workers = self.max_concurrency * len(self.endpoints)
        if len(requests) <= 1 or workers == 1:
            for i, r in enumerate(requests):
                on_answer(i, self._post(r))
            return
        error: Optional[BaseException] = None
        with ThreadPoolExecutor(max_workers=min(workers, len(requests))) as pool:
            futures = {pool.submit(self._post, r): i for i, r in enumerate(requests)}
            for fut in as_completed(futures):
                try:
                    gen = fut.result()
                except BaseException as e:  # noqa: BLE001  (re-raised below, after the rest are kept)
                    if error is None:
                        error = e
                        for other in futures:
                            other.cancel()  # not yet started: not sent
                    continue
                on_answer(futures[fut], gen)
        if error is not None:
            raise error
