"""GGUF files are checked before llama.cpp reads them (``backends/gguf_check.py``): a corrupt, cut-short or
mismatched model or adapter is a clear error naming the file, never a crash of the process.

Unit tests run on the shipped adapter (cut short, corrupted) and on small GGUF files written here with gguf-py;
the subprocess tests (marked ``model``) run the pipeline in a fresh Python process with a bad file and require a
normal exit with a Python error (return code 1, not a signal) whose message names the file.
"""

import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from spacy_llmner.adapters import adapter_path
from spacy_llmner.backends import gguf_check
from spacy_llmner.backends.gguf_check import GGUFFileError, architecture, check_adapter, check_model, read_header

ADAPTER = str(adapter_path("ner-v2"))
ADAPTER_BYTES = open(ADAPTER, "rb").read()


def model_path(name: str) -> str:
    from spacy_llmner.backends.llamacpp import resolve_model_path

    return resolve_model_path(name)


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def raises(path, fn=read_header, *args, match=None) -> str:
    """The GGUFFileError message of ``fn(path, *args)``, which must name the file (and match ``match``)."""
    with pytest.raises(GGUFFileError) as info:
        fn(path, *args)
    msg = str(info.value)
    assert str(path) in msg, msg
    if match:
        assert match in msg, msg
    return msg


# ---- small GGUF files ---------------------------------------------------------------------------------------------

N_EMBD, N_FF = 64, 128  # a toy model: one block, an embedding, q and ffn_down projections


