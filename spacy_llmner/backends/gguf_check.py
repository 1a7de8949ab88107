"""Checks on the GGUF files the plugin hands to llama.cpp (a model, a LoRA adapter) before native code reads them.

llama.cpp trusts its files: a cut-short or corrupt adapter can kill the process (SIGSEGV) instead of raising, and a
corrupt model gives a bare "Failed to load model". ``read_header`` parses a file's header (magic, version, metadata,
tensor table) in Python with every read bounds-checked, and checks that each tensor's data lies within the file;
``check_model`` and ``check_adapter`` add what llama.cpp expects of a model and of a LoRA adapter for that model
(the adapter's architecture, and every LoRA pair's shapes against the base tensor it changes). Problems raise
``GGUFFileError`` (a ``ValueError``), whose message names the file and says what is wrong.

Only the header is read (memory-mapped: the pages touched, not the tensor data); for a packaged 270M model the
vocabulary's strings dominate. Results are cached by (path, size, mtime), so a second check of the same files is
a dictionary look-up. Standard library only: gguf-py is imported just to size a tensor type this module does not
know.
"""

import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (32-bit counts) is long gone from llama.cpp; 3 added big-endian files
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types → struct formats (8 = string and 9 = array are read separately)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types → (elements per block, bytes per block); gguf-py's GGML_QUANT_SIZES for any other type
_TYPE_SIZES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
}

LORA_A, LORA_B = ".lora_a", ".lora_b"


