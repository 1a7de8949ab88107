"""Low-level llama.cpp plumbing shared by the batched decoder and the trie scorer (imported on first use only)."""

from typing import List, Sequence


def new_context(llm, n_ctx: int, n_seq_max: int, unified: bool):
    """A second llama.cpp context on ``llm``'s weights, with its settings but its own size and sequences."""
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    for name, _ in llama_cpp.llama_context_params._fields_:
        setattr(params, name, getattr(llm.context_params, name))
    params.n_ctx = n_ctx
    params.n_seq_max = n_seq_max
    params.kv_unified = unified
    return _internals.LlamaContext(model=llm._model, params=params, verbose=False), params.n_batch


def shared_prefix(seqs: Sequence[List[int]], cap: int) -> int:
    """How many leading tokens every sequence shares, at most ``cap``."""
    common = cap
    for seq in seqs[1:]:
        common = min(common, next((i for i, (a, b) in enumerate(zip(seqs[0], seq)) if a != b), common))
    return common


def kept_prefix(held: Sequence[int], wanted: Sequence[int]) -> int:
    """How much of what a sequence holds can stay when it must hold ``wanted``."""
    keep = 0
    for a, b in zip(held, wanted):
        if a != b:
            break
        keep += 1
    return keep
