"""The package's one weight loader: a GGUF file (or a transformers folder of safetensors) into a transformers causal
LM, with a LoRA adapter (GGUF or peft) applied through peft. The fast engine, ``finetune`` and the adapter scripts
all load through here.

- **Model code is transformers'.** The architecture comes from the GGUF's metadata, mapped onto a transformers
  config with transformers' own GGUF tables (``GGUF_TO_TRANSFORMERS_MAPPING``); every architecture those tables know
  (Gemma 2/3, Llama/SmolLM2, Qwen2, Phi-3, ...) loads. Tensor names come from gguf-py's name map and each tensor
  goes through transformers' per-architecture ``TENSOR_PROCESSORS`` (Gemma's 1 + w norms, Llama's q/k row order).
- **Reading is ours only where transformers is slow.** ``GGUFReader`` decodes every metadata array up front (Gemma
  3's 262,144-entry vocabulary: seconds); ``read_gguf`` takes the header ``gguf_check`` has read and checked (the
  arrays skipped, their places kept), reads only the arrays asked for, and leaves dequantizing to gguf-py.
- **One LoRA path.** A GGUF LoRA adapter (llama.cpp's format, as shipped) is turned into a peft ``LoraConfig`` and
  state dict (``gguf_lora_to_peft``); a peft folder is read by peft. Either is merged by peft (``merge_and_unload``)
  for inference, or written as a peft folder (``write_peft_adapter``) that vLLM serves with ``--enable-lora``.

torch, transformers, peft and gguf are imported on first use only.
"""

import json
import mmap
import os
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .gguf_check import read_array, read_header


