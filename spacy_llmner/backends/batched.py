"""Greedy decoding of many prompts at once on one llama.cpp model: one sequence per prompt in a single batch.

On a CPU, generating one token for one sequence leaves most of each weight read unused; a batch of sequences shares
every read, so tokens per second grow with the batch (prompt evaluation, which is already batched, runs several
times faster per token than single-sequence generation; figures in docs/component.md). Prompts that share a prefix
(instructions, label list, demonstrations) evaluate it once: it is kept in sequence 0 across calls and copied to
each sequence. Each sequence has a KV stream of its own (``kv_unified=False``): in one shared buffer every token's
attention spans all sequences' cells (masked), which made generation markedly slower (measured in
docs/component.md).

Each sequence may carry a GBNF grammar. llama-cpp-python's own sampler applies a grammar to every vocabulary entry
at every step (262k for Gemma: most of the time per token); like llama.cpp's common sampler, this applies it to the
best ``top_k`` candidates first and to the whole vocabulary only when none of them is allowed. Greedy picks the best
allowed token either way, so the output equals full filtering (tested against llama-cpp-python's sampler). llama_cpp
is imported here, and this module only by the backend on first use.
"""

import ctypes
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ._llama import grammar_sampler, kept_prefix, new_context, shared_prefix


@dataclass
class _Seq:
    tokens: List[int]
    max_tokens: int
    stop: Sequence[str]
    grammar: Optional[str]
    seq_id: int = 0
    pos: int = 0
    sampler: object = None
    rng: object = None  # the torch engine's generator when it samples
    generated: List[int] = field(default_factory=list)
    logprobs: List[Tuple[int, float]] = field(default_factory=list)  # (end offset in text, log-probability)
    out: bytes = b""
    text: str = ""
    done: bool = False
    truncated: bool = False  # stopped by max_tokens, not by an end token or a stop string
    looped: bool = False  # stopped because a line repeated (``looping``): the answer before it is kept
    blocks: Tuple[tuple, ...] = ()  # the torch engine's demonstration blocks (tokens), read in parallel
    rest: int = 0  # ... and how many tokens follow them
    candidates: object = None  # the torch engine's restricted head: the tokens its answer can use (np.ndarray)


class GrammarFilter:
    """Greedy choice under a GBNF sampler: the best ``top_k`` candidates first, the whole vocabulary only when
    none of them is allowed (the same choice as filtering everything, as llama.cpp's common sampler does)."""

    def __init__(self, llama_cpp, n_vocab: int, top_k: int):
        self.lc = llama_cpp
        self.n_vocab = n_vocab
        self.top_k = top_k
        self._few = (llama_cpp.llama_token_data * top_k)()
        self._all = None
        self._all_view = None
        self._ids = np.arange(n_vocab)

    def best_of(self, sampler, logits: np.ndarray, ids: np.ndarray) -> Optional[int]:
        """The best allowed id among the ``top_k`` best of ``logits`` (whose entries are ``ids``), or None."""
        k = min(self.top_k, len(ids))
        best = np.argpartition(logits, -k)[-k:]
        best = best[np.argsort(-logits[best])]
        j = self.first_allowed(sampler, ids[best], logits[best])
        return None if j is None else int(ids[best[j]])

    def first_allowed(self, sampler, ids: np.ndarray, logits: np.ndarray) -> Optional[int]:
        """The position of the first allowed entry of candidates sorted best first (at most ``top_k``), or None."""
        lc = self.lc
        few = self._few
        k = len(ids)
        for i in range(k):
            few[i].id, few[i].logit, few[i].p = int(ids[i]), float(logits[i]), 0.0
        arr = lc.llama_token_data_array(few, k, -1, False)
        lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        for i in range(k):  # still in logit order
            if few[i].logit != float("-inf"):
                return i
        return None

    def best(self, sampler, logits: np.ndarray) -> Optional[int]:
        """The best allowed token over the whole vocabulary (``logits`` has one entry per token), or None."""
        found = self.best_of(sampler, logits, self._ids)
        if found is not None:
            return found
        lc = self.lc
        if self._all is None:
            self._all = (lc.llama_token_data * self.n_vocab)()
            # A numpy view of the same memory: filling 262k entries field by field in Python took ~0.2 s.
            self._all_view = np.ctypeslib.as_array(self._all).view(
                np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            )
        view = self._all_view
        view["id"] = np.arange(self.n_vocab, dtype=np.int32)
        view["logit"] = logits
        view["p"] = 0.0
        arr = lc.llama_token_data_array(self._all, self.n_vocab, -1, False)
        lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        # The sampler may reorder entries; map the survivors back by id.
        allowed = np.full(self.n_vocab, -np.inf, dtype=np.float32)
        allowed[view["id"]] = view["logit"]
        if not np.isfinite(allowed).any():
            return None
        return int(np.argmax(allowed))


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))


