"""The package's one LoRA training loop, used by ``spacy-llmner finetune`` (CPU) and ``scripts/tune_adapter.py``
(a GPU machine, from token files): peft's LoRA on the transformers model of ``backends.weights``, AdamW with a
cosine schedule, gradient clipping, resumable.

- **Examples** are token ids: ``(prompt ids, answer ids, dataset name)``. The loss is the mean cross-entropy over
  each example's answer tokens, averaged over the examples of an optimizer step; the LM head runs only on the
  positions that predict answer tokens (with Gemma's 262k-token vocabulary it would otherwise cost more than the
  body). Examples longer than ``max_tokens`` are left out (counted).
- **Plan**: an epoch is a seeded shuffle, fractional epochs are cut; an optimizer step takes ``accumulate``
  examples, split into right-padded forward passes of at most ``micro_tokens`` padded tokens (causal attention: a
  real token never sees padding).
- **Resumable** (with an ``out`` folder): every ``save_every`` steps, at the last one and when ``max_minutes``
  stops it, the training state (LoRA weights in float32, optimizer, schedule, random state, losses, step) goes to
  ``<out>/resume.pt`` (written to a temporary file, then renamed). A run with the same settings continues from that
  step to the same result as a run never stopped; a state written with other settings is refused, naming them.
  ``checkpoints`` (fractions of the plan) write peft folders ``<out>/ckpt-<fraction>/``.

Nothing here imports spaCy (``tune_adapter.py`` runs where only torch, transformers and peft are installed);
torch and peft are imported on first use.
"""

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Example = Tuple[Sequence[int], Sequence[int], str]  # prompt ids, answer ids, dataset


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
    micro_tokens: int = 2048  # padded tokens per forward pass at most
    epochs: float = 1.0
    max_tokens: int = 1024  # longer examples are left out (counted in the log)
    max_steps: Optional[int] = None  # the plan cut to this many steps (smoke tests)
    max_minutes: Optional[float] = None  # stop early (and still save) when the wall clock says so
    bf16: bool = False  # autocast to bfloat16 (a GPU)
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0


# the settings a resumed run must share with the stopped one (the others say when to stop or where to run)
NOT_RESUME_SETTINGS = ("max_minutes", "device", "threads")


@dataclass
class TuningLog:
    examples: int = 0  # examples trained on (after leaving out the long ones)
    skipped_too_long: int = 0
    steps: int = 0  # optimizer steps planned
    optimizer_steps: int = 0  # done, counting those before a resume
    resumed_after_step: int = 0
    examples_seen: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0  # training, counting the time before a resume
    stopped_early: bool = False
    losses: List[float] = field(default_factory=list)  # mean answer loss per optimizer step


def kept(examples: Sequence[Example], max_tokens: int) -> List[Example]:
    return [ex for ex in examples if len(ex[0]) + len(ex[1]) <= max_tokens]


def plan(examples: Sequence[Example], settings: TrainingSettings) -> List[List[Example]]:
    """The optimizer steps as lists of examples (see the module's docstring)."""
    rng = random.Random(settings.seed)
    order = list(range(len(examples)))
    n = int(round(len(examples) * settings.epochs))
    stream: List[int] = []
    while len(stream) < n:
        rng.shuffle(order)
        stream.extend(order)
    stream = stream[:n]
    steps = [[examples[i] for i in stream[k : k + settings.accumulate]] for k in range(0, n, settings.accumulate)]
    return steps[: settings.max_steps] if settings.max_steps else steps


