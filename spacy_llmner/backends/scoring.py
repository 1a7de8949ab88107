"""Log-probabilities of fixed continuations (label names, "yes"/"no") on one llama.cpp model, for constrained
choices without generation.

All token sequences of a call (each context followed by each of its options) are merged into one token trie,
so a sentence's prompt is evaluated once for all its spans and every span's context once for all its options.
Each trie node is one KV cell; llama.cpp lets a cell belong to several sequences, so a node shared by many
options is stored and computed once (one unified KV buffer, one sequence id per option). The part common to
every sequence of a call stays in sequence 0 and is reused by the next call when it shares it (instructions,
fixed demonstrations). Logits are read only where an option token follows. llama_cpp is imported here, and
this module only by the backend on first use.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ._llama import kept_prefix, new_context, shared_prefix


@dataclass
class _Node:
    token: int
    pos: int
    seqs: List[int] = field(default_factory=list)
    children: Dict[int, "_Node"] = field(default_factory=dict)
    wants_logits: bool = False
    logprobs: Dict[int, float] = field(default_factory=dict)  # next token -> log-probability


class TrieScorer:
    def __init__(self, llm, n_ctx: int = 8192, max_seqs: int = 64):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llm
        # unified: one cell may belong to many sequences, so shared trie nodes are stored once
        self.ctx, self.n_batch = new_context(llm, n_ctx, max_seqs, unified=True)
        self.n_ctx = n_ctx
        self.max_seqs = max_seqs
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, max_seqs)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.n_vocab = llm.n_vocab()
        self.prefix: List[int] = []  # what sequence 0 holds
        self.evaluated = 0

    def close(self) -> None:
        if self.batch is not None:
            self.llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()

    def score(self, items: Sequence[Tuple[List[int], Sequence[List[int]]]]) -> List[List[float]]:
        """``items``: (context tokens, [option tokens, ...]). Returns each option's summed log-probability;
        ``evaluated`` counts the tokens actually run through the model (shared trie nodes once)."""
        self.evaluated = 0
        out: List[List[float]] = [[] for _ in items]
        group: List[int] = []
        seqs = cells = 0
        for i, (ctx, options) in enumerate(items):
            if not ctx or not options or any(not o for o in options):
                raise ValueError("scoring needs a non-empty context and non-empty options")
            need = len(ctx) + sum(len(o) for o in options)
            if need + 1 > self.n_ctx or len(options) > self.max_seqs - 1:
                raise ValueError(
                    f"a scoring request of {need} tokens / {len(options)} options does not fit "
                    f"n_ctx={self.n_ctx} / {self.max_seqs - 1} options"
                )
            if group and (seqs + len(options) > self.max_seqs - 1 or cells + need > self.n_ctx):
                self._score_group([items[j] for j in group], [out[j] for j in group])
                group, seqs, cells = [], 0, 0
            group.append(i)
            seqs += len(options)
            cells += need
        if group:
            self._score_group([items[j] for j in group], [out[j] for j in group])
        return out

    def _score_group(self, items, outs: List[List[float]]) -> None:
        lc = self.llama_cpp
        full = [ctx + opt for ctx, options in items for opt in options]
        # The part every sequence shares, short of each context's last token (whose logits we need).
        common = shared_prefix(full, min(len(ctx) for ctx, _ in items) - 1)
        self._set_prefix(full[0][:common])
        roots: Dict[int, _Node] = {}
        order: List[_Node] = []  # parents before children
        ends: List[List[Tuple[List[_Node], List[int]]]] = []
        seq_id = 1
        for ctx, options in items:
            per_item = []
            for opt in options:
                lc.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                if common:
                    lc.llama_memory_seq_cp(self.memory, 0, seq_id, 0, common)
                tokens = ctx + opt
                level, path = roots, []
                for pos in range(common, len(tokens)):
                    node = level.get(tokens[pos])
                    if node is None:
                        node = level[tokens[pos]] = _Node(tokens[pos], pos)
                        order.append(node)
                    node.seqs.append(seq_id)
                    path.append(node)
                    level = node.children
                # logits wanted at the last context token and at every option token but the last
                first = len(ctx) - 1 - common
                for node in path[first:-1]:
                    node.wants_logits = True
                per_item.append((path[first:], opt))
                seq_id += 1
            ends.append(per_item)
        try:
            self._evaluate(order)
        finally:
            for s in range(1, seq_id):
                lc.llama_memory_seq_rm(self.memory, s, -1, -1)
        for per_item, out in zip(ends, outs):
            for path, opt in per_item:
                out.append(float(sum(parent.logprobs[tok] for parent, tok in zip(path, opt))))

    def _set_prefix(self, prefix: List[int]) -> None:
        keep = kept_prefix(self.prefix, prefix)
        self.llama_cpp.llama_memory_seq_rm(self.memory, 0, keep, -1)
        rest = prefix[keep:]
        self.evaluated += len(rest)
        for start in range(0, len(rest), self.n_batch):
            part = [_Node(t, keep + start + i, [0]) for i, t in enumerate(rest[start : start + self.n_batch])]
            self._decode(part)
        self.prefix = list(prefix)

    def _evaluate(self, order: List[_Node]) -> None:
        self.evaluated += len(order)
        for start in range(0, len(order), self.n_batch):
            part = order[start : start + self.n_batch]
            self._decode(part)
            for j, node in enumerate(part):
                if not node.wants_logits:
                    continue
                ptr = self.llama_cpp.llama_get_logits_ith(self.ctx.ctx, j)  # by position in the batch
                logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
                top = logits.max()
                norm = top + np.log(np.exp(logits - top).sum())
                node.logprobs = {tok: float(logits[tok] - norm) for tok in node.children}

    def _decode(self, nodes: List[_Node]) -> None:
        b = self.batch
        b.n_tokens = len(nodes)
        for j, node in enumerate(nodes):
            b.token[j] = node.token
            b.pos[j] = node.pos
            b.n_seq_id[j] = len(node.seqs)
            for k, s in enumerate(node.seqs):
                b.seq_id[j][k] = s
            b.logits[j] = node.wants_logits
        rc = self.llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) while scoring: context of {self.n_ctx} exhausted?")