REPEATS = 3  # a line already written this many times ends the answer


def looping(text: str) -> bool:
    """Whether the last line of ``text`` (which ends with a newline) was already written ``REPEATS`` times: greedy
    decoding that repeats a line that often repeats it until the token limit (a text mentioning the same entity
    three times lists it at most three times)."""
    lines = text.rstrip("\n").split("\n")
    last = lines[-1].strip()
    return bool(last) and sum(line.strip() == last for line in lines[:-1]) >= REPEATS


def extend(s: _Seq, token: int, piece: bytes, logprob) -> Optional[int]:
    """Append ``token`` (its bytes ``piece``) to a sequence with its log-probability (a callable, evaluated only for
    a token that is kept); returns the token, or None when the sequence has finished: a stop string, a loop
    (``looping``) or its max_tokens."""
    s.out += piece
    s.generated.append(token)
    s.text = s.out.decode("utf8", errors="ignore")
    s.logprobs.append((len(s.text), logprob()))
    hit = min((s.text.index(x) for x in s.stop if x in s.text), default=None)
    if hit is not None:
        s.text = s.text[:hit]
        return None
    if s.text.endswith("\n") and looping(s.text):
        s.text = s.text[: s.text.rstrip("\n").rfind("\n") + 1]  # the answer before the line that repeats
        s.looped = True
        return None
    if len(s.generated) >= s.max_tokens:
        s.truncated = True
        return None
    return token


def advance(llm, vocab, s: _Seq, token: Optional[int], logprob) -> Optional[int]:
    """``extend`` with llama.cpp's vocabulary and grammar sampler: None (nothing allowed) or an end-of-generation
    token ends the sequence."""
    import llama_cpp as lc

    if token is None or lc.llama_vocab_is_eog(vocab, token):
        return None
    if s.sampler is not None:
        lc.llama_sampler_accept(s.sampler, token)
    return extend(s, token, llm.detokenize([token], prev_tokens=s.tokens + s.generated), logprob)


