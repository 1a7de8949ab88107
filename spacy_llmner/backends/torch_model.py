"""The fast engine's model: a transformers causal LM (any architecture ``weights.load_causal_lm`` loads) seen as a
body and an output head, so that ``torch_decoder`` can apply the head to a few rows only.

- ``forward``: the body (transformers' own model code: embeddings, layers, final norm) over a batch of
  right-padded token rows with explicit positions and a 2-D padding mask, appending to a transformers
  ``DynamicCache``; returns float32 hidden states.
- ``logits``: the output head on those hidden states, for every vocabulary row or for ``head_rows(ids)`` only,
  with the model's final logit soft-capping where its config has one.
- Caches (``SlotCache``, a transformers ``Cache``): preallocated slots written in place, grown when full
  (``reserve``); ``new_cache`` gives every row the shared prefix's keys and values; a prefill sub-batch writes into
  a range of the rows; a step may write each row from its own slot on (``at_slots``: rows holding sequences of
  different lengths); finished rows are dropped (``keep``).
- Precision: on a CPU with ``dtype = bfloat16`` the matrix products, the embedding / head and attention (the
  cached keys and values) run in bfloat16; the residual stream and norms stay in float32 (hooks on transformers'
  modules; ``attention`` is registered with transformers' ``AttentionInterface``). With int8 (``dtype = "int8"``,
  or "auto" on a CPU with VNNI or AMX int8: ``weights.resolve_int8``) the body's linear layers become
  ``Int8Linear``: SmoothQuant-style smoothing calibrated once on a fixed text, inputs quantized per token, weights
  per output channel, ``torch._int_mm``; the embedding / head and attention as "auto" has them.

``body_flop`` and ``row_flop`` give the arithmetic of one token through the body's matrix products and of one head
row (attention aside), for the decoder's compute accounting.
"""

import threading
from typing import Optional

import torch  # (this module is imported only when the engine loads)
from transformers.cache_utils import Cache

from .vocab import vocab_of
from .weights import int8_kernel, load_causal_lm, resolve_device, resolve_dtype, resolve_int8


class SlotCache(Cache):
    """Keys and values in preallocated slots, (rows, kv heads, capacity, head dim) per layer, filled up to ``length``
    for every row alike (a shorter row's extra slots are masked by the caller), and each slot's token position
    (rows, capacity): rows are right-padded, so a slot's index is not its position. Appending writes in place (a
    ``DynamicCache`` concatenates: a copy of the whole cache per token); ``rows`` views a range of rows (a prefill
    sub-batch writes into the round's cache); ``keep`` drops finished rows."""

    def __init__(self, keys, values, positions, length: int = 0, view: bool = False):
        super().__init__()
        self.keys, self.values, self.positions, self.length = keys, values, positions, length
        self.view = view  # rows of another cache (``rows``): written in place, so it cannot grow
        self.slots = None  # each row's first slot in the next step (``at_slots``), or None: all at ``length``
        self.index = None

    def at_slots(self, slots, tokens: int = 1) -> None:
        """The next step writes each row's ``tokens`` new tokens from its own slot on (``slots``, a long tensor),
        not from ``length``, and attends over the slots up to the last written: rows side by side may hold sequences
        of different lengths (a row refilled with a new sequence mid-round; a question placed right after its row's
        own demonstrations)."""
        self.slots = slots
        self.length = int(slots.max()) if len(slots) else 0  # (the step attends over length + tokens slots)
        self.reserve(self.length + tokens)
        rows = torch.arange(len(slots), device=slots.device)[:, None]
        self.index = (rows, slots[:, None] + torch.arange(tokens, device=slots.device))  # (rows, tokens) slots

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.slots is not None:  # each row from its own slot on (``at_slots``)
            keys, values = self.keys[layer_idx], self.values[layer_idx]
            rows, at = self.index
            keys[rows, :, at] = key_states.transpose(1, 2).to(keys.dtype)
            values[rows, :, at] = value_states.transpose(1, 2).to(values.dtype)
            n = self.length + key_states.shape[-2]
            if layer_idx == len(self.keys) - 1:
                self.length = n
            return keys[:, :, :n], values[:, :, :n]
        n, t = self.length, key_states.shape[-2]
        self.keys[layer_idx][:, :, n : n + t] = key_states
        self.values[layer_idx][:, :, n : n + t] = value_states
        if layer_idx == len(self.keys) - 1:
            self.length += t
        return self.keys[layer_idx][:, :, : n + t], self.values[layer_idx][:, :, : n + t]

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return self.length

    def get_max_cache_shape(self) -> Optional[int]:
        return None

    def reserve(self, slots: int) -> None:
        """At least ``slots`` slots per row: when the cache is full, its slots are copied into larger tensors with
        GROW more free slots (a round starts with a few free slots, not its longest possible answer)."""
        have = self.positions.shape[1]
        if slots <= have:
            return
        if self.view:
            raise RuntimeError(f"torch engine: {slots} slots needed in a view of {have} (a decoder bug)")
        more = slots - have + GROW

        def grow(t):
            pad = torch.zeros((*t.shape[:-2], more, t.shape[-1]), dtype=t.dtype, device=t.device)
            return torch.cat([t, pad], dim=-2)

        self.keys = [grow(k) for k in self.keys]
        self.values = [grow(v) for v in self.values]
        self.positions = grow(self.positions[..., None])[..., 0]

    def put(self, rows, other: "SlotCache", slots: int) -> None:
        """The first ``slots`` slots of every row of ``other`` written into ``rows`` (a long tensor) of this cache,
        grown if it has fewer: new sequences taking finished rows' places."""
        self.reserve(slots)
        for dst, src in zip(self.keys + self.values, other.keys + other.values):
            dst[rows, :, :slots] = src[:, :, :slots]
        self.positions[rows, :slots] = other.positions[:, :slots]

    def rows(self, start: int, stop: int) -> "SlotCache":
        return SlotCache(
            [k[start:stop] for k in self.keys],
            [v[start:stop] for v in self.values],
            self.positions[start:stop],
            self.length,
            view=True,
        )

    def keep(self, rows) -> None:
        self.slots = None
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.positions = self.positions[rows]