def micro_batches(batch: Sequence[Example], micro_tokens: int) -> List[List[Example]]:
    """Splits one optimizer step's examples into forward passes of at most ``micro_tokens`` padded tokens."""
    out: List[List[Example]] = []
    cur: List[Example] = []
    longest = 0
    for ex in sorted(batch, key=lambda e: len(e[0]) + len(e[1])):
        n = len(ex[0]) + len(ex[1])
        if cur and max(longest, n) * (len(cur) + 1) > micro_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(ex)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def batch_loss(model, batch: Sequence[Example], device: str):
    """Mean over examples of the mean answer-token cross-entropy; one right-padded forward pass. ``model`` is the
    transformers model (with peft's LoRA layers inside when tuning)."""
    import torch
    import torch.nn.functional as F

    length = max(len(p) + len(a) for p, a, _ in batch)
    ids = torch.zeros((len(batch), length), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (p, a, _) in enumerate(batch):
        seq = np.concatenate([np.asarray(p), np.asarray(a)]).astype(np.int64)
        ids[i, : len(seq)] = torch.from_numpy(seq)
        rows += [i] * len(a)
        cols += range(len(p) - 1, len(p) - 1 + len(a))  # the positions whose outputs predict the answer
        targets += [int(t) for t in a]
    hidden = model.get_decoder()(input_ids=ids.to(device)).last_hidden_state
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = model.get_output_embeddings()(picked).float()
    softcap = model.config.to_dict().get("final_logit_softcapping")
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    tok_loss = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    owner = torch.tensor(rows, device=device)
    per_example = torch.zeros(len(batch), device=device).index_add_(0, owner, tok_loss)
    counts = torch.bincount(owner, minlength=len(batch)).clamp(min=1)
    return (per_example / counts).mean()


def reference_loss(model, examples: Sequence[Example], device: str, n: int = 8) -> float:
    """The loss of the first ``n`` examples, without gradients (a check that the model loaded right)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(batch_loss(model, list(examples[:n]), device))
    model.train(was_training)
    return loss


def resume_settings(settings: TrainingSettings, **identity) -> Dict[str, object]:
    """What a resumed run must share with the stopped one: the training settings and ``identity`` (model, data)."""
    kept_settings = {k: v for k, v in asdict(settings).items() if k not in NOT_RESUME_SETTINGS}
    return {k: [str(x) for x in v] if isinstance(v, list) else v for k, v in {**kept_settings, **identity}.items()}


def load_state(path: Path, identity: Dict[str, object]):
    """The state at ``path`` (None where there is none). Raises ``ValueError`` naming the settings that differ
    when another run wrote it (call before loading the model: it is cheap)."""
    import torch

    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    differ = sorted(k for k in set(identity) | set(state["settings"]) if identity.get(k) != state["settings"].get(k))
    if differ:
        raise ValueError(
            f"{path} was written with other settings ({', '.join(differ)}): run with those, or start over "
            "(--fresh), or choose another output folder"
        )
    return state


def _save_state(path: Path, model, opt, sched, log: TuningLog, identity) -> None:
    import torch
    from peft import get_peft_model_state_dict

    state = {
        "step": log.optimizer_steps,
        "losses": list(log.losses),
        "seconds": log.seconds,
        "settings": identity,
        "lora": {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _restore(state, model, opt, sched, device: str, log: TuningLog) -> None:
    import torch
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: v.to(device) for k, v in state["lora"].items()})
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.optimizer_steps = log.resumed_after_step = state["step"]
    log.losses, log.seconds = list(state["losses"]), state["seconds"]


def tune(
    model,
    examples: Sequence[Example],
    settings: TrainingSettings,
    out: Optional[Path] = None,
    identity: Optional[Dict[str, object]] = None,
    state=None,
    checkpoints: Sequence[float] = (),
    save_every: int = 50,
    progress: Optional[Callable[[TuningLog], None]] = None,
):
    """LoRA-tunes ``model`` (a transformers causal LM, float32) on ``examples``; returns (peft model, log). A peft
    model (``load_causal_lm(..., merge=False, trainable=True)``) has its own LoRA weights tuned further, with their
    rank, scale and targets (``settings``' r, alpha, dropout and targets then go unused).

    With ``out``: the resumable state goes to ``<out>/resume.pt`` (``identity``: what else a resumed run must
    share, e.g. model and data files) and ``state`` (from ``load_state``) is continued; ``checkpoints`` are
    fractions of the plan at which ``<out>/ckpt-<fraction>/`` peft folders are written."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from ..backends.weights import save_peft

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = settings.device
    log = TuningLog()
    train_on = kept(examples, settings.max_tokens)
    log.examples, log.skipped_too_long = len(train_on), len(examples) - len(train_on)
    steps = plan(train_on, settings)
    log.steps = len(steps)
    if isinstance(model, PeftModel):  # an adapter tuned further: its own rank, scale and targets
        tuned = model.to(device)
    else:
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.targets),
            task_type="CAUSAL_LM",
        )
        tuned = get_peft_model(model, config).to(device)
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(settings.warmup * len(steps))), max(1, len(steps)))
    identity = resume_settings(settings, **(identity or {}))
    if state is not None:
        _restore(state, tuned, opt, sched, device, log)
    saves = {max(1, math.ceil(float(f) * len(steps))) for f in checkpoints}
    tuned.train()
    before, t0 = log.seconds, time.perf_counter()
    for step, batch in enumerate(steps, 1):
        if step <= log.resumed_after_step:
            continue
        total = 0.0
        for micro in micro_batches(batch, settings.micro_tokens):
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=settings.bf16):
                loss = batch_loss(model, micro, device) * len(micro) / len(batch)
            loss.backward()
            total += float(loss.detach())
            log.tokens += sum(len(p) + len(a) for p, a, _ in micro)
            log.answer_tokens += sum(len(a) for _, a, _ in micro)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.examples_seen += len(batch)
        log.optimizer_steps = step
        log.losses.append(round(total, 4))
        log.seconds = before + time.perf_counter() - t0
        late = settings.max_minutes is not None and time.perf_counter() - t0 > 60 * settings.max_minutes
        log.stopped_early = late and step < len(steps)
        if out is not None and (step in saves or late):
            save_peft(tuned, Path(out) / f"ckpt-{step / len(steps):.2f}")
        if out is not None and (step % save_every == 0 or step == len(steps) or late):
            _save_state(Path(out) / "resume.pt", tuned, opt, sched, log, identity)
        if progress is not None:
            progress(log)
        if log.stopped_early:
            break
    tuned.eval()
    return tuned, log