class GGUFFileError(ValueError):
    """A GGUF file is missing, corrupt, cut short, or does not fit what it is used for (its message names it)."""


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says.

    tensors: {name: dims} with the dims as the file stores them (ggml ``ne`` order: the fastest-varying, i.e. input,
        dimension first; a numpy/PyTorch shape is the reverse), e.g. a 640 → 2048 projection is (640, 2048).
    metadata: scalar and string values by key; arrays as their length.
    """

    path: str
    size: int
    version: int
    architecture: Optional[str]
    file_type: Optional[str]  # general.type: "model", "adapter" (a LoRA), or None where the file does not say
    tensors: Dict[str, Tuple[int, ...]] = field(repr=False, compare=False)
    tensor_types: Dict[str, int] = field(repr=False, compare=False)  # ggml type ids
    metadata: Dict[str, Any] = field(repr=False, compare=False)
    adapter_type: Optional[str] = None  # adapter.type ("lora")
    lora_alpha: Optional[float] = None  # adapter.lora.alpha
    offsets: Dict[str, int] = field(default_factory=dict, repr=False, compare=False)  # tensor data, from data_start
    data_start: int = 0  # where the tensor data begins (aligned)
    arrays: Dict[str, int] = field(default_factory=dict, repr=False, compare=False)  # array key → its type's byte


def read_array(info: GGUFInfo, key: str) -> list:
    """The values of the metadata array ``key`` of a checked header (``read_header``): strings or numbers."""
    with open(info.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        at = info.arrays[key]
        itype, count = struct.unpack_from("<IQ", mm, at)
        at += 12
        if itype in _SCALARS:
            fmt = _SCALARS[itype]
            return list(struct.unpack_from(f"<{count}{fmt[1]}", mm, at))
        values = []
        for _ in range(count):  # strings (read_header admits no other array type)
            (n,) = struct.unpack_from("<Q", mm, at)
            values.append(bytes(mm[at + 8 : at + 8 + n]).decode("utf8", errors="replace"))
            at += 8 + n
        return values


_LOCK = threading.Lock()
_HEADERS: Dict[tuple, GGUFInfo] = {}
_PAIRS: Dict[tuple, bool] = {}  # (adapter key, model key) → checked


def _key(path: str) -> tuple:
    """(path, size, mtime, inode) of a regular file, or GGUFFileError. The path as given, not resolved: messages
    name the file as the caller did."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GGUFFileError(f"{path} does not exist") from None
    except OSError as e:
        raise GGUFFileError(f"{path} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFFileError(f"{path} is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFFileError(f"{path} is not a regular file (a GGUF file is expected)")
    return (path, st.st_size, st.st_mtime_ns, st.st_ino)


def read_header(path) -> GGUFInfo:
    """The header of the GGUF file at ``path``, checked: a regular file, the GGUF magic, a supported version, sane
    counts, metadata and tensor table within the file, known tensor types, and every tensor's data within the file.
    Raises GGUFFileError naming the file."""
    path = os.fspath(path)
    key = _key(path)
    info = _HEADERS.get(key)
    if info is None:
        info = _parse(path, key[1])
        with _LOCK:
            if len(_HEADERS) > 64:
                _HEADERS.clear()
            _HEADERS[key] = info
    return info


def architecture(path) -> Optional[str]:
    """The file's ``general.architecture`` (e.g. "gemma3", "llama"), or None where it has none."""
    return read_header(path).architecture


def check_model(path) -> GGUFInfo:
    """``read_header`` plus what a model file needs: an architecture, and not being a LoRA adapter."""
    info = read_header(path)
    if info.file_type == "adapter":
        raise GGUFFileError(
            f"{info.path} is a LoRA adapter (general.type = adapter), not a model: give it as the adapter and the "
            "model it was made for as the model"
        )
    if not info.architecture:
        raise GGUFFileError(f"{info.path} has no general.architecture: it is not a llama.cpp model file")
    if not info.tensors:
        raise GGUFFileError(f"{info.path} holds no tensors: it is not a model file (a vocabulary-only GGUF?)")
    return info


def check_adapter(adapter_path, model_path) -> GGUFInfo:
    """``read_header`` of both files plus what llama.cpp needs to apply the adapter to the model: a LoRA adapter
    (general.type = adapter, adapter.type = lora) of the model's architecture, whose every tensor is half of a
    ``<base>.lora_a`` / ``<base>.lora_b`` pair (norm vectors aside), each base tensor in the model, and the pair's
    shapes fitting it (A: in → rank, B: rank → out). Raises GGUFFileError naming both files."""
    adapter = read_header(adapter_path)
    model = check_model(model_path)
    pair = (_key(adapter.path), _key(model.path))
    if pair in _PAIRS:
        return adapter
    a_name, m_name = adapter.path, model.path
    if adapter.file_type != "adapter":
        looks = "a model file" if not any(n.endswith((LORA_A, LORA_B)) for n in adapter.tensors) else "not an adapter"
        raise GGUFFileError(
            f"{a_name} is not a LoRA adapter (general.type is {adapter.file_type!r}, not 'adapter'; it looks like "
            f"{looks}): give a model file as the model (adapter = null), and as the adapter a GGUF LoRA adapter "
            "(what `spacy-llmner finetune` or llama.cpp's convert_lora_to_gguf.py writes)"
        )
    if adapter.adapter_type != "lora":
        raise GGUFFileError(
            f"{a_name} is an adapter of type {adapter.adapter_type!r}; llama.cpp applies 'lora' adapters only"
        )
    if adapter.architecture != model.architecture:
        raise GGUFFileError(
            f"the adapter {a_name} was made for {adapter.architecture!r} models, but the model {m_name} is "
            f"{model.architecture!r}: use the model the adapter was trained for, or set adapter = null"
        )
    pairs: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    for name, dims in adapter.tensors.items():
        if name.endswith(LORA_A) or name.endswith(LORA_B):
            base, half = name[:-7], name[-1]
            pairs.setdefault(base, {})[half] = dims
        elif not name.endswith("_norm.weight"):  # llama.cpp skips norm vectors in an adapter
            raise GGUFFileError(f"{a_name} holds a tensor {name!r} that is neither a LoRA A nor a LoRA B matrix")
    if not pairs:
        raise GGUFFileError(f"{a_name} holds no LoRA tensors (no '<tensor>.lora_a' / '.lora_b' pairs)")
    for base, halves in sorted(pairs.items()):
        if len(halves) != 2:
            missing = LORA_B if "a" in halves else LORA_A
            raise GGUFFileError(f"{a_name} is missing {base}{missing}, the other half of {base}'s LoRA pair")
        a, b = _matrix(adapter, base + LORA_A), _matrix(adapter, base + LORA_B)
        if base not in model.tensors:
            raise GGUFFileError(
                f"the adapter {a_name} changes {base}, which the model {m_name} does not have: the adapter was "
                "made for another model; use the model it was trained for, or set adapter = null"
            )
        w = model.tensors[base]
        if len(w) > 2 and any(d != 1 for d in w[2:]):
            raise GGUFFileError(f"the adapter {a_name} changes {base}, which is not a matrix in the model {m_name}")
        w_in, w_out = w[0], (w[1] if len(w) > 1 else 1)
        if base == "token_embd.weight":  # llama.cpp applies the embedding's LoRA with A and B swapped
            fits = w_in == b[1] and w_out == a[1]
            want_in, want_out, rank_ok = b[1], a[1], True
        else:
            fits = w_in == a[0] and w_out == b[1]
            want_in, want_out, rank_ok = a[0], b[1], a[1] == b[0]
        if not rank_ok:
            raise GGUFFileError(
                f"{a_name}: the LoRA pair of {base} has rank {a[1]} in A but {b[0]} in B (a corrupt adapter, or "
                "A stored untransposed)"
            )
        if not fits:
            raise GGUFFileError(
                f"the adapter {a_name} does not fit the model {m_name}: its LoRA for {base} is for a "
                f"{want_in} → {want_out} weight, the model's is {w_in} → {w_out}; the adapter was made for a model "
                "of other dimensions: use the model it was trained for, or set adapter = null"
            )
    with _LOCK:
        if len(_PAIRS) > 64:
            _PAIRS.clear()
        _PAIRS[pair] = True
    return adapter


def _matrix(info: GGUFInfo, name: str) -> Tuple[int, int]:
    dims = info.tensors[name]
    if len(dims) > 2 and any(d != 1 for d in dims[2:]):
        raise GGUFFileError(f"{info.path}: LoRA tensor {name} has {len(dims)} dimensions {list(dims)}, not 2")
    return dims[0], (dims[1] if len(dims) > 1 else 1)


def _type_size(ttype: int) -> Optional[Tuple[int, int]]:
    known = _TYPE_SIZES.get(ttype)
    if known is not None:
        return known
    try:  # a type newer than this table: gguf-py may know it
        import gguf

        return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)])
    except Exception:
        return None


