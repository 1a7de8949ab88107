"""Instruction tuning of the embedded small LLM for NER (IF-WRANER / LLMs4NER), exported back to GGUF.

    spacy-llmner finetune configs/finetune_cpu.cfg training/finetuned --paths.data ../shared/data

reads the datasets, renders training examples with the very component (``[prompt] config``) the tuned model will
serve (``examples.py``), LoRA-tunes the GGUF model dequantized into torch (``train.py``), merges the adapters and
writes ``model.gguf`` for the llama.cpp backend (``export.py``), plus the adapter and ``tuning.json`` (settings,
data sizes, loss curve, seconds). Use it with ``backend.model = "<output>/model.gguf"``. With ``[model] adapter``
(e.g. the shipped ``ner-v2``), that adapter's LoRA is tuned further instead and written as ``adapter.gguf``: use it
with ``backend.adapter = "<output>/adapter.gguf"`` (``configs/finetune_pool.cfg``: a set's own labelled sentences).

Needs the ``tune`` extra (peft, gguf); nothing here is imported by ``import spacy_llmner``.
"""

import glob
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..prompt import Demonstration
from .examples import ExampleBuilder, Regularisation, TuningExample
from .train import TrainingSettings

DEFAULT_CONFIG = """
[paths]
data = "../shared/data"

[model]
# packaged short name or a GGUF path
base = "gemma3-270m"
# null: a new LoRA ([training] r, alpha), merged into model.gguf. An adapter (a shipped name such as "ner-v2", "auto"
# or a GGUF LoRA file): its own LoRA tuned further, written as adapter.gguf for backend.adapter
adapter = null

[prompt]
# the pipeline whose llm_lar_ner component the tuned model will serve: examples are its own prompts
config = "configs/retrieval.cfg"
component = "llm_lar_ner"

[data]
# BIO / .spacy / jsonl files or glob patterns (all files one pattern matches are one dataset); a dataset's labels
# are those its entities use, renamed by label_names (e.g. {"PER": "person"}); names: one per source (optional)
sources = []
names = []
label_names = {}
# sentences read from each source (its retrieval pool), and of those, how many become examples
pool_limit = 2000
examples_per_source = 400
# each chosen sentence becomes this many examples (independent regularisation draws: demonstrations, casing, ...)
renders = 1
seed = 0

[regularisation]
demo_dropout = 0.3
random_demo = 0.15
shuffle_labels = 0.5
rename_labels = 0.1
lowercase = 0.0
demo_counts = null
# label-set levers (spacy_llmner/finetune/examples.py): probabilities per example
label_subset = 0.0
absent_labels = 0.0
paraphrase_labels = 0.0
definitions = 0.0

[training]
r = 16
alpha = 32
lora_dropout = 0.05
lr = 0.0002
weight_decay = 0.01
warmup = 0.05
accumulate = 4
epochs = 1.0
max_tokens = 1024
max_minutes = null
device = "cpu"
threads = null
seed = 0

[export]
# q8_0 (default), f16 or f32 for the re-stored layers
type = "q8_0"
"""


