"""Gemma 3 in PyTorch, read from the same GGUF file llama.cpp runs: the body of the model for ``torch_decoder``.

Why a second implementation: on a CPU the matrix products of a batch of sequences run several times nearer the
machine's peak in PyTorch (oneDNN; bfloat16 on AVX-512/AMX) than in llama.cpp's quantized kernels, and the output
head (262,144 × 640, two thirds of a generated token's arithmetic) can be applied to a few rows only
(``head_rows``) instead of the whole vocabulary. The weights are the GGUF's, dequantized (gguf-py), with a GGUF
LoRA adapter merged in (W + B·A, the scale folded into B as ``finetune.export`` writes it, or alpha / rank).

Architecture (Gemma 3 text): embeddings scaled by √d; per layer RMSNorm → attention with q/k RMSNorm, rotary
positions (θ = 10⁴ on sliding-window layers, 10⁶ on every sixth, global, layer), one shared key/value head,
window 512 → RMSNorm; residual; RMSNorm → GELU-tanh gated MLP → RMSNorm; residual; final RMSNorm. llama.cpp's
converter stores Gemma's RMSNorm weights as 1 + w, which is the multiplier applied here. The residual stream and
norms stay in float32; matrix products run in ``dtype``. torch and gguf are imported on first use only.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

_LAYER = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "attn_norm": "ln_attn",
    "post_attention_norm": "ln_post_attn",
    "ffn_norm": "ln_ffn",
    "post_ffw_norm": "ln_post_ffn",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
}


@dataclass(frozen=True)
class GemmaShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    window: int
    swa_period: int  # every swa_period-th layer attends globally
    eps: float
    theta_global: float
    theta_local: float
    n_vocab: int

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.swa_period == 0


# ---- reading GGUF ------------------------------------------------------------------------------------------------
# gguf-py's GGUFReader decodes every metadata value up front (Gemma's 262k-entry vocabulary: ~30 s); this reads the
# scalars, skips the arrays and maps the tensors, and leaves the dequantizing to gguf-py.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_tensors(path: str):
    """({metadata key: scalar or string; arrays as their length}, {tensor name: float32 array (rows, cols)})."""
    import struct

    import gguf

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    at = 0

    def read(fmt):
        nonlocal at
        (value,) = struct.unpack_from(fmt, mv, at)
        at += struct.calcsize(fmt)
        return value

    def read_str():
        nonlocal at
        n = read("<Q")
        at += n
        return bytes(mv[at - n : at]).decode("utf8", errors="replace")

    def skip(vtype):
        nonlocal at
        if vtype == 8:
            n = read("<Q")
            at += n
        elif vtype == 9:
            itype, n = read("<I"), read("<Q")
            if itype in _SCALARS:
                at += n * struct.calcsize(_SCALARS[itype])
            else:
                for _ in range(n):
                    skip(itype)
        else:
            at += struct.calcsize(_SCALARS[vtype])

    if bytes(mv[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    at = 4
    read("<I")  # version
    n_tensors, n_kv = read("<Q"), read("<Q")
    meta = {}
    for _ in range(n_kv):
        key, vtype = read_str(), read("<I")
        if vtype == 8:
            meta[key] = read_str()
        elif vtype == 9:
            mark = at
            read("<I")
            meta[key] = read("<Q")
            at = mark
            skip(9)
        else:
            meta[key] = read(_SCALARS[vtype])
    infos = []
    for _ in range(n_tensors):
        name = read_str()
        dims = [read("<Q") for _ in range(read("<I"))]
        infos.append((name, dims, read("<I"), read("<Q")))
    align = int(meta.get("general.alignment", 32))
    base = (at + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n_rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        row_bytes = dims[0] // block * size
        raw = buf[base + offset : base + offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
        if qtype == gguf.GGMLQuantizationType.F32:
            data = raw.view(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = raw.view(np.float16).astype(np.float32)
        else:
            data = gguf.quants.dequantize(np.asarray(raw), qtype).astype(np.float32, copy=False)
        tensors[name] = data.reshape(dims[::-1]) if len(dims) > 1 else data.reshape(-1)
    return meta, tensors


def read_gguf(path: str, lora: Optional[str] = None):
    """(GemmaShape, {gguf tensor name: float32 array}) with a LoRA adapter's updates merged in."""
    meta, weights = gguf_tensors(path)
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"the torch decoder runs Gemma 3 GGUF files; {path} is {arch!r}")
    n_embd = int(meta["gemma3.embedding_length"])
    n_head = int(meta["gemma3.attention.head_count"])
    shape = GemmaShape(
        n_layer=int(meta["gemma3.block_count"]),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(meta["gemma3.attention.head_count_kv"]),
        head_dim=int(meta.get("gemma3.attention.key_length", n_embd // n_head)),
        window=int(meta.get("gemma3.attention.sliding_window", 512)),
        swa_period=6,
        eps=float(meta.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        theta_global=float(meta.get("gemma3.rope.freq_base", 1e6)),
        theta_local=10000.0,
        n_vocab=weights["token_embd.weight"].shape[0],
    )
    if lora:
        merge_lora(weights, lora)
    return shape, weights


def merge_lora(weights: Dict[str, np.ndarray], lora: str) -> None:
    """Adds a GGUF LoRA adapter's B·A (times alpha / rank) to the weights it names, in place."""
    meta, parts = gguf_tensors(lora)
    if meta.get("general.type") != "adapter":
        raise ValueError(f"{lora} is not a GGUF LoRA adapter (general.type != adapter)")
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    for name in sorted(n[: -len(".lora_a")] for n in parts if n.endswith(".lora_a")):
        a, b = parts[name + ".lora_a"], parts[name + ".lora_b"]  # (r, in), (out, r)
        if name not in weights:
            raise ValueError(f"LoRA adapter {lora} names {name}, which the model lacks")
        scale = alpha / a.shape[0] if alpha else 1.0
        weights[name] = weights[name] + scale * (b @ a)


class GemmaTorch:
    """The model's weights as torch tensors and its forward pass over a ``KVCache``."""

    def __init__(self, path: str, lora: Optional[str] = None, dtype: str = "auto", n_threads: Optional[int] = None):
        import torch

        if n_threads:
            torch.set_num_threads(n_threads)
        self.torch = torch
        self.dtype = resolve_dtype(dtype)
        shape, w = read_gguf(path, lora)
        self.shape = shape
        mm = lambda a: torch.from_numpy(a).to(self.dtype).contiguous()  # noqa: E731
        f32 = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
        self.embed = mm(w.pop("token_embd.weight"))  # (n_vocab, n_embd): input embeddings and the output head
        self.out_norm = f32(w.pop("output_norm.weight"))
        self.layers: List[Dict[str, object]] = []
        for i in range(shape.n_layer):
            layer = {}
            for gname, key in _LAYER.items():
                a = w.pop(f"blk.{i}.{gname}.weight")
                layer[key] = f32(a) if a.ndim == 1 else mm(a)
            # gate and up read the same input: one product instead of two
            layer["gate_up"] = torch.cat([layer.pop("gate"), layer.pop("up")]).contiguous()
            self.layers.append(layer)
        hd = shape.head_dim
        # arithmetic per token through the body (matrix products, attention aside) and per output-head row
        self.body_flop = 2 * sum(t.numel() for L in self.layers for t in L.values() if t.dim() == 2)
        self.row_flop = 2 * shape.n_embd
        self.inv_freq = {
            g: 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            for g, theta in ((True, shape.theta_global), (False, shape.theta_local))
        }

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _norm(self, x, weight):
        return self.torch.nn.functional.rms_norm(x.float(), weight.shape, weight, self.shape.eps)

    def _rotation(self, pos, is_global):
        """cos and sin of the rotary angles at positions pos (B, T): (B, 1, T, head_dim / 2) each."""
        freqs = pos.float()[..., None] * self.inv_freq[is_global]
        return freqs.cos()[:, None], freqs.sin()[:, None]

    def _rope(self, x, rotation):
        """Rotary positions, rotate-half layout; x (B, heads, T, head_dim)."""
        cos, sin = rotation
        x1, x2 = x.chunk(2, dim=-1)
        return self.torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def embed_tokens(self, ids):
        return self.embed[ids].float() * math.sqrt(self.shape.n_embd)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, ids, start, cache: "KVCache", row0: int = 0):
        """Hidden states after the final norm, float32 (B, T, n_embd), for tokens ``ids`` (B, T) of the cache's
        rows row0..row0+B-1 at positions start[b] + t; their keys and values are written into the cache first.
        Rows shorter than T are right-padded: a padding token sits after every real one, so no real token sees
        it."""
        torch = self.torch
        F = torch.nn.functional
        s = self.shape
        B, T = ids.shape
        pos = start[:, None] + torch.arange(T)[None, :]  # (B, T)
        n_keys = int(pos.max()) + 1
        key_pos = torch.arange(n_keys)
        dist = pos[:, :, None] - key_pos[None, None, :]  # (B, T, K): query position - key position
        causal = dist >= 0
        masks = {True: causal[:, None], False: (causal & (dist < s.window))[:, None]}
        rows = torch.arange(row0, row0 + B)[:, None]
        rotations = {g: self._rotation(pos, g) for g in (True, False)}
        x = self.embed_tokens(ids)
        for i, L in enumerate(self.layers):
            g = s.is_global(i)
            h = self._norm(x, L["ln_attn"]).to(self.dtype)
            q = F.linear(h, L["q"]).view(B, T, s.n_head, s.head_dim).transpose(1, 2)
            k = F.linear(h, L["k"]).view(B, T, s.n_head_kv, s.head_dim).transpose(1, 2)
            v = F.linear(h, L["v"]).view(B, T, s.n_head_kv, s.head_dim).transpose(1, 2)
            q = self._rope(self._norm(q, L["q_norm"]), rotations[g]).to(self.dtype)
            k = self._rope(self._norm(k, L["k_norm"]), rotations[g]).to(self.dtype)
            cache.k[i][rows, pos] = k[:, 0]  # one key/value head
            cache.v[i][rows, pos] = v[:, 0]
            keys = cache.k[i][row0 : row0 + B, :n_keys][:, None]
            vals = cache.v[i][row0 : row0 + B, :n_keys][:, None]
            a = F.scaled_dot_product_attention(q, keys, vals, attn_mask=masks[g], enable_gqa=True)
            a = F.linear(a.transpose(1, 2).reshape(B, T, s.n_head * s.head_dim), L["o"])
            x = x + self._norm(a, L["ln_post_attn"])
            h = self._norm(x, L["ln_ffn"]).to(self.dtype)
            gate, up = F.linear(h, L["gate_up"]).chunk(2, dim=-1)
            m = F.linear(F.gelu(gate, approximate="tanh") * up, L["down"])
            x = x + self._norm(m, L["ln_post_ffn"])
        return self._norm(x, self.out_norm)

    def head_rows(self, ids):
        """The output head's rows for token ids (a LongTensor): a restricted head for ``logits``."""
        return self.embed[ids]

    def logits(self, hidden, weight=None):
        """Output logits float32 for hidden states (N, n_embd): every vocabulary entry, or the rows of ``weight``
        (from ``head_rows``)."""
        return self.torch.nn.functional.linear(hidden.to(self.dtype), self.embed if weight is None else weight).float()


class KVCache:
    """Keys and values per layer: (rows, positions, head_dim) each, in the model's dtype."""

    def __init__(self, model: GemmaTorch, rows: int, length: int):
        torch = model.torch
        s = model.shape
        self.k = [torch.zeros(rows, length, s.head_dim, dtype=model.dtype) for _ in range(s.n_layer)]
        self.v = [torch.zeros(rows, length, s.head_dim, dtype=model.dtype) for _ in range(s.n_layer)]

    def keep(self, rows) -> None:
        """Keep only the given rows (a LongTensor), in that order."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]

    def fill_prefix(self, prefix: "KVCache", n: int) -> None:
        """Every row starts with the first n positions of ``prefix``'s row 0."""
        for dst, src in zip(self.k + self.v, prefix.k + prefix.v):
            dst[:, :n] = src[0, :n]


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(dtype: str):
    """ "auto": bfloat16 where the CPU multiplies it natively (AVX-512 BF16 or AMX), float32 elsewhere."""
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if {"avx512_bf16", "amx_bf16"} & _cpu_flags() else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"torch decoder: dtype must be 'auto', 'bfloat16' or 'float32', not {dtype!r}")
    return getattr(torch, dtype)