class _Cut(Exception):
    """A read past the end of the file (turned into GGUFFileError with what was being read)."""


def _parse(path: str, size: int) -> GGUFInfo:
    if size == 0:
        raise GGUFFileError(f"{path} is empty (0 bytes): not a GGUF file (an interrupted download?)")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_buffer(path, mm, size)
    except GGUFFileError:
        raise
    except OSError as e:
        raise GGUFFileError(f"{path} cannot be read: {e.strerror or e}") from None


def _parse_buffer(path: str, mm, size: int) -> GGUFInfo:
    first = bytes(mm[:8])
    if first[:4] != MAGIC:
        raise GGUFFileError(
            f"{path} is not a GGUF file (its first bytes are {first!r}, not {MAGIC!r}): a wrong or corrupt file"
            + (", or a Git LFS pointer instead of the file" if first.startswith(b"version ") else "")
        )
    if size < 24:
        raise GGUFFileError(f"{path} is cut short: {size} bytes, less than a GGUF header (a truncated download?)")
    (version,) = struct.unpack_from("<I", mm, 4)
    if version not in VERSIONS:
        swapped = struct.unpack_from(">I", mm, 4)[0]
        if swapped in VERSIONS:
            raise GGUFFileError(f"{path} is a big-endian GGUF file; llama.cpp here reads little-endian files only")
        raise GGUFFileError(
            f"{path} has GGUF version {version}; supported are versions {' and '.join(map(str, VERSIONS))}"
            + (" (version 1 is an old format: convert the model again)" if version == 1 else " (a corrupt file?)")
        )
    n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
    # the least a metadata entry takes: key length (8) + type (4) + a 1-byte value; a tensor entry: name length (8)
    # + dims count (4) + one dim (8) + type (4) + offset (8)
    if n_kv * 13 + n_tensors * 32 > size - 24:
        raise GGUFFileError(
            f"{path} is corrupt or cut short: its header claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than its {size} bytes can hold"
        )

    at = 24
    what = "the metadata"
    u32, u64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from

    def text(at: int, of: str) -> Tuple[str, int]:
        """The length-prefixed UTF-8 string at ``at`` and the position after it."""
        (n,) = u64(mm, at)
        start = at + 8
        if start + n > size:
            raise _Cut()
        try:
            return bytes(mm[start : start + n]).decode("utf8"), start + n
        except UnicodeDecodeError:
            raise GGUFFileError(f"{path} is corrupt: {of} at byte {start} is not UTF-8 text") from None

    metadata: Dict[str, Any] = {}
    tensors: Dict[str, Tuple[int, ...]] = {}
    types: Dict[str, int] = {}
    offsets: Dict[str, int] = {}
    arrays: Dict[str, int] = {}
    try:
        for i in range(n_kv):
            what = f"metadata entry {i}"
            key, at = text(at, f"the key of metadata entry {i}")
            what = f"metadata {key!r}"
            (vtype,) = u32(mm, at)
            at += 4
            if vtype in _SCALARS:
                (metadata[key],) = struct.unpack_from(_SCALARS[vtype], mm, at)
                at += struct.calcsize(_SCALARS[vtype])
            elif vtype == _STRING:
                metadata[key], at = text(at, f"the value of {key!r}")
            elif vtype == _ARRAY:
                arrays[key] = at
                itype, count = u32(mm, at)[0], u64(mm, at + 4)[0]
                at += 12
                if itype in _SCALARS:
                    at += count * struct.calcsize(_SCALARS[itype])
                    if at > size:
                        raise _Cut()
                elif itype == _STRING:
                    if count * 8 > size - at:
                        raise _Cut()
                    for _ in range(count):  # the vocabulary: hundreds of thousands of strings
                        at += 8 + u64(mm, at)[0]
                    if at > size:
                        raise _Cut()
                else:
                    raise GGUFFileError(f"{path} is corrupt: metadata {key!r} is an array of unknown type {itype}")
                metadata[key] = count
            else:
                raise GGUFFileError(f"{path} is corrupt: metadata {key!r} has an unknown value type {vtype}")

        for i in range(n_tensors):
            what = f"the tensor table (entry {i} of {n_tensors})"
            name, at = text(at, f"the name of tensor {i}")
            what = f"the tensor table (entry {i}: {name})"
            (n_dims,) = u32(mm, at)
            at += 4
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFFileError(f"{path} is corrupt: tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} exist)")
            dims = struct.unpack_from(f"<{n_dims}Q", mm, at)
            at += 8 * n_dims
            ttype, offset = u32(mm, at)[0], u64(mm, at + 4)[0]
            at += 12
            if name in tensors:
                raise GGUFFileError(f"{path} is corrupt: it holds tensor {name} twice")
            tensors[name], types[name], offsets[name] = tuple(int(d) for d in dims), ttype, offset
    except (_Cut, struct.error):
        raise GGUFFileError(
            f"{path} is cut short or corrupt: {what} runs past the end of its {size} bytes (a truncated download?)"
        ) from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFileError(f"{path} is corrupt: general.alignment is {alignment!r}, not a power of two")
    data_start = (at + alignment - 1) // alignment * alignment
    for name, dims in tensors.items():
        ttype, offset = types[name], offsets[name]
        sizes = _type_size(ttype)
        if sizes is None:
            raise GGUFFileError(f"{path}: tensor {name} has a tensor type ({ttype}) unknown here (a corrupt file?)")
        block, block_bytes = sizes
        if dims[0] % block:
            raise GGUFFileError(
                f"{path} is corrupt: tensor {name} has {dims[0]} elements per row, not a multiple of its type's "
                f"block of {block}"
            )
        if offset % alignment:
            raise GGUFFileError(f"{path} is corrupt: tensor {name}'s data offset {offset} is not {alignment}-aligned")
        n_elements = 1
        for d in dims:
            n_elements *= d
        end = data_start + offset + n_elements // block * block_bytes
        if end > size:
            raise GGUFFileError(
                f"{path} is cut short: tensor {name}'s data ends at byte {end} but the file has {size} bytes "
                "(a truncated download, or a corrupt tensor table)"
            )

    def text_value(key: str) -> Optional[str]:
        value = metadata.get(key)
        return value if isinstance(value, str) else None

    alpha = metadata.get("adapter.lora.alpha")
    return GGUFInfo(
        path=path,
        size=size,
        version=version,
        architecture=text_value("general.architecture"),
        file_type=text_value("general.type"),
        tensors=tensors,
        tensor_types=types,
        metadata=metadata,
        adapter_type=text_value("adapter.type"),
        lora_alpha=float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
        offsets=offsets,
        data_start=data_start,
        arrays=arrays,
    )