def toy_model(path, arch="gemma3", n_embd=N_EMBD) -> str:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_block_count(1)
    # numpy shapes are (out, in): the file stores the reverse (ne order)
    w.add_tensor("token_embd.weight", np.zeros((32, n_embd), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((n_embd, n_embd), np.float16))
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((n_embd, N_FF), np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def toy_adapter(path, arch="gemma3", rank=4, n_in=None, drop=(), general_type="adapter", extra=()) -> str:
    """A LoRA adapter for ``toy_model``: A (rank, in), B (out, rank) in numpy order; ``n_in`` overrides the input
    dimension of the ffn_down pair (a LoRA for a model of other dimensions)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if general_type:
        w.add_type(general_type)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    pairs = {"blk.0.attn_q.weight": (N_EMBD, N_EMBD), "blk.0.ffn_down.weight": (n_in or N_FF, N_EMBD)}
    for base, (n_i, n_o) in pairs.items():
        for name, arr in (
            (base + ".lora_a", np.zeros((rank, n_i), np.float32)),
            (base + ".lora_b", np.zeros((n_o, rank), np.float32)),
        ):
            if name not in drop:
                w.add_tensor(name, arr)
    for name, arr in extra:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def model(tmp_path):
    return toy_model(tmp_path / "model.gguf")


# ---- headers ------------------------------------------------------------------------------------------------------


def test_shipped_adapter_header():
    info = read_header(ADAPTER)
    assert (info.version, info.architecture, info.file_type, info.adapter_type) == (3, "gemma3", "adapter", "lora")
    assert info.lora_alpha == 12.0 and len(info.tensors) == 252
    # ne order: A maps the 2048 ffn inputs to rank 12, B rank 12 to the 640 outputs
    assert info.tensors["blk.0.ffn_down.weight.lora_a"] == (2048, 12)
    assert info.tensors["blk.0.ffn_down.weight.lora_b"] == (12, 640)
    assert architecture(ADAPTER) == "gemma3"


def test_toy_files_pass(tmp_path, model):
    adapter = toy_adapter(tmp_path / "adapter.gguf")
    assert check_model(model).tensors["blk.0.ffn_down.weight"] == (N_FF, N_EMBD)
    info = check_adapter(adapter, model)
    assert info.lora_alpha == 8.0 and info.tensors["blk.0.ffn_down.weight.lora_a"] == (N_FF, 4)


def test_missing_directory_and_empty(tmp_path):
    raises(tmp_path / "nope.gguf", match="does not exist")
    raises(tmp_path, match="is a directory")
    raises(write(tmp_path / "empty.gguf", b""), match="is empty")


def test_wrong_magic(tmp_path):
    msg = raises(write(tmp_path / "a.gguf", b"GGML" + ADAPTER_BYTES[4:]), match="is not a GGUF file")
    assert "b'GGML" in msg
    raises(write(tmp_path / "lfs.gguf", b"version https://git-lfs.github.com/spec/v1\n"), match="Git LFS pointer")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed):
    rng = random.Random(seed)
    junk = rng.randbytes(50_000)
    raises(write(tmp_path / "junk.gguf", junk), match="is not a GGUF file")
    # the magic and a good version followed by junk: the counts or the first entries fail
    raises(write(tmp_path / "junk2.gguf", b"GGUF" + struct.pack("<I", 3) + junk))
    raises(write(tmp_path / "junk3.gguf", ADAPTER_BYTES[:24] + junk), match="corrupt")


@pytest.mark.parametrize("version,match", [(1, "old format"), (4, "version 4"), (0x03000000, "big-endian")])
def test_bad_version(tmp_path, version, match):
    data = b"GGUF" + struct.pack("<I", version) + ADAPTER_BYTES[8:]
    raises(write(tmp_path / "v.gguf", data), match=match)


@pytest.mark.parametrize(
    "cut,match",
    [
        (3, "not a GGUF file"),  # inside the magic
        (16, "less than a GGUF header"),  # inside the counts
        (2_000, "more than its 2000 bytes can hold"),  # the metadata and some table entries
        (12_000, "the tensor table (entry"),  # inside the tensor table
        (17_247, "blk.0.ffn_down.weight.lora_a's data ends at byte"),  # the whole table, no data
        (2_000_000, "data ends at byte"),  # inside the data
        (len(ADAPTER_BYTES) - 1, "blk.9.attn_v.weight.lora_b's data ends at byte 4442656"),  # one byte short
    ],
)
def test_truncated_adapter(tmp_path, cut, match):
    path = write(tmp_path / "cut.gguf", ADAPTER_BYTES[:cut])
    msg = raises(path, match=match)
    assert cut <= 16 or "cut short" in msg


def test_corrupt_tensor_offset(tmp_path, model):
    info = read_header(model)
    data = bytearray(open(model, "rb").read())
    # the last tensor entry's offset: its 8 bytes end where the table ends (before the data's alignment padding)
    name = b"blk.0.attn_norm.weight"
    at = data.index(name) + len(name) + 4 + 8 * len(info.tensors["blk.0.attn_norm.weight"]) + 4
    data[at : at + 8] = struct.pack("<Q", 1 << 40)
    raises(write(tmp_path / "off.gguf", bytes(data)), match="blk.0.attn_norm.weight's data ends at byte")


def test_cache_follows_the_file(tmp_path, model):
    path = tmp_path / "m.gguf"
    shutil.copy(model, path)
    assert read_header(path).architecture == "gemma3"
    toy_model(path, arch="llama")  # rewritten in place: another size or mtime, another header
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert read_header(path).architecture == "llama"


# ---- models and adapters ------------------------------------------------------------------------------------------


def test_adapter_given_as_model(tmp_path):
    raises(toy_adapter(tmp_path / "a.gguf"), check_model, match="is a LoRA adapter")


def test_model_given_as_adapter(tmp_path, model):
    other = toy_model(tmp_path / "other.gguf")
    msg = raises(other, check_adapter, model, match="is not a LoRA adapter")
    assert "looks like a model file" in msg


def test_adapter_for_another_architecture(tmp_path, model):
    adapter = toy_adapter(tmp_path / "a.gguf", arch="llama")
    msg = raises(adapter, check_adapter, model, match="made for 'llama' models")
    assert model in msg and "'gemma3'" in msg and "adapter = null" in msg


def test_adapter_with_wrong_dimensions(tmp_path, model):
    adapter = toy_adapter(tmp_path / "a.gguf", n_in=96)
    msg = raises(adapter, check_adapter, model, match="does not fit the model")
    assert "blk.0.ffn_down.weight" in msg and f"96 → {N_EMBD}" in msg and f"{N_FF} → {N_EMBD}" in msg
    assert model in msg
    small = toy_model(tmp_path / "small.gguf", n_embd=32)  # every projection of another size
    raises(toy_adapter(tmp_path / "b.gguf"), check_adapter, small, match="does not fit the model")


def test_adapter_pairs_and_names(tmp_path, model):
    raises(
        toy_adapter(tmp_path / "a.gguf", drop=["blk.0.attn_q.weight.lora_b"]),
        check_adapter,
        model,
        match="missing blk.0.attn_q.weight.lora_b",
    )
    extra = [("blk.7.attn_q.weight.lora_a", np.zeros((4, N_EMBD), np.float32))]
    extra.append(("blk.7.attn_q.weight.lora_b", np.zeros((N_EMBD, 4), np.float32)))
    msg = raises(toy_adapter(tmp_path / "b.gguf", extra=extra), check_adapter, model, match="blk.7.attn_q.weight")
    assert "does not have" in msg
    odd = [("blk.0.attn_q.weight.bias", np.zeros(4, np.float32))]
    raises(toy_adapter(tmp_path / "c.gguf", extra=odd), check_adapter, model, match="neither a LoRA A nor")
    norm = [("blk.0.attn_norm.weight", np.zeros(N_EMBD, np.float32))]  # skipped by llama.cpp: allowed
    check_adapter(toy_adapter(tmp_path / "d.gguf", extra=norm), model)
    raises(toy_adapter(tmp_path / "e.gguf", general_type=None), check_adapter, model, match="is not a LoRA adapter")


def test_rank_mismatch(tmp_path, model):
    q = "blk.0.attn_q.weight"
    extra = [(q + ".lora_a", np.zeros((4, N_EMBD), np.float32)), (q + ".lora_b", np.zeros((N_EMBD, 5), np.float32))]
    adapter = toy_adapter(tmp_path / "a.gguf", drop=[q + ".lora_a", q + ".lora_b"], extra=extra)
    raises(adapter, check_adapter, model, match="rank 4 in A but 5 in B")


def test_shipped_adapter_and_model_pass_quickly():
    model = model_path("gemma3-270m")
    gguf_check._HEADERS.clear()
    gguf_check._PAIRS.clear()
    t0 = time.perf_counter()
    check_model(model)
    check_adapter(ADAPTER, model)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        check_adapter(ADAPTER, model)
    again = (time.perf_counter() - t0) / 10
    assert first < 5.0, first  # ~0.03 s here: the header of a 250 MB model, its 262k-token vocabulary included
    assert again < 0.01, again
    assert check_model(model).tensors["blk.0.ffn_down.weight"] == (2048, 640)


def test_shipped_adapter_on_smollm2_is_refused():
    msg = raises(ADAPTER, check_adapter, model_path("smollm2-135m"), match="made for 'gemma3' models")
    assert "'llama'" in msg


def test_loaders_check_before_native_code(tmp_path, model):
    """Both engines' loaders raise the backend's error (the check's message kept) before llama.cpp or numpy read."""
    from spacy_llmner.backends.llamacpp import _load, _load_torch
    from spacy_llmner.ty import BackendError

    cut = write(tmp_path / "cut.gguf", ADAPTER_BYTES[:100_000])
    with pytest.raises(BackendError, match="^llama.cpp backend: .*cut.gguf is cut short"):
        _load(model, cut, 512, 1, 0)
    with pytest.raises(BackendError, match="^llama.cpp backend, engine torch: .*cut.gguf is cut short"):
        _load_torch(model, cut, "float32", 1, "cpu")
    with pytest.raises(BackendError, match="model.gguf is not a LoRA adapter"):
        _load(model, model, 512, 1, 0)
    with pytest.raises(BackendError, match="cut.gguf is cut short"):
        _load(cut, None, 512, 1, 0)


# ---- the pipeline in a fresh process ------------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys
    import spacy

    model, adapter, bypass = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if bypass:  # llama.cpp's own refusal of an adapter, without the checks before it
        from spacy_llmner.backends import llamacpp
        llamacpp.check_adapter = lambda *a: None
        llamacpp.check_settings = lambda *a: None
    backend = {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": model}
    if bypass:  # llama.cpp's own loader, which the torch engine does not use
        backend["engine"] = "llama.cpp"
    if adapter != "-":
        backend["adapter"] = adapter
    nlp = spacy.blank("en")
    nlp.add_pipe("llm_lar_ner", config={"labels": ["person"], "zero_shot": True, "backend": backend})
    doc = nlp("Barack Obama met Angela Merkel.")
    print("annotated", [(e.text, e.label_) for e in doc.ents])
    """
)


def run_pipeline(model: str, adapter: str = "-", bypass: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-c", SCRIPT, model, adapter, "1" if bypass else "0"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def assert_clean_failure(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])  # a Python exception, not -11 / 139
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("spacy_llmner.ty.BackendError:") and "llama.cpp backend: " in last, res.stderr[-3000:]
    for needle in needles:
        assert needle in last, last


@pytest.mark.model
def test_pipeline_with_truncated_adapter(tmp_path):
    path = write(tmp_path / "truncated.gguf", ADAPTER_BYTES[:2_000_000])
    assert_clean_failure(run_pipeline("gemma3-270m", path), path, "is cut short", "truncated download")


@pytest.mark.model
def test_pipeline_with_random_adapter(tmp_path):
    path = write(tmp_path / "random.gguf", random.Random(7).randbytes(100_000))
    assert_clean_failure(run_pipeline("gemma3-270m", path), path, "is not a GGUF file")


@pytest.mark.model
def test_pipeline_with_adapter_for_another_model(tmp_path):
    res = run_pipeline("smollm2-135m", ADAPTER)  # refused when the backend is made (headers only), before loading
    assert_clean_failure(res, ADAPTER, "made for a gemma3 model", "is a llama model", "adapter = null")


@pytest.mark.model
def test_pipeline_with_truncated_model(tmp_path):
    path = str(tmp_path / "model.gguf")
    with open(model_path("gemma3-270m"), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(20_000_000))  # the header and the first tensors, not the rest
    assert_clean_failure(run_pipeline(path), path, "is cut short", "data ends at byte")


@pytest.mark.model
def test_pipeline_when_llama_cpp_refuses_an_adapter(tmp_path):
    """Without the header checks, llama.cpp's refusal of an adapter (which llama-cpp-python ignores) is caught too:
    a clean error, not the SIGSEGV of the first evaluation."""
    path = write(tmp_path / "random.gguf", b"GGUF" + random.Random(8).randbytes(100_000))
    assert_clean_failure(run_pipeline("gemma3-270m", path, bypass=True), path, "could not load the LoRA adapter")


@pytest.mark.model
def test_processes_started_together_on_a_fresh_install_each_get_the_whole_packaged_model(tmp_path):
    """The packaged model's GGUF is joined from its chunks on first use, in place. Three processes with one empty
    ``HOME`` (a fresh install) resolve it at once: each gets the path of the whole file, none fails on a file
    another one is still writing."""
    code = "from spacy_llmner.backends.llamacpp import resolve_model_path; print(resolve_model_path('gemma3-270m'))"
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0], [r[1][-800:] for r in results]
    (path,) = {r[0].strip() for r in results}
    assert path.startswith(str(tmp_path)) and os.path.getsize(path) == os.path.getsize(model_path("gemma3-270m"))
    check_model(path)