class BatchedDecoder:
    def __init__(self, llm, n_seq: int = 8, n_ctx_seq: int = 4096, top_k: int = 16):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llm
        self.n_seq = n_seq
        self.top_k = top_k
        # sequence 0 holds the shared prefix; the context is split evenly between the sequences' KV streams
        self.ctx, self.n_batch = new_context(llm, n_ctx_seq * (n_seq + 1), n_seq + 1, unified=False)
        self.n_ctx = n_ctx_seq  # per sequence
        self.batch = llama_cpp.llama_batch_init(max(self.n_batch, n_seq + 1), 0, n_seq + 1)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llm.n_vocab()
        self.prefix: List[int] = []  # what sequence 0 holds
        self.grammar = GrammarFilter(llama_cpp, self.n_vocab, top_k)
        # what was evaluated, as torch_decoder.TorchDecoder counts it: tokens through the body, output-head rows,
        # and the matrix products' arithmetic (the body's parameters less the tied embedding, twice per token)
        self.usage: Counter = Counter()
        head = self.n_vocab * llama_cpp.llama_model_n_embd(llm.model)
        self._body_flop = 2 * (llama_cpp.llama_model_n_params(llm.model) - head)
        self._row_flop = 2 * llama_cpp.llama_model_n_embd(llm.model)

    def close(self) -> None:
        if self.batch is not None:
            self.llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()

    # -- batch plumbing ---------------------------------------------------------------------------------------
    def decode_step(self, items: List[Tuple[int, int, int, bool]]) -> List[int]:
        """Decode (token, pos, seq_id, wants_logits) items in n_batch slices; returns each item's logit row
        (-1 when it asked for none). Rows are valid for the last slice only: ``generate`` keeps a step that
        wants logits within one slice (only the shared prefix, which wants none, may need several)."""
        rows = [-1] * len(items)
        b = self.batch
        for start in range(0, len(items), self.n_batch):
            part = items[start : start + self.n_batch]
            b.n_tokens = len(part)
            for j, (tok, pos, seq, logits) in enumerate(part):
                b.token[j] = tok
                b.pos[j] = pos
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq
                b.logits[j] = logits
                if logits:
                    rows[start + j] = j
            outputs = sum(1 for item in part if item[3])
            self.usage["evaluated_tokens"] += len(part)
            self.usage["head_rows"] += outputs * self.n_vocab
            self.usage["gflop"] += (self._body_flop * len(part) + self._row_flop * outputs * self.n_vocab) / 1e9
            rc = self.llama_cpp.llama_decode(self.ctx.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}): sequence context of {self.n_ctx} tokens exhausted?")
        return rows

    def _logits(self, row: int) -> np.ndarray:
        ptr = self.llama_cpp.llama_get_logits_ith(self.ctx.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _pick(self, seq: _Seq, logits: np.ndarray) -> Optional[int]:
        if seq.sampler is None:
            return int(np.argmax(logits))
        return self.grammar.best(seq.sampler, logits)

    # -- generation -------------------------------------------------------------------------------------------
    def set_prefix(self, prefix: List[int]) -> None:
        lc = self.llama_cpp
        keep = kept_prefix(self.prefix, prefix)
        lc.llama_memory_seq_rm(self.memory, 0, keep, -1)
        rest = prefix[keep:]
        if rest:
            self.decode_step([(t, keep + i, 0, False) for i, t in enumerate(rest)])
        self.prefix = list(prefix)

    def _start(self, s: _Seq, common: int) -> List[Tuple[int, int, int, bool]]:
        """Prepare a sequence's slot and return its prompt tokens past the shared prefix (logits on the last)."""
        lc = self.llama_cpp
        if len(s.tokens) + s.max_tokens > self.n_ctx:
            raise ValueError(f"prompt of {len(s.tokens)} tokens + {s.max_tokens} exceeds n_ctx={self.n_ctx}")
        lc.llama_memory_seq_rm(self.memory, s.seq_id, -1, -1)
        if common:
            # Between KV streams llama.cpp copies whole sequences only; sequence 0 holds exactly the prefix.
            lc.llama_memory_seq_cp(self.memory, 0, s.seq_id, -1, -1)
        if s.grammar:
            s.sampler = grammar_sampler(self.vocab, s.grammar)
        s.pos = len(s.tokens)
        last = len(s.tokens) - 1
        return [(t, common + i, s.seq_id, common + i == last) for i, t in enumerate(s.tokens[common:])]

    def _advance(self, s: _Seq, logits: np.ndarray) -> Optional[int]:
        """Choose the sequence's next token; None when it has finished."""
        token = self._pick(s, logits)
        return advance(self.llm, self.vocab, s, token, lambda: log_softmax_at(logits, token))

    def _finish(self, s: _Seq) -> None:
        if s.sampler is not None:
            self.llama_cpp.llama_sampler_free(s.sampler)
            s.sampler = None
        self.llama_cpp.llama_memory_seq_rm(self.memory, s.seq_id, -1, -1)
        s.done = True

    def generate(
        self,
        prompts: Sequence[List[int]],
        max_tokens: Sequence[int],
        stops: Sequence[Sequence[str]],
        grammars: Sequence[Optional[str]],
    ) -> List[Tuple[str, int, Tuple[Tuple[int, float], ...], bool]]:
        """Greedy completions for tokenized prompts: (text, completion tokens, token log-probabilities, cut by
        its max_tokens) each.

        Continuous batching: up to ``n_seq`` sequences decode together, and a finished one's slot is refilled
        at once, its prompt tokens riding in the same batch as the others' next tokens.
        """
        if not prompts:
            return []
        # The shared prefix, less one token so every sequence has a suffix whose last token yields logits.
        common = shared_prefix(prompts, min(len(p) for p in prompts) - 1)
        self.set_prefix(list(prompts[0][:common]))
        seqs = [_Seq(list(p), m, st, g) for p, m, st, g in zip(prompts, max_tokens, stops, grammars)]
        pending = list(reversed(seqs))
        free_ids = list(range(self.n_seq, 0, -1))
        active: List[_Seq] = []
        step: List[Tuple[int, int, int, bool]] = []
        try:
            while pending or active:
                # Admit new sequences while slots and batch room remain (one at least, so nothing stalls).
                while pending and free_ids:
                    s = pending[-1]
                    s.seq_id = free_ids[-1]
                    need = len(s.tokens) - common
                    if step and len(step) + need > self.n_batch:
                        break
                    pending.pop()
                    free_ids.pop()
                    step.extend(self._start(s, common))
                    active.append(s)
                rows = self.decode_step(step)
                # Each active sequence's logits sit at the row of its last item in this step.
                row_of = {}
                for (_tok, _pos, seq_id, wants), row in zip(step, rows):
                    if wants:
                        row_of[seq_id] = row
                still, step = [], []
                for s in active:
                    token = self._advance(s, self._logits(row_of[s.seq_id]))
                    if token is None:
                        self._finish(s)
                        free_ids.append(s.seq_id)
                        continue
                    still.append(s)
                    step.append((token, s.pos, s.seq_id, True))
                    s.pos += 1
                active = still
        finally:
            for s in seqs:
                if not s.done and s.seq_id:
                    self._finish(s)
        self.usage["loops_stopped"] += sum(s.looped for s in seqs)
        return [(s.text, len(s.generated), tuple(s.logprobs), s.truncated) for s in seqs]
