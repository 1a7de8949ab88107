"""Greedy grammar-constrained decoding of many prompts at once on ``torch_model.TorchModel`` (a transformers
causal LM), the output head restricted to the tokens an answer can use.

Same contract as ``batched.BatchedDecoder.generate`` (and the same GBNF grammars, applied by llguidance on the
model's vocabulary: ``vocab.Vocab``, no llama.cpp): the backend picks this decoder with ``engine = "torch"``. What
differs is where the arithmetic goes:

- **Batches of sequences through PyTorch.** Prompts are sorted by length and decoded ``n_seq`` at a time: their
  prompts evaluated together (right-padded), then one token per sequence per step. When an eighth of the rows have
  finished, the next waiting prompts are prefilled into their places, so the batch stays full instead of running on
  with a few long answers; each row then writes at its own slot. Once none wait, finished rows leave the cache.
  A cache starts with a few free slots and grows when a row needs more. The prefix every prompt shares
  (instructions, label list) is evaluated once and kept across calls.
- **Demonstrations read in parallel** (``generate``'s ``blocks``, the backend's ``demonstrations = "parallel"``):
  each demonstration is evaluated once after the shared head alone and its keys and values are kept and copied into
  every row that shows it; only the question is evaluated per prompt (docs/speed.md).
- **A restricted output head.** Every format's grammar writes mentions copied from the input plus labels and
  the format's punctuation, so an answer's tokens are tokens whose text occurs in the prompt or in one of the
  grammar's literals. Logits are
  computed for those rows only (``head = "restricted"``: thousands of rows instead of 262,144; the head is two
  thirds of a generated token's arithmetic in the full model). The grammar then filters the best ``top_k`` of
  them; when none is allowed the full head is computed for that step (counted in ``usage["full_head_steps"]``),
  so the decoder never fails where the full-head decoder would succeed. The choice equals full-head greedy
  decoding whenever the best allowed token's text lies within the prompt or one literal, which fails only for a
  token spanning two literals that the prompt never shows together; ``head = "full"`` computes every row (the
  reference the tests compare against). Log-probabilities are normalised over the computed rows.

``usage`` counts what was evaluated (prompt tokens, the shared prefix once; padding; generated tokens; head rows)
and the arithmetic it cost (``gflop``, matrix products of body and head; attention excluded); ``evaluated_tokens``
counts every row through the body (padding and finished rows riding along included).
"""

import math
import zlib
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..formats.gbnf import literals
from ._llama import shared_prefix
from .batched import _Seq, extend, log_softmax_at
from .torch_model import GROW, TorchModel
from .vocab import Vocab

# The restricted head looks up every substring of a prompt of up to SHORT characters in the vocabulary's text table,
# and a longer piece only where its first SHORT characters occur.
SHORT = 8
KEPT_PIECES = 4096  # demonstrations and literals whose pieces are kept


def widened(mask: np.ndarray, slots: int) -> np.ndarray:
    """A padding mask with at least ``slots`` columns (the new ones 0)."""
    return mask if mask.shape[1] >= slots else np.pad(mask, ((0, 0), (0, slots - mask.shape[1])))


def nbytes(tensors) -> int:
    """The bytes a tuple of tensors holds."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy choice (``temperature`` > 0), as llama.cpp's default chain: the best ``top_k``
    candidates the grammar allows, scaled by the temperature, those under ``min_p`` times the best one's probability
    dropped, then the smallest set holding ``top_p`` of the rest. Each prompt draws from its own generator, seeded by
    ``seed`` and the prompt's tokens: a prompt gets the same answer alone or in any batch (a negative seed: a fresh
    generator each time)."""

    temperature: float
    seed: int = 0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling needs a temperature above 0, not {self.temperature}")

    def generator(self, prompt: Sequence[int]) -> np.random.Generator:
        if self.seed < 0:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes())])

    def pick(self, rng: np.random.Generator, logits: np.ndarray) -> int:
        """The index drawn among candidate ``logits`` (the allowed ones, best first)."""
        z = logits[: self.top_k] / self.temperature
        p = np.exp(z - z.max())
        p[p < self.min_p] = 0.0  # relative to the best candidate's probability (1 after the shift)
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1  # candidates are sorted best first
        p = p[:keep] / p[:keep].sum()
        return int(rng.choice(len(p), p=p))


