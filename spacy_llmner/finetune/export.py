"""Writes a tuned model back to GGUF for the llama.cpp backend.

The base GGUF is copied field by field (architecture, hyper-parameters, tokenizer, chat template) and tensor by
tensor; only the tensors tuning changed (the LoRA-merged linear layers) are replaced, re-laid out the way
llama.cpp's converter lays them out (Llama-family q/k rows are permuted for its RoPE) and stored as Q8_0 (or F16 /
F32). Everything else keeps its original bytes and quantization (the embedding stays Q4/Q6 as shipped), so the file
is about the base size plus the re-stored layers. ``q4_k_m`` then re-quantizes the whole file with llama.cpp's own
quantizer (``llama_model_quantize``, as shipped in llama-cpp-python): the base model's size and speed.
"""

from pathlib import Path
from typing import Dict, Optional

import numpy as np

OUT_TYPES = ("q8_0", "f16", "f32", "q4_k_m")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf's LlamaModel.permute (the inverse of transformers' reverse_permute_weights)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(arch: str, n_blocks: int, hf_names) -> Dict[str, str]:
    """HF parameter name → GGUF tensor name, through gguf-py's own tensor map."""
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise ValueError(f"finetune export: unknown GGUF architecture {arch!r}")
    table = gguf.get_tensor_name_map(archs[arch], n_blocks)
    out = {}
    for name in hf_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"finetune export: no GGUF tensor for {name!r} in architecture {arch!r}")
        out[name] = mapped
    return out


def export_gguf(
    base_path: str,
    changed: Dict[str, np.ndarray],
    out_path: str,
    out_type: str = "q8_0",
    name_suffix: str = "ner-tuned",
) -> Path:
    """``changed``: HF parameter name → new float weight (transformers' layout). Returns the written path."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ValueError(f"finetune export: out_type must be one of {OUT_TYPES}, not {out_type!r}")
    if out_type == "q4_k_m":
        staged = Path(str(out_path) + ".q8_0.tmp")
        export_gguf(base_path, changed, str(staged), "q8_0", name_suffix)
        try:
            return quantize(staged, out_path, "q4_k_m")
        finally:
            staged.unlink(missing_ok=True)
    reader = gguf.GGUFReader(base_path)
    arch = reader.fields["general.architecture"].contents()
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_head_kv = int(kv.contents()) if kv is not None else n_head
    names = gguf_names(arch, n_blocks, changed)
    new: Dict[str, tuple] = {}
    for hf_name, weight in changed.items():
        w = np.asarray(weight, dtype=np.float32)
        gname = names[hf_name]
        if arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            w = permute_qk(w, n_head if gname.endswith("attn_q.weight") else n_head_kv)
        if out_type == "q8_0" and w.shape[-1] % 32 == 0:
            new[gname] = (gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        elif out_type == "f32":
            new[gname] = (w, gguf.GGMLQuantizationType.F32)
        else:
            new[gname] = (w.astype(np.float16), gguf.GGMLQuantizationType.F16)
    present = {t.name for t in reader.tensors}
    missing = sorted(set(new) - present)
    if missing:
        raise ValueError(f"finetune export: the base model has no tensors {missing[:5]}")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf.Keys.General.NAME:
            value = f"{value} ({name_suffix})"
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data, qtype = new.get(t.name, (t.data, t.tensor_type))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(new[t.name][0] if t.name in new else t.data, tensor_endianess=reader.endianess)
    writer.close()
    return out_path


def merged_weights(peft_model) -> Dict[str, np.ndarray]:
    """Merges the LoRA adapters into their base layers; returns the changed weights by HF parameter name."""
    from peft.tuners.lora import LoraLayer

    tuned = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    merged = peft_model.merge_and_unload()
    prefix = "base_model.model."
    out = {}
    state = merged.state_dict()
    for module in tuned:
        key = (module[len(prefix) :] if module.startswith(prefix) else module) + ".weight"
        out[key] = state[key].detach().float().cpu().numpy()
    return out


def quantize(src, dst, ftype: str = "q4_k_m", threads: int = 0) -> Path:
    """Re-quantizes a GGUF with llama.cpp's quantizer (every tensor, already quantized ones included)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.allow_requantize = True
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"finetune export: llama.cpp could not quantize {src} to {ftype}")
    return Path(dst)