def read_gguf(
    path: str, tensors: bool = True, arrays: Sequence[str] = (), lazy: Sequence[str] = ()
) -> Tuple[Dict[str, object], Dict[str, np.ndarray]]:
    """({metadata key: scalar or string; arrays as their length, except the keys in ``arrays``, read whole as a
    list}, {tensor name: float32 array in GGUF's row-major layout (rows, cols)}); ``tensors = False`` returns
    names → shapes only, nothing dequantized. The quantized matrices named in ``lazy`` come as ``LazyRows``
    (dequantized row by row when used). The header is ``gguf_check.read_header``'s (checked, cached); gguf-py
    dequantizes."""
    import gguf

    info = read_header(path)
    meta: Dict[str, object] = dict(info.metadata)
    for key in arrays:
        if key in info.arrays:
            meta[key] = read_array(info, key)
    if not tensors:
        return meta, {name: tuple(dims[::-1]) for name, dims in info.tensors.items()}
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, dims in info.tensors.items():
        qtype = gguf.GGMLQuantizationType(info.tensor_types[name])
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n_rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        row_bytes = dims[0] // block * size
        at = info.data_start + info.offsets[name]
        raw = buf[at : at + n_rows * row_bytes].reshape(n_rows, row_bytes)
        if qtype == gguf.GGMLQuantizationType.F32:
            data = raw.view(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = empty_float32(raw.shape[:1] + (row_bytes // 2,))
            data[...] = raw.view(np.float16)
        elif name in lazy and len(dims) == 2 and vars(gguf.quants).get(qtype.name) is not None:
            out[name] = LazyRows(raw, qtype, dims[::-1])
            continue
        else:
            data = dequantize(raw, qtype)
        out[name] = data.reshape(dims[::-1]) if len(dims) > 1 else data.reshape(-1)
    return meta, out


def empty_float32(shape: Tuple[int, ...]) -> np.ndarray:
    """A float32 array of zeros on ordinary pages. numpy asks the kernel for transparent huge pages for every
    array of 4 MB or more (``madvise``); where the kernel then compacts memory on demand (THP ``defrag = madvise``,
    a common default), first touching a freshly allocated gigabyte of weights can stall for seconds, by how
    fragmented memory is at that moment. An anonymous memory map is never advised, so it costs ordinary page faults
    (``tests/test_torch_engine.py`` checks the contents are gguf-py's)."""
    n = int(np.prod(shape, dtype=np.int64))
    private = {"flags": mmap.MAP_PRIVATE} if os.name == "posix" else {}  # a forked child writes its own copy
    return np.frombuffer(mmap.mmap(-1, max(4 * n, 1), **private), dtype=np.float32, count=n).reshape(shape)


ROWS_PER_CALL = 256
DEQUANTIZE_THREADS = min(4, os.cpu_count() or 1)  # the cores, counted as the backend counts them for n_threads


def dequantize(raw: np.ndarray, qtype, out: Optional[np.ndarray] = None) -> np.ndarray:
    """gguf-py's dequantization of ``raw`` (rows of quantized bytes) to float32 rows (into ``out`` where given).
    ``gguf.quants.dequantize`` hands its numpy code 16 rows at a time, which is Python-bound on a 262,144-row
    embedding (seconds); the same per-type code (``dequantize_rows`` of gguf-py's class for the type) is given
    ``ROWS_PER_CALL`` rows here, with equal results. numpy runs each call on one core and lets go of the GIL inside
    it, so the calls of a large tensor are spread over ``DEQUANTIZE_THREADS`` threads (each writes its own rows of
    the output)."""
    import gguf

    kind = vars(gguf.quants).get(qtype.name)  # gguf-py names its classes after the types (Q8_0, Q4_K, ...)
    if kind is None:
        data = gguf.quants.dequantize(np.asarray(raw), qtype).astype(np.float32, copy=False)
        if out is None:
            return data
        out[...] = data
        return out
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if out is None:
        out = empty_float32((raw.shape[0], raw.shape[1] // size * block))
    kind.init_grid()  # the i-quants' lookup grids (a no-op for the others)

    def rows(at: int) -> None:
        out[at : at + ROWS_PER_CALL] = kind.dequantize_rows(np.asarray(raw[at : at + ROWS_PER_CALL]))

    starts = range(0, raw.shape[0], ROWS_PER_CALL)
    if DEQUANTIZE_THREADS > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(DEQUANTIZE_THREADS, len(starts))) as pool:
            list(pool.map(rows, starts))  # list(): a worker's exception is raised here
    else:
        for at in starts:
            rows(at)
    return out


class LazyRows:
    """A quantized GGUF matrix whose rows are dequantized when first used, into a float32 ``table`` of the full
    shape. The table is an anonymous memory map (``empty_float32``): a page is given memory when first written, so
    rows never used cost nothing, and the values of the rows used are exactly those of dequantizing the whole
    matrix. Gemma 3's embedding, which is also its output head, is 262,144 rows of which a run uses a few thousand:
    671 MB in float32, two thirds of the model's weights, against the 178 MB of its Q8_0 bytes (mapped from the
    file, read only where used). ``ensure`` before reading rows; ``ensure_all`` before using the whole table (the
    decoder's full head, in the rare step where no restricted candidate is allowed; scoring)."""

    def __init__(self, raw: np.ndarray, qtype, shape: Tuple[int, int]):
        self.raw, self.qtype = raw, qtype
        self.table = empty_float32(tuple(shape))
        self.have = np.zeros(shape[0], dtype=bool)
        self.complete = False
        self.lock = threading.Lock()

    def ensure(self, ids) -> None:
        """Dequantizes the rows ``ids`` (any integer array) that are not yet in the table."""
        if self.complete:
            return
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if self.have[ids].all():
            return
        with self.lock:
            missing = np.unique(ids[~self.have[ids]])
            if len(missing):
                self.table[missing] = dequantize(self.raw[missing], self.qtype)
                self.have[missing] = True

    def ensure_all(self) -> None:
        """Dequantizes every row (the rows already there are written again with the same values)."""
        if self.complete:
            return
        with self.lock:
            if not self.complete:
                dequantize(self.raw, self.qtype, out=self.table)
                self.have[:] = True
                self.complete = True
                self.raw = None  # every row is in the table: the file's pages are let go


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# the torch engine's precisions; "int8": the body's matrix products in int8 (a CPU only: torch_model.Int8Linear), the
# rest as "auto" has it
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
DTYPES = ("auto", "int8") + FLOAT_DTYPES


def check_dtype(dtype: str, device: str = "auto") -> None:
    """Refuses a precision the engine does not have, or int8 on a GPU (names only: nothing is imported)."""
    if dtype not in DTYPES:
        raise ValueError(f"torch engine: dtype must be one of {', '.join(map(repr, DTYPES))}, not {dtype!r}")
    if dtype == "int8" and device not in ("auto", "cpu"):
        raise ValueError(
            f"torch engine: dtype 'int8' runs on a CPU only, not on {device!r}: "
            "use dtype 'auto' or 'bfloat16' there, or device 'cpu'"
        )


# CPU flags (as /proc/cpuinfo names them) under which torch._int_mm multiplies through oneDNN's int8 kernels. On a CPU
# with none of them (AVX2 only: AMD Zen 3 and older, Intel before Ice Lake / Alder Lake) it falls back to a scalar
# loop, far slower than float32 (docs/speed.md, "A real AVX2-only CPU"). There "auto" keeps float32 products, and
# "int8" calls oneDNN's quantized linear with 7-bit weights instead (torch_model.Int8Linear): faster than float32,
# but its scores move further from float32's than 8-bit products do.
INT8_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_kernel(cpu_flags: Optional[set] = None) -> str:
    """The int8 kernel for a CPU with these flags (this machine's by default): "onednn_avx2" with AVX2 but neither
    VNNI nor AMX int8, else "int_mm"."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    return "onednn_avx2" if "avx2" in flags and not INT8_CPU_FLAGS & flags else "int_mm"


def resolve_int8(dtype: str, device: str, cpu_flags: Optional[set] = None) -> bool:
    """Whether the body's matrix products run in int8 on the resolved ``device``: asked for, or "auto" on a CPU
    with VNNI or AMX int8 (``INT8_CPU_FLAGS``; F1 and speed against bfloat16: docs/speed.md, "Int8 matrix
    products")."""
    check_dtype(dtype, device)
    if dtype == "auto" and device == "cpu":
        return bool(INT8_CPU_FLAGS & (_cpu_flags() if cpu_flags is None else cpu_flags))
    return dtype == "int8"


def resolve_dtype(dtype: str, device: str = "cpu"):
    """ "auto": bfloat16 on a GPU and where the CPU multiplies it natively (AVX-512 BF16 or AMX) and PyTorch's
    kernels use AVX-512 (not where ``ATEN_CPU_CAPABILITY`` holds them to AVX2: that also measures the engine as on
    an AVX2-only CPU, docs/speed.md), float32 elsewhere (the float precision; whether products run in int8 is
    ``resolve_int8``'s)."""
    import torch

    if dtype == "auto":
        native = device != "cpu" or (
            {"avx512_bf16", "amx_bf16"} & _cpu_flags() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        )
        dtype = "bfloat16" if native else "float32"
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"torch engine: dtype must be 'auto', 'bfloat16', 'float16' or 'float32', not {dtype!r}")
    return getattr(torch, dtype)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?")


def check_device(device: str) -> None:
    """Refuses a device name torch would not take (names only: nothing is imported)."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:<n>', 'mps' or 'xpu', not {device!r}")


def resolve_device(device: str) -> str:
    """ "auto": CUDA where torch sees a GPU, else the CPU. A GPU asked for that torch does not see is an error."""
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device here (a CPU build of torch, or no GPU)")
    return device


def transformers_arch(arch: str) -> Optional[str]:
    """The GGUF architecture's key in transformers' GGUF tables, or None where transformers cannot load it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return arch if arch in GGUF_SUPPORTED_ARCHITECTURES else None


def hf_config(meta: Dict[str, object], shapes: Dict[str, tuple]):
    """A transformers config from a GGUF's metadata, through transformers' GGUF tables."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    arch = str(meta.get("general.architecture"))
    if transformers_arch(arch) is None:
        raise ValueError(f"transformers cannot load GGUF architecture {arch!r}")
    table = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    values: Dict[str, object] = {}
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        renamed = table.get(prefix, {}).get(rest)
        if renamed not in (None, -1) and isinstance(value, (int, float, str)):
            values[renamed] = value
    values["model_type"] = "gemma3_text" if arch == "gemma3" else arch
    values["vocab_size"] = shapes["token_embd.weight"][0]
    values["tie_word_embeddings"] = "output.weight" not in shapes
    values.pop("_model_name_or_path", None)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def _weights_map(model) -> Dict[str, str]:
    """GGUF tensor name → transformers parameter name, by transformers' ``get_gguf_hf_weights_map``. That function
    visits every submodule (~600 for Gemma 3 270M) and asks gguf-py for its name map at each one, which gguf-py
    rebuilds from thousands of patterns every time (3 s per call here); the map depends only on (architecture,
    layers), so gguf-py's constructor is memoised for the duration of the call."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(original)  # transformers imports it from gguf at each call
    try:
        return get_gguf_hf_weights_map(model)
    finally:
        gguf.get_tensor_name_map = original


def _processor(arch: str, config):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())


def load_causal_lm(
    path: str,
    lora: Optional[str] = None,
    dtype="float32",
    device: str = "cpu",
    merge: bool = True,
    attention: Optional[str] = None,
    trainable: bool = False,
    lazy_embedding: bool = False,
):
    """A transformers causal LM (eval mode) from a GGUF file or a transformers folder; ``lora`` (a GGUF LoRA file
    or a peft folder) merged in by peft, or with ``merge = False`` returned as a peft model (``trainable``: its LoRA
    weights require gradients, to tune them further). ``attention``: a name registered with transformers'
    ``AttentionInterface`` (default: transformers' choice).

    ``lazy_embedding``: where the GGUF's embedding is quantized and is also the output head (tied), float32 on a
    CPU, and the LoRA adapter leaves it alone, its rows are dequantized when first used (``LazyRows``; hooks on
    the input and output embedding modules fill the rows a forward reads). The model's ``lazy_rows`` is that
    ``LazyRows``, or None; a caller that reads the head's weight itself calls its ``ensure`` first."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    rows = None
    if os.path.isdir(path):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch_dtype, attn_implementation=attention)
        arch = None
    else:
        meta, shapes = read_gguf(path, tensors=False)
        arch = str(meta.get("general.architecture"))
        config = hf_config(meta, shapes)
        with no_init_weights():  # every parameter is assigned below: no random initialisation
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch_dtype, attn_implementation=attention)
        names = _weights_map(model)
        lazy = lazy_embedding and torch_dtype == torch.float32 and device == "cpu" and config.tie_word_embeddings
        lazy = lazy and (lora is None or lora_spares_embedding(lora))
        weights = read_gguf(path, lazy=("token_embd.weight",) if lazy else ())[1]
        process = _processor(arch, config)
        state = {}
        for name in list(weights):
            array = weights.pop(name)
            if name not in names:
                raise ValueError(f"{path}: GGUF tensor {name} has no place in transformers' {config.model_type}")
            if isinstance(array, LazyRows):
                probe = np.zeros_like(array.table[:1])  # lazy rows: only where transformers leaves the tensor be
                if process.process(weights=probe, name=name).weights is probe and not probe.any():
                    rows = array
                    state[names[name]] = torch.from_numpy(rows.table)
                    continue
                array.ensure_all()
                array = array.table
            array = process.process(weights=array, name=name).weights
            # dequantized tensors are fresh arrays; float32 ones are views of the read-only memory map: copied
            owned = np.ascontiguousarray(array, np.float32) if array.flags.writeable else np.array(array, np.float32)
            state[names[name]] = torch.from_numpy(owned).to(torch_dtype)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}: weights missing {missing[:4]} / unexpected {unexpected[:4]}")
    if rows is not None:
        model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args, kwargs: rows.ensure((args[0] if args else kwargs["input"]).numpy()), with_kwargs=True
        )
        model.get_output_embeddings().register_forward_pre_hook(lambda module, args: rows.ensure_all())
    model.lazy_rows = rows
    model.eval()
    if lora:
        model = apply_lora(model, lora, arch, merge=merge, trainable=trainable)
    return model.to(device)


def lora_spares_embedding(lora: str) -> bool:
    """Whether a LoRA adapter (GGUF file or peft folder) leaves the embedding and output head alone: no GGUF tensor
    of ``token_embd`` or ``output``, no peft target naming an embedding or ``lm_head``; False where that cannot be
    told (a peft config naming its targets by a pattern, or modules it saves whole)."""
    if os.path.isdir(lora):
        config = json.loads((Path(lora) / "adapter_config.json").read_text())
        targets = config.get("target_modules")
        if not isinstance(targets, list) or config.get("modules_to_save"):
            return False
        return not any("embed" in t or "lm_head" in t for t in targets)
    return not any(n.startswith(("token_embd.", "output.")) for n in read_gguf(lora, tensors=False)[1])


def gguf_lora_to_peft(lora: str, model, arch: Optional[str] = None):
    """(peft LoraConfig, peft state dict) for a GGUF LoRA adapter of ``model``'s architecture. llama.cpp applies
    W + s·B·A with s = alpha / rank (1 where alpha is 0); peft's scale is lora_alpha / r, so lora_alpha = s·r."""
    import torch
    from peft import LoraConfig

    meta, parts = read_gguf(lora)
    if meta.get("general.type") != "adapter":
        raise ValueError(f"{lora} is not a GGUF LoRA adapter (general.type != adapter)")
    arch = arch or str(meta.get("general.architecture"))
    names = _weights_map(model)
    process = _processor(arch, model.config)
    state, targets, ranks = {}, [], set()
    for stem in sorted(n[: -len(".lora_a")] for n in parts if n.endswith(".lora_a")):
        a, b = parts[stem + ".lora_a"], parts.get(stem + ".lora_b")  # (r, in), (out, r)
        if b is None or stem not in names:
            raise ValueError(f"LoRA adapter {lora} names {stem}, which the model lacks")
        b = process.process(weights=b, name=stem).weights  # the base tensor's row order (Llama q/k)
        module = names[stem].removesuffix(".weight")
        targets.append(module)
        ranks.add(a.shape[0])
        state[f"base_model.model.{module}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a))
        state[f"base_model.model.{module}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(b))
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapter {lora}: mixed ranks {sorted(ranks)}")
    r = ranks.pop()
    alpha = float(meta.get("adapter.lora.alpha", 0.0)) or float(r)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    return config, state


def apply_lora(model, lora: str, arch: Optional[str] = None, merge: bool = True, trainable: bool = False):
    """``model`` with a LoRA adapter (GGUF file or peft folder) through peft: merged, or a peft model whose LoRA
    weights require gradients only when ``trainable``."""
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    if os.path.isdir(lora):
        tuned = PeftModel.from_pretrained(model, lora, is_trainable=trainable)
    else:
        config, state = gguf_lora_to_peft(lora, model, arch)
        config.inference_mode = not trainable  # peft's own switch, as is_trainable sets it for a folder
        tuned = get_peft_model(model, config)
        result = set_peft_model_state_dict(tuned, {k: v.to(model.dtype) for k, v in state.items()})
        if result.unexpected_keys:
            raise ValueError(f"LoRA adapter {lora}: peft did not place {result.unexpected_keys[:4]}")
    return tuned.merge_and_unload() if merge else tuned


def save_peft(peft_model, folder, base_name: Optional[str] = None) -> Path:
    """A peft model's LoRA weights in float16 (``adapter_model.safetensors``, peft's names) and peft's
    ``adapter_config.json`` (``base_name``: its ``base_model_name_or_path``). Nothing is looked up online."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # "auto" would ask the Hub
    halves = {k: v.detach().to("cpu").half().contiguous() for k, v in lora.items()}
    save_file(halves, str(folder / "adapter_model.safetensors"))
    config = peft_model.peft_config["default"]
    if base_name:
        config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))
    return folder


def write_peft_adapter(lora: str, base: str, out_dir, base_name: Optional[str] = None) -> Path:
    """Writes a GGUF LoRA adapter as a peft folder (adapter_config.json + adapter_model.safetensors, transformers'
    module names) that peft and vLLM (``--enable-lora``) load. ``base`` is the model's GGUF; ``base_name`` goes into
    the config as ``base_model_name_or_path``."""
    model = load_causal_lm(base, dtype="float32")
    return save_peft(apply_lora(model, lora, merge=False), out_dir, base_name)