def load_settings(path: Optional[Path] = None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from thinc.api import Config

    config = Config().from_str(DEFAULT_CONFIG, interpolate=False)
    if path is not None:
        config = config.merge(Config().from_disk(path, interpolate=False))
    return Config().from_str(config.to_str(), overrides=overrides or {})


def build_examples(settings: Dict[str, Any], log=print) -> List[TuningExample]:
    """The training examples: per source, its sentences as the component's retrieval pool and labels, then a
    seeded sample of them rendered as (prompt, answer)."""
    from spacy.util import load_config, load_model_from_config

    data, prompt = settings["data"], settings["prompt"]
    if not data["sources"]:
        raise ValueError("finetune: [data] sources is empty; give at least one BIO / .spacy / jsonl file")
    nlp = load_model_from_config(load_config(prompt["config"]), auto_fill=True)
    if prompt["component"] not in nlp.pipe_names:
        raise ValueError(f"finetune: {prompt['config']} has no component {prompt['component']!r}")
    component = nlp.get_pipe(prompt["component"])
    rng = random.Random(data["seed"])
    reg = dict(settings["regularisation"])
    if reg.get("demo_counts") is not None:
        reg["demo_counts"] = tuple(reg["demo_counts"])
    pools = read_sources(data)
    other = {lab for _, pool in pools for d in pool for _, _, lab in d.spans}
    builder = ExampleBuilder(component, Regularisation(**reg), seed=data["seed"], other_labels=other)
    renders = int(data.get("renders", 1))
    examples: List[TuningExample] = []
    for name, pool in pools:
        labels = sorted({lab for d in pool for _, _, lab in d.spans})
        component.set_labels(labels)
        if component.retriever is not None:
            component.build_pool(pool)
        chosen = rng.sample(pool, min(len(pool), data["examples_per_source"]))
        t0 = time.perf_counter()
        examples.extend(builder.build(chosen * renders, pool, name))
        log(
            f"finetune: {name}: {len(chosen) * renders} examples from a pool of {len(pool)} ({len(labels)} labels, "
            f"{time.perf_counter() - t0:.0f} s)"
        )
    return examples


def source_files(source: str) -> List[str]:
    """The files one ``[data] sources`` entry names: the file itself, or every file its glob pattern matches."""
    files = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not files:
        raise ValueError(f"finetune: no file matches the source {source!r}")
    return files


def source_names(data: Dict[str, Any]) -> List[str]:
    """The dataset name of each ``[data] sources`` entry (see :func:`read_sources`)."""
    names = list(data.get("names") or [])
    if names:
        if len(names) != len(data["sources"]):
            raise ValueError(f"finetune: [data] names has {len(names)} names for {len(data['sources'])} sources")
        return names
    for source in data["sources"]:
        files = source_files(source)
        path = Path(files[0])
        tail = path.stem in ("train", "dev", "test") or path.suffix == ".jsonl" or len(files) > 1
        names.append(path.parent.name if tail else path.stem)
    return names


def read_sources(data: Dict[str, Any]) -> List[Tuple[str, List[Demonstration]]]:
    """[(dataset name, its sentences)] per ``[data] sources`` entry: a file or a glob pattern (every file it matches
    is one dataset, e.g. a corpus split into sections), named by ``[data] names`` (same order) or else by its
    folder (``crossner/politics/train.txt`` → politics) or file; labels renamed by ``[data] label_names``; at most
    ``pool_limit`` sentences each."""
    import spacy

    from ..demonstrations import load_demonstrations

    label_names = dict(data.get("label_names") or {})
    vocab, out = spacy.blank("en").vocab, []
    for name, source in zip(source_names(data), data["sources"]):
        pool = [d for f in source_files(source) for d in load_demonstrations(Path(f), vocab)][: data["pool_limit"]]
        pool = [Demonstration(d.text, [(s, e, label_names.get(lab, lab)) for s, e, lab in d.spans]) for d in pool]
        if not any(d.spans for d in pool):
            raise ValueError(f"finetune: {source} holds no entities")
        out.append((name, pool))
    return out


def finetune(settings: Dict[str, Any], output: Path, log=print) -> Dict[str, Any]:
    """Builds the examples, tunes, exports; returns the summary written to ``output/tuning.json``."""
    from ..backends.llamacpp import resolve_adapter_file
    from .export import export_gguf, export_lora_gguf, merged_weights
    from .train import Tokenizer, load_model, model_file, tune, write_log

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base = model_file(settings["model"]["base"])
    adapter = resolve_adapter_file(settings["model"]["base"], settings["model"]["adapter"])
    t0 = time.perf_counter()
    examples = build_examples(settings, log)
    t_examples = time.perf_counter() - t0
    train = TrainingSettings(**settings["training"])
    tokenizer = Tokenizer(base)
    t1 = time.perf_counter()
    model = load_model(base, train.device, adapter)
    t_load = time.perf_counter() - t1

    def progress(state):
        if state.optimizer_steps % 10 == 0:
            recent = state.losses[-10:]
            log(
                f"finetune: step {state.optimizer_steps}, {state.examples_seen} examples, "
                f"loss {sum(recent) / len(recent):.3f}, {state.seconds / 60:.1f} min"
            )

    model, tuning_log = tune(model, tokenizer, examples, train, progress)
    model.save_pretrained(str(output / "adapter"))
    t2 = time.perf_counter()
    if adapter is None:
        path = export_gguf(base, merged_weights(model), str(output / "model.gguf"), settings["export"]["type"])
    else:  # the tuned-further adapter, for the shipped model file it was tuned on
        path = Path(export_lora_gguf(output / "adapter", base, output / "adapter.gguf")["path"])
    t_export = time.perf_counter() - t2
    tokenizer.close()
    by_dataset = dict(Counter(ex.dataset for ex in examples))
    summary = {
        "base": base,
        "adapter_tuned_further": adapter,
        "model": str(path),
        "model_mb": round(path.stat().st_size / 1e6, 1),
        "examples": len(examples),
        "examples_by_dataset": by_dataset,
        "seconds": {
            "examples": round(t_examples, 1),
            "load": round(t_load, 1),
            "train": round(tuning_log.seconds, 1),
            "export": round(t_export, 1),
        },
        "config": json.loads(json.dumps(settings)),
    }
    write_log(output / "tuning.json", tuning_log, train, **summary)
    log(
        f"finetune: wrote {path} ({summary['model_mb']} MB); {tuning_log.examples_seen} examples in "
        f"{tuning_log.seconds / 60:.1f} min"
    )
    return summary


def write_token_data(settings: Dict[str, Any], output: Path, log=print) -> Dict[str, Any]:
    """Builds the examples and writes them as llama.cpp token ids (the ids the backend will feed the model) to
    ``output`` (an ``.npz``: ``tokens`` all ids end to end; per example ``start``, ``n_prompt``, ``n_answer``,
    ``dataset`` index; ``datasets`` the names; ``lower`` whether lower-cased). ``scripts/tune_adapter.py`` trains
    on it with torch alone (no spaCy, no llama.cpp), e.g. on a GPU machine. Returns a summary."""
    import numpy as np

    from .train import Tokenizer, model_file

    examples = build_examples(settings, log)
    tokenizer = Tokenizer(model_file(settings["model"]["base"]))
    names = sorted({ex.dataset for ex in examples})
    tokens, start, n_prompt, n_answer, dataset = [], [], [], [], []
    offset = 0
    for ex in examples:
        p, a = tokenizer.prompt(ex.prompt), tokenizer.completion(ex.answer)
        tokens.extend(p + a)
        start.append(offset)
        n_prompt.append(len(p))
        n_answer.append(len(a))
        dataset.append(names.index(ex.dataset))
        offset += len(p) + len(a)
    tokenizer.close()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as f:
        np.savez_compressed(
            f,
            tokens=np.asarray(tokens, dtype=np.int32),
            start=np.asarray(start, dtype=np.int64),
            n_prompt=np.asarray(n_prompt, dtype=np.int32),
            n_answer=np.asarray(n_answer, dtype=np.int32),
            dataset=np.asarray(dataset, dtype=np.int16),
            datasets=np.asarray(names),
        )
    summary = {
        "examples": len(examples),
        "examples_by_dataset": dict(Counter(ex.dataset for ex in examples)),
        "tokens": offset,
        "mean_prompt_tokens": round(float(np.mean(n_prompt)), 1),
        "max_tokens": int(max(p + a for p, a in zip(n_prompt, n_answer))),
        "bytes": output.stat().st_size,
    }
    log(f"finetune: wrote {output}: {json.dumps(summary)}")
    return summary