def lora_pairs(adapter_dir) -> Dict[str, tuple]:
    """A peft LoRA folder (``adapter_model.safetensors`` + ``adapter_config.json``) → HF weight name → (A, B) with
    the LoRA scale ``alpha / r`` folded into B (so ``W + B @ A`` is the tuned weight)."""
    import json

    from safetensors.numpy import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError("finetune export: DoRA / rsLoRA adapters are not supported")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: Dict[str, list] = {}
    for key, value in tensors.items():
        stem, _, kind = key.rpartition(".lora_")
        name = stem.removeprefix("base_model.model.") + ".weight"
        pairs.setdefault(name, [None, None])["AB".index(kind[0])] = value.astype(np.float32)
    out = {}
    for name, (a, b) in pairs.items():
        if a is None or b is None:
            raise ValueError(f"finetune export: {name} lacks lora_A or lora_B")
        out[name] = (a, b * scale)
    return out


def truncate(a: np.ndarray, b: np.ndarray, rank: int):
    """The best rank-``rank`` factors of ``b @ a`` (SVD, singular values split evenly) and the share of the
    update's squared Frobenius norm that is dropped."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    root = np.sqrt(s[:rank])
    new_b = (qb @ u[:, :rank]) * root
    new_a = (root[:, None] * vt[:rank]) @ qa.T
    return new_a, new_b, float((s[rank:] ** 2).sum() / max((s**2).sum(), 1e-30))


def export_lora_gguf(adapter_dir, base_path: str, out_path, rank: Optional[int] = None, a_type: str = "q8_0") -> Dict:
    """Writes a peft LoRA as a GGUF adapter that llama.cpp applies at load (``Llama(lora_path=...)``): per tuned
    weight ``<gguf name>.lora_a`` (r × in) and ``.lora_b`` (out × r), ``general.type = adapter``,
    ``adapter.lora.alpha = r`` (the scale is folded into B). ``rank`` below the trained rank keeps the best
    rank-``rank`` approximation of each update (SVD). A is stored as Q8_0 (``a_type``) or F16; B as F16 (its rows,
    r long, are shorter than a Q8_0 block). Returns sizes and the truncation's worst dropped share."""
    import gguf

    if a_type not in ("q8_0", "f16"):
        raise ValueError(f"finetune export: a_type must be q8_0 or f16, not {a_type!r}")
    reader = gguf.GGUFReader(base_path)
    arch = str(reader.fields["general.architecture"].contents())
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    pairs = lora_pairs(adapter_dir)
    names = gguf_names(arch, n_blocks, pairs)
    present = {t.name for t in reader.tensors}
    writer = gguf.GGUFWriter(str(out_path), arch=arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    worst, ranks = 0.0, set()
    tensors = []
    for hf_name in sorted(pairs):
        a, b = pairs[hf_name]
        if rank is not None and rank < a.shape[0]:
            a, b, dropped = truncate(a, b, rank)
            worst = max(worst, dropped)
        ranks.add(a.shape[0])
        gname = names[hf_name]
        if gname not in present:
            raise ValueError(f"finetune export: the base model has no tensor {gname}")
        if arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            raise ValueError("finetune export: q/k LoRA of llama-architecture models needs a row permutation")
        tensors.append((gname, a, b))
    if len(ranks) != 1:
        raise ValueError(f"finetune export: adapters of mixed ranks {sorted(ranks)}")
    writer.add_float32("adapter.lora.alpha", float(ranks.pop()))
    for gname, a, b in tensors:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a_type == "q8_0":
            writer.add_tensor(
                gname + ".lora_a",
                gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(gname + ".lora_a", a.astype(np.float16))
        writer.add_tensor(gname + ".lora_b", np.ascontiguousarray(b, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(out_path), "bytes": Path(out_path).stat().st_size, "worst_dropped_share": round(worst, 5)}
