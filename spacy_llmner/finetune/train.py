"""LoRA instruction tuning of a GGUF model with torch + peft, on CPU or a GPU.

Weights: the package's one loader (``backends.weights.load_causal_lm``: the GGUF dequantized by gguf-py into
transformers' model classes, as the fast engine runs it; Gemma 3 and Llama/SmolLM2). Tokens: the file's own tokenizer
(``backends.vocab``, equal to llama.cpp's), never transformers' GGUF tokenizer conversion, which transformers 4.53.2
gets wrong for Gemma 3; so the token ids trained on are exactly those seen at inference.

The loss is on the answer tokens only, and the LM head runs only on the positions that predict them
(``logits_to_keep``): with Gemma's 262k-token vocabulary the head would otherwise cost more than the body.
"""

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .examples import TuningExample

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainingSettings:
    r: int = 16
    alpha: int = 32
    lora_dropout: float = 0.05
    targets: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # share of the optimizer steps
    accumulate: int = 4  # examples per optimizer step
    epochs: float = 1.0
    max_tokens: int = 1024  # longer examples are skipped (counted in the log)
    max_minutes: Optional[float] = None  # stop early (and still save) when the wall clock says so
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0


def model_file(model: str) -> str:
    from ..backends.llamacpp import resolve_model_path

    return resolve_model_path(model)


def load_model(path: str, device: str = "cpu"):
    """The model in float32 for tuning, through the package's one loader (``backends.weights``)."""
    from ..backends.weights import load_causal_lm, resolve_device

    return load_causal_lm(path, None, "float32", resolve_device(device))


class Tokenizer:
    """The model file's own tokenizer (``backends.vocab``: the ids llama.cpp and the torch engine both use)."""

    def __init__(self, path: str):
        from ..backends.vocab import vocab_of

        self._vocab = vocab_of(path)

    def prompt(self, text: str) -> List[int]:
        return self._vocab.tokenize(text)  # as the backend tokenizes prompts

    def completion(self, text: str) -> List[int]:
        ids = self._vocab.tokenize(text)
        return ids[1:] if self._vocab.add_bos and ids[:1] == [self._vocab.bos] else ids

    def close(self):
        pass


def answer_loss(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], device: str = "cpu"):
    """Mean token cross-entropy of the answer given the prompt (a torch scalar)."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
    logits = model(input_ids=ids, logits_to_keep=len(answer_ids) + 1).logits[0, :-1]
    return F.cross_entropy(logits.float(), torch.tensor(list(answer_ids), device=device))


@dataclass
class TuningLog:
    examples_seen: int = 0
    skipped_too_long: int = 0
    optimizer_steps: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    losses: List[float] = field(default_factory=list)  # mean answer loss per optimizer step


def tune(
    model,
    tokenizer: Tokenizer,
    examples: Sequence[TuningExample],
    settings: TrainingSettings,
    progress: Optional[Callable[[TuningLog], None]] = None,
):
    """LoRA-tunes ``model`` in place on the examples; returns (peft model, log)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    order = list(range(len(examples)))
    rng = random.Random(settings.seed)
    n_examples = int(round(len(examples) * settings.epochs))
    stream: List[int] = []
    while len(stream) < n_examples:
        rng.shuffle(order)
        stream.extend(order)
    stream = stream[:n_examples]
    total_steps = max(1, math.ceil(n_examples / settings.accumulate))
    warmup = max(1, int(settings.warmup * total_steps))
    sched = get_cosine_schedule_with_warmup(opt, warmup, total_steps)
    log = TuningLog()
    t0 = time.perf_counter()
    pending, pending_loss = 0, 0.0
    for i in stream:
        ex = examples[i]
        p, a = tokenizer.prompt(ex.prompt), tokenizer.completion(ex.answer)
        if len(p) + len(a) > settings.max_tokens:
            log.skipped_too_long += 1
            continue
        loss = answer_loss(model, p, a, settings.device)
        (loss / settings.accumulate).backward()
        pending += 1
        pending_loss += loss.item()
        log.examples_seen += 1
        log.tokens += len(p) + len(a)
        log.answer_tokens += len(a)
        if pending == settings.accumulate:
            _step(params, opt, sched, log, pending_loss / pending)
            pending, pending_loss = 0, 0.0
            if progress is not None:
                log.seconds = time.perf_counter() - t0
                progress(log)
        if settings.max_minutes is not None and time.perf_counter() - t0 > 60 * settings.max_minutes:
            log.stopped_early = True
            break
    if pending:
        _step(params, opt, sched, log, pending_loss / pending)
    log.seconds = time.perf_counter() - t0
    model.eval()
    return model, log


def _step(params, opt, sched, log: TuningLog, loss: float) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    log.optimizer_steps += 1
    log.losses.append(round(loss, 4))


def write_log(path: Path, log: TuningLog, settings: TrainingSettings, **extra) -> None:
    path.write_text(json.dumps({"log": asdict(log), "settings": asdict(settings), **extra}, indent=2))
