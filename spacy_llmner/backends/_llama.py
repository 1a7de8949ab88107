"""Low-level llama.cpp plumbing shared by the batched decoder and the trie scorer (imported on first use only)."""

from typing import List, Sequence


def new_context(llm, n_ctx: int, n_seq_max: int, unified: bool):
    """A second llama.cpp context on ``llm``'s weights, with its settings but its own size and sequences, and its
    LoRA adapter (llama.cpp applies adapters per context: without this a context would serve the base model)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    for name, _ in llama_cpp.llama_context_params._fields_:
        setattr(params, name, getattr(llm.context_params, name))
    params.n_ctx = n_ctx
    params.n_seq_max = n_seq_max
    params.kv_unified = unified
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    if llm.lora_path:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        scales = (ctypes.c_float * 1)(llm.lora_scale)
        if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, scales):
            raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {llm.lora_path} to a new context")
    return ctx, params.n_batch


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


def grammar_sampler(vocab, grammar: str):
    """A llama.cpp grammar sampler for a GBNF text (free it with llama_sampler_free)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf8"), b"root")
    if not sampler:
        raise ValueError("the GBNF grammar did not compile")
    return sampler