class TorchDecoder:
    def __init__(
        self,
        vocab: Vocab,
        model: TorchModel,
        n_seq: int = 32,
        head: str = "restricted",
        top_k: int = 16,
        max_batch_tokens: int = 1024,
        sampling: Optional[Sampling] = None,
        block_cache_mb: float = 1024,
    ):
        import torch

        if head not in ("restricted", "full"):
            raise ValueError(f"torch decoder: head must be 'restricted' or 'full', not {head!r}")
        self.torch = torch
        self.vocab = vocab
        self.model = model
        self.n_seq = n_seq
        self.head = head
        self.top_k = top_k
        self.max_batch_tokens = max_batch_tokens
        self.sampling = sampling
        self.n_vocab = vocab.n_vocab
        if model.n_vocab < self.n_vocab:
            raise ValueError(f"torch engine: the model's head has {model.n_vocab} rows, its vocabulary {self.n_vocab}")
        self.eog = list(vocab.eog)
        self._pieces: Optional[Dict[str, Tuple[int, ...]]] = None
        self._long: Dict[str, List[str]] = {}  # the first SHORT characters of a longer piece → those pieces
        self._longest = SHORT  # characters in the longest piece
        self._kept_pieces: Dict[object, frozenset] = {}  # the shared prefix's, a demonstration's, a literal's pieces
        self.prefix: List[int] = []
        self.prefix_cache = None  # the shared prefix's keys and values (torch_model.SlotCache, one row)
        self.usage: Counter = Counter()
        # demonstration blocks' keys and values by (head, block tokens), least recently used first
        self.block_cache_mb = block_cache_mb
        self._block_store: "OrderedDict[Tuple[tuple, tuple], tuple]" = OrderedDict()
        self._block_bytes = 0
        # while a call's rows are decoded: each of its blocks' admissions still to come, in order (``_evict``)
        self._upcoming: Dict[tuple, deque] = {}

    def close(self) -> None:
        self.prefix_cache = None
        self._block_store.clear()
        self._block_bytes = 0

    # -- the restricted head ----------------------------------------------------------------------------------
    def pieces(self) -> Dict[str, Tuple[int, ...]]:
        """Token text → token ids, over the whole vocabulary (built once)."""
        if self._pieces is None:
            self._pieces = self.vocab.by_text()
            for text in [text for text in self._pieces if len(text) > SHORT]:
                self._long.setdefault(text[:SHORT], []).append(text)
                self._longest = max(self._longest, len(text))
        return self._pieces

    def candidates(
        self, tokens: Sequence[int], grammar: str = "", common: int = 0, blocks: Sequence[Sequence[int]] = ()
    ) -> np.ndarray:
        """Ids of every token whose text occurs in the prompt or in one of the grammar's literals, the prompt's own
        tokens and end-of-generation. The first ``common`` tokens are the shared prefix: their part is found once
        per prefix and kept. ``blocks``: the demonstrations that follow it (consecutive, as ``generate`` takes them),
        whose pieces are found once per demonstration and kept."""
        found = set(self._kept(tuple(tokens[:common])))
        found |= self._pieces_after(tokens[common:], blocks)
        for literal in set(literals(grammar)):
            found |= self._kept(literal)
        found.update(tokens)
        found.update(self.eog)
        return np.fromiter(sorted(found), dtype=np.int64)

    def _pieces_after(self, tokens: Sequence[int], blocks: Sequence[Sequence[int]]) -> set:
        """The pieces occurring in the text of ``tokens``, which start with ``blocks``: each block's own (kept), the
        rest's, and those that start within a piece's length before a boundary and cross it."""
        whole = self.vocab.text_of(tokens)
        texts = [self.vocab.text_of(block) for block in blocks]
        if not blocks or not whole.startswith("".join(texts)):  # (a character split across blocks: found as one)
            return self._substrings(whole)
        found, at = set(), 0
        for block, text in zip(blocks, texts):
            found |= self._kept(tuple(block))
            at += len(text)
            found |= self._substrings(whole, range(max(0, at - self._longest + 1), at))
        return found | self._substrings(whole, range(at, len(whole)))

    def _kept(self, key) -> frozenset:
        """The pieces occurring in ``key`` (a literal, or tokens: the shared prefix, a demonstration), found once
        per key and kept (at most KEPT_PIECES keys: all are dropped when full)."""
        found = self._kept_pieces.get(key)
        if found is None:
            if len(self._kept_pieces) >= KEPT_PIECES:
                self._kept_pieces.clear()
            text = key if isinstance(key, str) else self.vocab.text_of(key)
            found = self._kept_pieces[key] = frozenset(self._substrings(text))
        return found

    def _substrings(self, text: str, starts: Optional[range] = None) -> set:
        """Ids of the pieces occurring in ``text`` (only those starting at ``starts``, default all): every substring
        of at most SHORT characters is looked up, and a longer piece only where its first SHORT characters occur."""
        table = self.pieces()
        get, long = table.get, self._long.get
        found: set = set()
        n = len(text)
        for i in range(n) if starts is None else starts:
            for j in range(i + 1, min(n, i + SHORT) + 1):
                ids = get(text[i:j])
                if ids:
                    found.update(ids)
            for piece in long(text[i : i + SHORT], ()):
                if text.startswith(piece, i):
                    found.update(table[piece])
        return found

    # -- evaluation -------------------------------------------------------------------------------------------
    def _forward(self, ids, positions, cache, mask=None):
        out = self.model.forward(ids, positions, cache, mask)
        self.usage["evaluated_tokens"] += out.shape[0] * out.shape[1]
        self.usage["gflop"] += self.model.body_flop * out.shape[0] * out.shape[1] / 1e9
        return out

    def _head(self, hidden, weight=None):
        """Logits (float32 tensor) for every vocabulary row, or for the head rows ``weight`` (``head_rows``)."""
        n = self.model.n_vocab if weight is None else weight.shape[0]
        self.usage["head_rows"] += n * hidden.shape[0]
        self.usage["gflop"] += self.model.row_flop * n * hidden.shape[0] / 1e9
        return self.model.logits(hidden, weight)

    def set_prefix(self, prefix: List[int]) -> None:
        if self.prefix_cache is not None and self.prefix == prefix:
            return
        self.prefix_cache = None
        if prefix:
            cache = self.model.new_cache(1, len(prefix))
            for at in range(0, len(prefix), self.max_batch_tokens):
                part = prefix[at : at + self.max_batch_tokens]
                self._forward([part], [list(range(at, at + len(part)))], cache)
            self.usage["prompt_tokens"] += len(prefix)  # (_forward counts it among the evaluated tokens)
            self.prefix_cache = cache
        self.prefix = list(prefix)

    def _sub_batches(self, widths: Sequence[int]) -> List[Tuple[int, int, int]]:
        """(first row, rows, padded width) of consecutive rows (sorted by width) whose padded block holds at most
        ``max_batch_tokens`` (a row wider than that alone)."""
        out, at = [], 0
        while at < len(widths):
            width, n = widths[at], 1
            while at + n < len(widths) and max(width, widths[at + n]) * (n + 1) <= self.max_batch_tokens:
                width, n = max(width, widths[at + n]), n + 1
            out.append((at, n, width))
            at += n
        return out

    # -- scoring ----------------------------------------------------------------------------------------------
    def score(self, items: Sequence[Tuple[List[int], Sequence[List[int]]]]) -> Tuple[List[List[float]], int]:
        """Each option's summed log-probability after its context (``items``: (context tokens, [option tokens,
        ...])), normalised over the whole vocabulary as the llama.cpp engine's trie scorer gives them, and the
        tokens evaluated. The prefix every (context + option) row of the call shares is evaluated once and kept
        (as for generation); each row then runs past it, right-padded, in sub-batches of at most
        ``max_batch_tokens``."""
        torch = self.torch
        rows = [(i, j, list(ctx), list(opt)) for i, (ctx, opts) in enumerate(items) for j, opt in enumerate(opts)]
        out: List[List[float]] = [[0.0] * len(opts) for _, opts in items]
        if not rows:
            return out, 0
        before = self.usage["evaluated_tokens"]
        # the hidden state that predicts an option's first token is the context's last: past the prefix
        common = shared_prefix([c + o for _, _, c, o in rows], min(len(c) for _, _, c, _ in rows) - 1)
        rows.sort(key=lambda r: len(r[2]) + len(r[3]))
        with torch.inference_mode():
            self.set_prefix([] if common == 0 else rows[0][2][:common])
            for at, n, width in self._sub_batches([len(c) + len(o) - common for _, _, c, o in rows]):
                part = rows[at : at + n]
                ids = np.zeros((n, width), dtype=np.int64)
                mask = np.zeros((n, common + width), dtype=np.int64)
                mask[:, :common] = 1
                picks, targets, owners = [], [], []
                for r, (_, _, ctx, opt) in enumerate(part):
                    seq = (ctx + opt)[common:]
                    ids[r, : len(seq)] = seq
                    mask[r, common : common + len(seq)] = 1
                    first = len(ctx) - 1 - common  # the position whose output predicts the option's first token
                    picks += [(r, first + k) for k in range(len(opt))]
                    targets += opt
                    owners += [r] * len(opt)
                self.usage["padding_tokens"] += int(ids.size) - int(mask[:, common:].sum())
                cache = self.model.new_cache(n, common + width, self.prefix_cache if common else None)
                positions = np.tile(np.arange(common, common + width), (n, 1))
                hidden = self._forward(ids, positions, cache, mask)
                sums = np.zeros(n)
                for lo in range(0, len(picks), 128):  # full-head logits of at most 128 positions at a time
                    chunk = picks[lo : lo + 128]
                    h = hidden[[r for r, _ in chunk], [c for _, c in chunk]]
                    logp = torch.log_softmax(self._head(h), dim=-1)
                    got = logp[torch.arange(len(chunk)), self.model.tensor(targets[lo : lo + 128], torch.long)]
                    np.add.at(sums, owners[lo : lo + 128], got.cpu().numpy())
                for r, (i, j, _, _) in enumerate(part):
                    out[i][j] = float(sums[r])
        return out, self.usage["evaluated_tokens"] - before

    def generate(
        self,
        prompts: Sequence[List[int]],
        max_tokens: Sequence[int],
        stops: Sequence[Sequence[str]],
        grammars: Sequence[Optional[str]],
        blocks: Optional[Sequence[Sequence[Tuple[int, int]]]] = None,
    ) -> List[Tuple[str, int, Tuple[Tuple[int, float], ...], bool]]:
        """Completions for tokenized prompts, greedy or drawn (``sampling``): (text, completion tokens, token
        log-probabilities, cut by its max_tokens) each. ``blocks``: per prompt, the token ranges of its
        demonstrations, consecutive, after its head and before its question (empty: read as one sequence). Each
        demonstration is then evaluated after the head alone, at the positions that follow it, once: its keys and
        values are kept (``block_cache_mb``) and copied into every row that shows it; the question follows at the
        position after the longest of its row's demonstrations, and sees the head and all of them."""
        if not prompts:
            return []
        seqs = [_Seq(list(p), m, st, g) for p, m, st, g in zip(prompts, max_tokens, stops, grammars)]
        blocks = blocks or [()] * len(seqs)
        # checked and grouped by head before anything is decoded
        heads: Dict[tuple, List[_Seq]] = {}
        for s, spans in zip(seqs, blocks):
            if spans:
                s.blocks = tuple(tuple(s.tokens[a:b]) for a, b in spans)
                if any(a != b for (_, a), (b, _) in zip(spans, spans[1:])) or not all(s.blocks):
                    raise ValueError("torch decoder: demonstration blocks must be consecutive, none empty")
                s.rest = len(s.tokens) - spans[-1][1]
                if s.rest < 1:
                    raise ValueError("torch decoder: a prompt with demonstration blocks needs tokens after them")
                heads.setdefault(tuple(s.tokens[: spans[0][0]]), []).append(s)
        with self.torch.inference_mode():
            plain = [s for s, b in zip(seqs, blocks) if not b]
            if plain:
                common = shared_prefix([s.tokens for s in plain], min(len(s.tokens) for s in plain) - 1)
                self.set_prefix(plain[0].tokens[:common])
                self._rounds(plain, common, self._prefill)
            for head, group in heads.items():
                self.set_prefix(list(head))
                self._rounds(group, len(head), self._prefill_blocks)
        return [(s.text, len(s.generated), tuple(s.logprobs), s.truncated) for s in seqs]

    def _rounds(self, seqs: List[_Seq], common: int, prefill) -> None:
        """Decodes ``seqs`` (sharing their first ``common`` tokens, the prefix already set), at most ``n_seq`` at a
        time, sorted by the length their prefill evaluates (the whole prompt, or only the question where the
        demonstrations are blocks: rows of a prefill sub-batch are padded to its widest), each group prefilled by
        ``prefill``. Rows that finish are replaced by the next waiting sequences (``_decode``), so a batch does not
        run on with a few long answers while others wait."""
        waiting = deque(sorted(seqs, key=lambda s: s.rest if s.blocks else len(s.tokens)))
        started: List[_Seq] = []
        upcoming: Dict[tuple, deque] = {}  # block → the admissions that show it, in order (for ``_evict``)
        for i, s in enumerate(waiting):
            for block in s.blocks:
                upcoming.setdefault(block, deque()).append(i)
        self._upcoming = upcoming

        def admit(n: int):
            group = [waiting.popleft() for _ in range(min(n, len(waiting)))]
            for s in group:
                for block in s.blocks:
                    upcoming[block].popleft()
                started.append(s)
                s.sampler = self.vocab.matcher(s.grammar) if s.grammar else None
                s.pos = len(s.tokens)
                s.rng = self.sampling.generator(s.tokens) if self.sampling else None
            return (group, *prefill(group, common)) if group else None

        try:
            while waiting:
                self._decode(*admit(self.n_seq), common, admit)
            self.usage["generated_tokens"] += sum(len(s.generated) for s in started)
            self.usage["loops_stopped"] += sum(s.looped for s in started)
        finally:
            self._upcoming = {}
            for s in started:
                s.sampler = None
                s.done = True

    def _prefill(self, seqs: List[_Seq], common: int):
        """Evaluates each prompt past the shared prefix, in sub-batches of at most ``max_batch_tokens`` (right-padded)
        written into one cache; returns each one's last hidden state (B, n_embd), the cache, its padding mask (B,
        filled slots) and each row's next slot (its generated tokens overwrite its padding)."""
        torch = self.torch
        widest = max(len(s.tokens) for s in seqs) - common
        capacity = common + widest + GROW
        cache = self.model.new_cache(len(seqs), capacity, self.prefix_cache if common else None)
        mask = np.zeros((len(seqs), common + widest), dtype=np.int64)
        mask[:, :common] = 1
        lasts = []
        for at, n, width in self._sub_batches([len(s.tokens) - common for s in seqs]):
            part = seqs[at : at + n]
            ids = np.zeros((n, width), dtype=np.int64)
            for r, s in enumerate(part):
                ids[r, : len(s.tokens) - common] = s.tokens[common:]
                mask[at + r, common : len(s.tokens)] = 1
                self.usage["prompt_tokens"] += len(s.tokens) - common
            self.usage["padding_tokens"] += int(ids.size) - sum(len(s.tokens) - common for s in part)
            positions = np.tile(np.arange(common, common + width), (n, 1))
            h = self._forward(ids, positions, cache.rows(at, at + n), mask[at : at + n, : common + width])
            lasts.extend(h[r, len(s.tokens) - common - 1] for r, s in enumerate(part))
        cache.length = common + widest
        return torch.stack(lasts), cache, mask, np.array([len(s.tokens) for s in seqs])

    # -- demonstrations read in parallel (``generate``'s blocks) ----------------------------------------------------
    def _block_values(self, head: tuple, seqs: List[_Seq]) -> Dict[tuple, tuple]:
        """Keys and values (n_layer, kv heads, tokens, head dim) of every demonstration block of ``seqs``, each
        evaluated after ``head`` (the prefix set) at the positions that follow it: from the store, the others
        evaluated now (right-padded, in sub-batches) and stored, the least recently used dropped past
        ``block_cache_mb``."""
        torch, common = self.torch, len(head)
        out, missing = {}, []
        for block in dict.fromkeys(b for s in seqs for b in s.blocks):
            kept = self._block_store.get((head, block))
            if kept is None:
                missing.append(block)
            else:
                self._block_store.move_to_end((head, block))
                out[block] = kept
                self.usage["reused_tokens"] += len(block)
        missing.sort(key=len)
        for at, n, width in self._sub_batches([len(b) for b in missing]):
            part = missing[at : at + n]
            ids = np.zeros((n, width), dtype=np.int64)
            mask = np.zeros((n, common + width), dtype=np.int64)
            mask[:, :common] = 1
            for r, block in enumerate(part):
                ids[r, : len(block)] = block
                mask[r, common : common + len(block)] = 1
            self.usage["prompt_tokens"] += int(mask[:, common:].sum())
            self.usage["padding_tokens"] += int(ids.size - mask[:, common:].sum())
            cache = self.model.new_cache(n, common + width, self.prefix_cache)
            self._forward(ids, np.tile(np.arange(common, common + width), (n, 1)), cache, mask)
            for r, block in enumerate(part):
                end = common + len(block)
                kv = tuple(torch.stack([layer[r, :, common:end] for layer in t]) for t in (cache.keys, cache.values))
                out[block] = kv
                self._block_store[(head, block)] = kv
                self._block_bytes += nbytes(kv)
        self._evict(head)
        return out

    def _evict(self, head: tuple) -> None:
        """Drops stored blocks until the store fits ``block_cache_mb``: first those the call being decoded (after
        ``head``) will not show again (least recently used first: blocks of earlier calls, or of another head), then
        the one it shows furthest ahead (Belady's rule: rows are admitted in a known order, so the store keeps what is
        needed soonest and a pool larger than the store is not evaluated again at every turn, as least-recently-used
        order would)."""

        def next_use(key) -> float:
            queue = self._upcoming.get(key[1]) if key[0] == head else None
            return queue[0] if queue else math.inf

        while self._block_bytes > self.block_cache_mb * 2**20 and self._block_store:
            victim = max(self._block_store, key=next_use)  # (the first of equals: the least recently used)
            self._block_bytes -= nbytes(self._block_store.pop(victim))

    def stored_block(self, head: Sequence[int], block: Sequence[int]) -> Optional[tuple]:
        """The stored keys and values of a demonstration block read after ``head``, or None."""
        return self._block_store.get((tuple(head), tuple(block)))

    def _prefill_blocks(self, seqs: List[_Seq], common: int):
        """``_prefill`` for rows whose demonstrations are blocks: each row's blocks' keys and values copied after the
        prefix (their positions those that follow it, the longest row's blocks setting the width, shorter rows
        masked), then each row's question evaluated after them (in the slots right after its own blocks), starting at
        the position after its longest block."""
        torch = self.torch
        values = self._block_values(tuple(self.prefix), seqs)
        widths = [sum(len(b) for b in s.blocks) for s in seqs]
        blocks_width, widest = max(widths), max(s.rest for s in seqs)
        filled = common + blocks_width
        capacity = filled + widest + GROW
        cache = self.model.new_cache(len(seqs), capacity, self.prefix_cache)
        mask = np.zeros((len(seqs), filled + widest), dtype=np.int64)
        mask[:, :common] = 1
        starts, slots = [], []  # each question's first position, and first slot: right after its own blocks
        for r, s in enumerate(seqs):
            at = common
            for block in s.blocks:
                keys, vals = values[block]
                end = at + len(block)
                for layer in range(len(cache.keys)):
                    cache.keys[layer][r, :, at:end] = keys[layer]
                    cache.values[layer][r, :, at:end] = vals[layer]
                cache.positions[r, at:end] = self.model.tensor(np.arange(common, common + len(block)))
                mask[r, at:end] = 1
                at = end
            starts.append(common + max(len(b) for b in s.blocks))
            slots.append(at)
        cache.length = filled
        lasts = []
        for at, n, width in self._sub_batches([s.rest for s in seqs]):
            part = seqs[at : at + n]
            ids = np.zeros((n, width), dtype=np.int64)
            positions = np.zeros((n, width), dtype=np.int64)
            for r, s in enumerate(part):
                ids[r, : s.rest] = s.tokens[-s.rest :]
                positions[r] = starts[at + r] + np.arange(width)
                mask[at + r, slots[at + r] : slots[at + r] + s.rest] = 1
                s.pos = starts[at + r] + s.rest
                self.usage["prompt_tokens"] += s.rest
            self.usage["padding_tokens"] += int(ids.size) - sum(s.rest for s in part)
            view = cache.rows(at, at + n)
            view.at_slots(self.model.tensor(slots[at : at + n]), width)
            h = self._forward(ids, positions, view, mask[at : at + n, : view.length + width])
            lasts.extend(h[r, s.rest - 1] for r, s in enumerate(part))
        cache.length = filled + widest
        return torch.stack(lasts), cache, mask, np.array(slots) + [s.rest for s in seqs]

    def _restricted(self, rows: List[_Seq], common: int):
        """The restricted head of ``rows``: the union of the unfinished rows' candidate tokens, which of them each
        row allows (a boolean tensor, rows × union) and the head's rows for them; None for the full head."""
        if self.head != "restricted":
            return None, None, None
        open_ = [(r, s) for r, s in enumerate(rows) if s.grammar and not s.done]
        for _, s in open_:
            if s.candidates is None:
                s.candidates = self.candidates(s.tokens, s.grammar, common, s.blocks)
        union = np.unique(np.concatenate([s.candidates for _, s in open_] or [np.zeros(0, np.int64)]))
        allowed = np.zeros((len(rows), len(union)), dtype=bool)
        for r, s in open_:
            allowed[r, np.searchsorted(union, s.candidates)] = True
        return union, self.model.tensor(allowed), self.model.head_rows(union)

    def _decode(self, rows: List[_Seq], hidden, cache, mask: np.ndarray, fill: np.ndarray, common: int, admit) -> None:
        """Decodes prefilled ``rows`` (``hidden``: each one's last hidden state; their ``cache``, its padding ``mask``
        and each row's next slot, ``fill``) one token per row per step, each row writing at its own slot
        (``SlotCache.at_slots``). A finished row rides along until an eighth of the rows have finished; then
        ``admit(n)`` (the sequences, hidden states, cache, mask and next slots of up to ``n`` more, prefilled; None
        when none wait) refills the finished rows in place; when none wait, the finished rows leave the cache once a
        quarter of the rows have finished."""
        torch = self.torch
        union, allowed, head = self._restricted(rows, common)
        while True:
            top = None
            if allowed is not None and len(union):
                # the best top_k allowed rows of every sequence at once, and each row's normaliser
                logits = self._head(hidden, head).masked_fill_(~allowed, float("-inf"))
                width = max(self.top_k, self.sampling.top_k) if self.sampling else self.top_k
                vals, idx = logits.topk(min(width, len(union)), dim=1)
                top = (union[idx.cpu().numpy()], vals.cpu().numpy(), torch.logsumexp(logits, dim=1).cpu().numpy())
            step_ids, step_pos = [], []
            for r, s in enumerate(rows):
                if not s.done:
                    token = None
                    if top is not None and s.sampler is not None:
                        finite = np.isfinite(top[1][r])  # (candidates are sorted best first: -inf ones last)
                        if s.rng is not None:  # sampled among the allowed ones of the best
                            ok = s.sampler.allowed(top[0][r]) & finite
                            where = np.flatnonzero(ok)
                            j = int(where[self.sampling.pick(s.rng, top[1][r][where])]) if len(where) else None
                        else:  # the best allowed
                            j = s.sampler.first_allowed(top[0][r][: int(finite.sum())].tolist())
                        if j is not None:
                            token = int(top[0][r][j])
                            lp = lambda v=float(top[1][r][j] - top[2][r]): v  # noqa: E731
                    if token is None:
                        full = self._head(hidden[r : r + 1])[0].cpu().numpy()
                        self.usage["full_head_steps"] += int(top is not None and s.sampler is not None)
                        if s.sampler is not None:  # (sampling too takes the best allowed token here: a rare step)
                            token = s.sampler.best(full)
                        elif s.rng is not None:  # no grammar: drawn from the best of the whole vocabulary
                            best = np.argsort(-full)[: self.sampling.top_k]
                            token = int(best[self.sampling.pick(s.rng, full[best])])
                        else:
                            token = int(np.argmax(full))
                        lp = lambda full=full, t=token: log_softmax_at(full, t)  # noqa: E731
                    nxt = None
                    if token is not None and not self.vocab.is_eog(token):
                        if s.sampler is not None:
                            s.sampler.accept(token)
                        nxt = extend(s, token, self.vocab.piece(token), lp)
                    if nxt is not None:
                        step_ids.append(nxt)
                        step_pos.append(s.pos)
                        s.pos += 1
                        continue
                    s.done = True
                # a finished row rides along until compaction: any token, at any position
                step_ids.append(0)
                step_pos.append(s.pos)
            live = [r for r, s in enumerate(rows) if not s.done]
            new = admit(len(rows) - len(live)) if len(live) <= 0.875 * len(rows) else None
            if not live and new is None:
                return
            if new is None and len(live) <= 0.75 * len(rows):  # compact: finished rows stop costing arithmetic
                cache.keep(self.model.tensor(live))
                rows = [rows[r] for r in live]
                step_ids = [step_ids[r] for r in live]
                step_pos = [step_pos[r] for r in live]
                mask, fill = mask[live], fill[live]
                if allowed is not None:
                    allowed = allowed[self.model.tensor(live)]
                live = list(range(len(rows)))
            if live:  # (finished rows ride along, writing at their next slot, masked)
                cache.at_slots(self.model.tensor(fill))
                mask = widened(mask, cache.length + 1)
                mask[live, fill[live]] = 1
                hidden = self._forward(
                    np.array(step_ids)[:, None], np.array(step_pos)[:, None], cache, mask[:, : cache.length + 1]
                )[:, 0]
                fill[live] += 1
            if new is not None:  # into the finished rows' places
                group, new_hidden, new_cache, new_mask, new_fill = new
                free = [r for r, s in enumerate(rows) if s.done][: len(group)]
                width, at = new_mask.shape[1], self.model.tensor(free)
                cache.put(at, new_cache, width)
                mask = widened(mask, width)
                mask[free] = 0
                mask[free, :width] = new_mask
                fill[free] = new_fill
                hidden[at] = new_hidden
                for r, s in zip(free, group):
                    rows[r] = s
                self.usage["refilled_rows"] += len(group)
                union, allowed, head = self._restricted(rows, common)