# free slots a cache gains when it grows (``SlotCache.reserve``), and that a new round's cache starts with
GROW = 32

ATTENTION = "spacy_llmner_sdpa"


def register_attention() -> str:
    """Registers ``attention`` with transformers (its ``AttentionInterface``, with sdpa's masks) under ATTENTION."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention without its copies: the key/value heads are shared by their query heads inside
    the kernel (``enable_gqa``) instead of repeated, and the cache's slots are read in place instead of made
    contiguous; transformers' version copies the whole cache (times the query heads per key head) at every layer
    and every generated token."""
    import torch

    if kwargs.get("softcap") or kwargs.get("head_mask") is not None:
        raise ValueError("torch engine: attention logit soft-capping and head masks are not supported")
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    rows, heads, new, dim = query.shape
    grouped = heads // key.shape[1]  # query heads per key/value head
    if new == 1 and grouped > 1:
        # Decoding (one new token per row): the query heads sharing a key/value head become that head's query rows,
        # (rows, kv heads, grouped, dim), under the row's one mask: on a CPU PyTorch's kernel computes this far
        # faster than one query row per query head with enable_gqa (docs/speed.md).
        query = query.reshape(rows, key.shape[1], grouped, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.to(key.dtype),  # the cache's dtype: bfloat16 slots on a CPU with bfloat16 products
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=new > 1 and attention_mask is None,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.reshape(rows, heads, new, dim).to(query.dtype).transpose(1, 2).contiguous(), None


class TorchModel:
    def __init__(
        self,
        path: str,
        lora: Optional[str] = None,
        dtype: str = "auto",
        n_threads: Optional[int] = None,
        device: str = "cpu",
    ):
        import torch

        if n_threads:
            torch.set_num_threads(n_threads)
        self.torch = torch
        self.device = resolve_device(device)
        # int8: the body's matrix products in int8 (CPU only), everything else as "auto" has it
        self.int8 = resolve_int8(dtype, self.device)
        self.dtype = resolve_dtype("auto" if self.int8 else dtype, self.device)
        # on a CPU the residual stream, norms and attention stay in float32 and only the matrix products (and the
        # embedding, which is also the head) run in bfloat16; on a GPU the whole model runs in ``dtype``
        mixed = self.device == "cpu" and self.dtype != torch.float32
        # float32 on a CPU: the embedding / head's rows are dequantized when first used (weights.LazyRows)
        self.lm = load_causal_lm(
            path,
            lora,
            torch.float32 if mixed or self.int8 else self.dtype,
            self.device,
            attention=register_attention(),
            lazy_embedding=not mixed,
        )
        self.rows = self.lm.lazy_rows
        self.body = self.lm.get_decoder()
        linear = [m for m in self.body.modules() if isinstance(m, torch.nn.Linear)]
        self.body_flop = 2 * sum(m.weight.numel() for m in linear)
        if mixed:  # (int8 layers, made below, take and give float32 themselves)
            floats = [] if self.int8 else linear
            for module in floats + [self.lm.get_input_embeddings(), self.lm.get_output_embeddings()]:
                products_in(module, self.dtype)
        self.kv_dtype = self.dtype  # keys and values are stored (and attended over) in dtype
        self.head = self.lm.get_output_embeddings().weight  # (n_vocab, n_embd)
        self.n_vocab = self.head.shape[0]
        config = self.lm.config.to_dict()
        self.softcap = config.get("final_logit_softcapping")
        self.n_layer = config["num_hidden_layers"]
        self.kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        # sliding-window layers: some of them, named by layer type (Gemma 3's five in six; Qwen 2 where enabled), or
        # every layer where the config sets a window without layer types (Mistral)
        types = config.get("layer_types")
        self.by_type = bool(types)
        window = config.get("sliding_window")
        self.sliding_window = window if window and (not types or "sliding_attention" in types) else None
        self.row_flop = 2 * self.head.shape[1]
        if self.int8:  # calibrated on a fixed text, through the float body
            ids = vocab_of(path).tokenize(CALIBRATION_TEXT)
            int8_products(
                self.body,
                lambda: self.forward([ids], [list(range(len(ids)))], self.new_cache(1, len(ids))),
                int8_kernel(),
            )

    def tensor(self, array, dtype=None):
        return self.torch.as_tensor(array, dtype=dtype, device=self.device)

    def new_cache(self, rows: int, capacity: int, prefix=None):
        """An empty ``SlotCache`` of ``rows`` × ``capacity`` slots; with ``prefix`` (a one-row cache) every row
        starts with its filled slots."""
        torch = self.torch
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        make = lambda: [  # noqa: E731
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.n_layer)
        ]
        cache = SlotCache(make(), make(), torch.zeros((rows, capacity), dtype=torch.long, device=self.device), 0)
        if prefix is not None and prefix.length:
            n = cache.length = prefix.length
            for dst, src in zip(cache.keys + cache.values, prefix.keys + prefix.values):
                dst[:, :, :n] = src[:1, :, :n]
            cache.positions[:, :n] = prefix.positions[:1, :n]
        return cache

    def forward(self, ids, positions, cache, mask=None):
        """Float32 hidden states (B, T, n_embd) after the final norm for token ids (B, T) at ``positions`` (B, T);
        ``mask`` (B, cached + T): 1 where a slot holds a real token. Keys and values are written into ``cache``."""
        torch = self.torch
        ids, positions = self.tensor(ids, torch.long), self.tensor(positions, torch.long)
        if cache.slots is not None:  # (each row from its own slot on)
            cache.positions[cache.index] = positions
        else:
            cache.reserve(cache.length + positions.shape[1])
            cache.positions[:, cache.length : cache.length + positions.shape[1]] = positions  # the slots written below
        return self.body(
            input_ids=ids,
            position_ids=positions,
            attention_mask=self.attention_masks(positions, cache, mask),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state.float()

    def attention_masks(self, positions, cache: SlotCache, mask=None):
        """The 4-D additive masks (B, 1, T, cached + T) of new tokens at ``positions`` (already recorded in the cache's
        positions) over the cache's slots, by token position: a query sees the real slots at or before its
        position, and a sliding-window layer only those within its window. transformers builds its masks from slot
        indices (``cache_position``), which equal positions only without padding: a short row decoded beside a
        longer one would see its window cut short. A dict by layer type for models that name their layers' types
        (Gemma 3, Qwen 2)."""
        torch = self.torch
        keys = cache.positions[:, : cache.length + positions.shape[1]]
        seen = keys[:, None, :] <= positions[:, :, None]  # (B, T, slots)
        if mask is not None:
            seen &= self.tensor(mask, torch.bool)[:, None, : keys.shape[1]]
        if not self.sliding_window:
            return self.additive(seen[:, None])
        window = self.additive((seen & (keys[:, None, :] > positions[:, :, None] - self.sliding_window))[:, None])
        return {"full_attention": self.additive(seen[:, None]), "sliding_attention": window} if self.by_type else window

    def additive(self, seen):
        """A boolean mask as the additive one PyTorch's attention kernels take (0 where seen, -inf elsewhere) in the
        cached keys' dtype, made once per forward for all layers: given a boolean mask, the CPU kernel converts it at
        every layer (docs/speed.md)."""
        torch = self.torch
        return torch.zeros(seen.shape, dtype=self.kv_dtype, device=self.device).masked_fill_(~seen, float("-inf"))

    def head_rows(self, ids):
        """The output head's rows for token ids: a restricted head for ``logits``."""
        if self.rows is not None:
            self.rows.ensure(ids)
        return self.head[self.tensor(ids, self.torch.long)]

    def logits(self, hidden, weight=None):
        """Float32 logits for hidden states (N, n_embd): every vocabulary entry, or the rows of ``weight``."""
        torch = self.torch
        if weight is None and self.rows is not None:
            self.rows.ensure_all()
        out = torch.nn.functional.linear(hidden.to(self.dtype), self.head if weight is None else weight).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def products_in(module, dtype) -> None:
    """The module's weights in ``dtype``, its floating inputs cast to it and its output back to float32."""
    import torch

    module.to(dtype)
    module.register_forward_pre_hook(
        lambda m, args: tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    )
    module.register_forward_hook(lambda m, args, out: out.float())


# The text the int8 products are calibrated on (each input channel's largest magnitude, for smoothing): fixed, so that
# every process quantizes alike; an instruction, entity types, demonstrations and answers as the engine's prompts
# have them.
CALIBRATION_TEXT = (
    "Find the named entities in each sentence and give the type of each one.\n"
    "Entity types:\n- person\n- organisation\n- location\n- misc\n\n"
    "Sentence: In 1998 the Labour Party under Tony Blair won the election in Scotland.\n"
    "Entities:\nLabour Party | organisation\nTony Blair | person\nScotland | location\n\n"
    "Sentence: The researchers at Stanford University trained a convolutional neural network on ImageNet.\n"
    "Entities:\nStanford University | organisation\nconvolutional neural network | misc\nImageNet | misc\n"
)
# SmoothQuant's migration strength: activation outliers are divided by scale^alpha, weights multiplied by it
SMOOTHING = 0.5
# The AVX2 kernel's operands (Int8Linear): input bytes shifted to unsigned by this zero point, weights of 7 bits
AVX2_ZERO_POINT, AVX2_WEIGHT_LEVELS = 128, 63


class Int8Linear(torch.nn.Module):
    """A linear layer whose product runs in int8 (int32 sums): its input divided per channel by ``shared.smooth``
    (SmoothQuant: outlier channels tamed, the weights' columns multiplied by the same factors), then quantized per
    token (row), symmetric, at every call; weights quantized once, symmetric, one scale per output channel.
    ``shared`` quantizes an input once for the layers that read it (attention's q, k, v; the MLP's gate and up).

    Two kernels (``shared.kernel``, ``weights.int8_kernel``): ``"int_mm"`` (``torch._int_mm``: oneDNN where the CPU
    has VNNI or AMX int8) and ``"onednn_avx2"`` (oneDNN's quantized linear, PyTorch's x86 quantization op, for a CPU
    with AVX2 only, where ``torch._int_mm`` has no oneDNN path). The AVX2 kernel multiplies unsigned by signed bytes
    and adds pairs in int16 (``vpmaddubsw``): the input is shifted to unsigned (zero point 128) and the weights keep
    7 bits (±63), so that no pair's sum (2 × 255 × 63) leaves int16 and the int32 sums stay exact."""

    def __init__(self, linear: torch.nn.Linear, shared: "SharedInput"):
        super().__init__()
        weight = linear.weight.detach().float() * shared.smooth
        self.avx2 = shared.kernel == "onednn_avx2"
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / (AVX2_WEIGHT_LEVELS if self.avx2 else 127)
        quantized = torch.round(weight / scale[:, None]).to(torch.int8)
        if self.avx2:  # (oneDNN's own layout: an opaque tensor, kept out of the state dict)
            self.packed = torch.ops.onednn.qlinear_prepack(quantized, None)
            self.register_buffer("zero_points", torch.zeros(len(scale), dtype=torch.int32))
        else:  # (in, out): the layout torch._int_mm's CPU kernel takes fastest for both of the body's shapes
            self.register_buffer("qweight", quantized.t().contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), False)
        self.shared = shared
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        rows, scales = self.shared.quantized(x)
        if self.avx2:
            out = torch.ops.onednn.qlinear_pointwise(
                rows,
                1.0,
                AVX2_ZERO_POINT,
                self.packed,
                self.scale,
                self.zero_points,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            ).mul_(scales)
        else:
            out = torch._int_mm(rows, self.qweight).float().mul_(scales).mul_(self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SharedInput(threading.local):
    """Per-token int8 quantization of the last input seen, by identity: the layers reading one tensor (transformers'
    attention and MLP pass the same tensor to their projections, unchanged in between) quantize it once. Per thread:
    backends sharing the model may run it from several. ``smooth``: each input channel's divisor; ``kernel``: the
    layers' (``Int8Linear``), for which the AVX2 one takes the bytes shifted to unsigned."""

    last = result = None

    def __init__(self, smooth, kernel: str = "int_mm"):
        self.smooth = smooth
        self.kernel = kernel

    def quantized(self, x):
        if x is not self.last:  # (held here, so no other tensor can take its identity)
            flat = x.reshape(-1, x.shape[-1]).float() / self.smooth  # (a new tensor: divided in place below)
            scales = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            rows = flat.div_(scales).round_()
            rows = rows.add_(AVX2_ZERO_POINT).to(torch.uint8) if self.kernel == "onednn_avx2" else rows.to(torch.int8)
            self.result = (rows, scales)
            self.last = x
        return self.result


def int8_products(body, calibrate, kernel: str = "int_mm") -> None:
    """Every ``torch.nn.Linear`` in ``body`` replaced by an ``Int8Linear`` (the float weights freed). ``calibrate``
    runs the body once: each layer's largest input magnitude per channel is recorded, and the layers that read the
    same tensor form a group sharing one quantization, smoothed by SmoothQuant's factors (max |x_j|^a /
    max |w_j|^(1-a), the weights' maximum over the group's layers)."""
    linears = [(module, name, child) for module in body.modules() for name, child in module.named_children()]
    linears = [(module, name, child) for module, name, child in linears if type(child) is torch.nn.Linear]
    seen = {}  # linear → (its input, held so that no other tensor takes its id; per-channel max |x|)

    def record(child, args):
        x = args[0]
        seen[child] = (x, x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float())

    hooks = [child.register_forward_pre_hook(record) for _, _, child in linears]
    try:
        with torch.inference_mode():
            calibrate()
    finally:
        for hook in hooks:
            hook.remove()
    groups = {}
    for module, name, child in linears:
        groups.setdefault(id(seen[child][0]), []).append((module, name, child))
    for members in groups.values():
        act = seen[members[0][2]][1].clamp(min=1e-5)
        wmax = torch.stack([child.weight.detach().float().abs().amax(dim=0) for _, _, child in members]).amax(dim=0)
        smooth = (act.pow(SMOOTHING) / wmax.clamp(min=1e-5).pow(1 - SMOOTHING)).clamp(min=1e-5)
        shared = SharedInput(smooth, kernel)
        for module, name, child in members:
            setattr(module, name, Int8Linear(child, shared))
