"""``spacy-llmner finetune``'s model, tokens and training: the component's prompts and gold answers as token ids,
tuned by the package's one LoRA loop (``loop.py``, shared with ``scripts/tune_adapter.py``).

Weights: the package's one loader (``backends.weights.load_causal_lm``: the GGUF dequantized by gguf-py into
transformers' model classes, as the fast engine runs it; Gemma 3 and Llama/SmolLM2). Tokens: the file's own tokenizer
(``backends.vocab``, equal to llama.cpp's), never transformers' GGUF tokenizer conversion, which transformers 4.53.2
gets wrong for Gemma 3; so the token ids trained on are exactly those seen at inference.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import loop
from .examples import TuningExample
from .loop import LORA_TARGETS, TrainingSettings, TuningLog

__all__ = ["LORA_TARGETS", "TrainingSettings", "TuningLog", "Tokenizer", "load_model", "model_file", "tune"]


def model_file(model: str) -> str:
    from ..backends.llamacpp import resolve_model_path

    return resolve_model_path(model)


def load_model(path: str, device: str = "cpu", adapter: Optional[str] = None):
    """The model in float32 for tuning, through the package's one loader (``backends.weights``); with ``adapter``
    (a GGUF LoRA file or a peft folder) a peft model whose LoRA weights are tuned further."""
    from ..backends.weights import load_causal_lm, resolve_device

    return load_causal_lm(path, adapter, "float32", resolve_device(device), merge=False, trainable=True)


class Tokenizer:
    """The model file's own tokenizer (``backends.vocab``: the ids llama.cpp and the torch engine both use)."""

    def __init__(self, path: str):
        from ..backends.vocab import vocab_of

        self._vocab = vocab_of(path)

    def prompt(self, text: str) -> List[int]:
        return self._vocab.tokenize(text)  # as the backend tokenizes prompts

    def completion(self, text: str) -> List[int]:
        return self._vocab.tokenize(text, bos=False)

    def close(self):
        pass


def tune(
    model,
    tokenizer: Tokenizer,
    examples: Sequence[TuningExample],
    settings: TrainingSettings,
    progress: Optional[Callable[[TuningLog], None]] = None,
):
    """LoRA-tunes ``model`` on the examples (their prompts and answers as token ids) with the package's one loop;
    returns (peft model, log)."""
    ids = [(tokenizer.prompt(ex.prompt), tokenizer.completion(ex.answer), ex.dataset) for ex in examples]
    return loop.tune(model, ids, settings, progress=progress)


def write_log(path: Path, log: TuningLog, settings: TrainingSettings, **extra) -> None:
    path.write_text(json.dumps({"log": asdict(log), "settings": asdict(settings), **extra}, indent=2))
