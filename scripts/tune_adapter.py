"""LoRA-tunes Gemma 3 270M (a GGUF file) on token-id examples, with torch, transformers and peft alone.

    python scripts/tune_adapter.py --model MODEL.gguf --data training/adapter/ner-v1.npz --out training/adapter/ner-v1

The examples come from ``spacy-llmner finetune-data`` (llama.cpp token ids of the component's own prompts and gold
answers), so this script needs neither spaCy nor llama.cpp and runs as is on a GPU machine (``--device cuda``,
the default when one is present) or, slowly, on the CPU. Weights: the GGUF tensors dequantized with gguf-py into
the transformers model described by ``gemma3_config.json`` (norm weights stored +1 by llama.cpp's converter are
shifted back), so no transformers GGUF support is needed and the base weights trained against are exactly those
llama.cpp serves. Before training, the mean answer loss of the first examples is checked against the value stored
by ``finetune-data`` (a wrong load stops here). Micro-batches are right-padded (causal attention: a real token
never sees padding); the loss is the mean over each example's answer tokens, averaged over examples, and the LM head
runs only on the positions that predict answer tokens. Writes ``adapter/`` (peft's safetensors + config) at each
``--checkpoints`` fraction (``ckpt-<fraction>/``) and ``tuning.json`` (settings, data, loss curve, seconds).

Resumable: every ``--save-every`` steps, and when ``--max-minutes`` stops it, the training state (LoRA weights in
float32, optimizer, schedule, random state, losses, step) goes to ``<out>/resume.pt`` (written to a temporary file,
then renamed: a run killed while saving keeps the previous state). Run the same command again and it continues from
that step, with the same result as a run never stopped (the plan of steps is seeded); a state written with other
training settings is refused (``--fresh`` starts over).
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the base GGUF (Gemma 3 270M)")
    ap.add_argument("--data", nargs="+", required=True, help=".npz files of finetune-data")
    ap.add_argument("--exclude", nargs="*", default=[], help="datasets left out (leave-one-domain-out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=float, default=0.05, help="share of the optimizer steps")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    ap.add_argument("--micro-tokens", type=int, default=12288, help="padded tokens per forward pass at most")
    ap.add_argument("--max-tokens", type=int, default=1536, help="longer examples are skipped")
    ap.add_argument("--checkpoints", default="1.0", help="comma-separated fractions of training to save at")
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) when training takes longer")
    ap.add_argument("--save-every", type=int, default=50, help="steps between resumable states (<out>/resume.pt)")
    ap.add_argument("--fresh", action="store_true", help="ignore <out>/resume.pt and start over")
    ap.add_argument("--check-only", action="store_true", help="print the reference loss and exit")
    ap.add_argument("--dry-run", action="store_true", help="print the examples and the plan and exit (no model)")
    ap.add_argument("--expect-loss", type=float, default=None, help="stop unless the reference loss is this")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def load_examples(paths, exclude=(), max_tokens=None):
    """[(prompt ids, answer ids, dataset name)], in file order."""
    out = []
    for path in paths:
        d = np.load(path)
        names = [str(n) for n in d["datasets"]]
        tokens, start, n_p, n_a, ds = d["tokens"], d["start"], d["n_prompt"], d["n_answer"], d["dataset"]
        for i in range(len(start)):
            name = names[ds[i]]
            if name in exclude or (max_tokens and n_p[i] + n_a[i] > max_tokens):
                continue
            s = int(start[i])
            out.append((tokens[s : s + n_p[i]], tokens[s + n_p[i] : s + n_p[i] + n_a[i]], name))
    return out


def load_model(gguf_path: str):
    """The GGUF's tensors dequantized into a float32 transformers model, through the package's one loader."""
    from spacy_llmner.backends.weights import load_causal_lm

    return load_causal_lm(gguf_path, None, "float32")


def batch_loss(model, batch, device, softcap):
    """Mean over examples of the mean answer-token cross-entropy; one right-padded forward pass."""
    import torch
    import torch.nn.functional as F

    length = max(len(p) + len(a) for p, a, _ in batch)
    ids = torch.zeros((len(batch), length), dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for i, (p, a, _) in enumerate(batch):
        seq = np.concatenate([p, a])
        ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        for j in range(len(a)):
            rows.append(i)
            cols.append(len(p) - 1 + j)  # the position whose output predicts answer token j
            targets.append(int(a[j]))
            owner.append(i)
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=ids.to(device)).last_hidden_state
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = base.get_output_embeddings()(picked).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    tok_loss = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    owner_t = torch.tensor(owner, device=device)
    per_example = torch.zeros(len(batch), device=device).index_add_(0, owner_t, tok_loss)
    counts = torch.bincount(owner_t, minlength=len(batch)).clamp(min=1)
    return (per_example / counts).mean()


def micro_batches(batch, micro_tokens):
    """Splits one optimizer step's examples into forward passes of at most ``micro_tokens`` padded tokens."""
    out, cur, longest = [], [], 0
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


def steps(examples, batch, epochs, seed):
    """Optimizer steps as lists of examples: an epoch is a seeded shuffle; fractional epochs are cut."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    stream = []
    while len(stream) < int(round(len(examples) * epochs)):
        rng.shuffle(order)
        stream.extend(order)
    stream = stream[: int(round(len(examples) * epochs))]
    return [[examples[i] for i in stream[k : k + batch]] for k in range(0, len(stream), batch)]


def reference_loss(model, examples, device, softcap, n=8):
    import torch

    model.eval()
    with torch.no_grad():
        return float(batch_loss(model, examples[:n], device, softcap))


def save(model, folder: Path) -> None:
    """The LoRA weights in float16 (safetensors, peft's names) and peft's adapter_config.json."""
    from spacy_llmner.backends.weights import save_peft

    save_peft(model, folder)


# the settings a resumed run must share with the stopped one (the others: when to save or stop, where to run)
RESUME_SETTINGS = (
    "model", "data", "exclude", "r", "alpha", "dropout", "lr", "weight_decay", "warmup", "epochs", "batch",
    "micro_tokens", "max_tokens", "max_steps", "bf16", "seed",
)  # fmt: skip


def resume_settings(args) -> dict:
    return {k: [str(x) for x in v] if isinstance(v, list) else v for k, v in vars(args).items() if k in RESUME_SETTINGS}


def save_state(path: Path, model, opt, sched, step: int, losses, seconds: float, args) -> None:
    """The training state after ``step`` (see the module's docstring), replacing ``path`` only once written."""
    import torch
    from peft import get_peft_model_state_dict

    state = {
        "step": step,
        "losses": list(losses),
        "seconds": seconds,
        "settings": resume_settings(args),
        "lora": {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, args):
    """The state at ``path`` (None where there is none, or with --fresh). Exits naming the settings that differ when
    another run wrote it: checked before the model is loaded."""
    import torch

    if args.fresh or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    now = resume_settings(args)
    differ = sorted(k for k in set(now) | set(state["settings"]) if now.get(k) != state["settings"].get(k))
    if differ:
        sys.exit(
            f"tune_adapter: {path} was written with other settings ({', '.join(differ)}): run with those, "
            "or pass --fresh to start over, or choose another --out"
        )
    return state


def restore(state, model, opt, sched, device: str):
    """Loads a state into model, optimizer and schedule: (step, losses, seconds) it reached; (0, [], 0.0) for None."""
    import torch
    from peft import set_peft_model_state_dict

    if state is None:
        return 0, [], 0.0
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in state["lora"].items()})
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["losses"], state["seconds"]


def dry_run(args) -> None:
    """The examples and the training plan as JSON, without torch or the model (checks arguments and data)."""
    examples = load_examples(args.data, set(args.exclude), args.max_tokens)
    plan = steps(examples, args.batch, args.epochs, args.seed)[: args.max_steps or None]
    saves = sorted({max(1, math.ceil(float(f) * len(plan))) for f in args.checkpoints.split(",")})
    by_dataset = {}
    for _, _, name in examples:
        by_dataset[name] = by_dataset.get(name, 0) + 1
    micro = [len(micro_batches(batch, args.micro_tokens)) for batch in plan]
    print(
        json.dumps(
            {
                "examples": len(examples),
                "examples_by_dataset": by_dataset,
                "steps": len(plan),
                "forward_passes": sum(micro),
                "checkpoints": [f"ckpt-{step / len(plan):.2f}" for step in saves] if plan else [],
                "out": args.out,
            }
        )
    )


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    if not os.path.isfile(args.model):  # a packaged model's short name (needs spacy_llmner installed)
        from spacy_llmner.backends.llamacpp import resolve_model_path

        args.model = resolve_model_path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state = load_state(out / "resume.pt", args)
    examples = load_examples(args.data, set(args.exclude), args.max_tokens)
    model = load_model(args.model)
    softcap = model.config.to_dict().get("final_logit_softcapping")
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
    ).to(device)
    t_load = time.perf_counter() - t0
    probe = load_examples(args.data[:1], (), args.max_tokens)  # the same first examples whatever is excluded
    ref = reference_loss(model, probe, device, softcap)
    print(f"tune_adapter: {len(examples)} examples, reference loss {ref:.4f}, load {t_load:.0f} s", flush=True)
    if args.check_only:
        return
    if args.expect_loss is not None and abs(ref - args.expect_loss) > 0.01:
        sys.exit(f"tune_adapter: reference loss {ref:.4f}, expected {args.expect_loss:.4f}: the model loaded wrongly")
    plan = steps(examples, args.batch, args.epochs, args.seed)
    if args.max_steps:
        plan = plan[: args.max_steps]
    saves = sorted({max(1, math.ceil(float(f) * len(plan))) for f in args.checkpoints.split(",")})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(args.warmup * len(plan))), len(plan))
    done, losses, before = restore(state, model, opt, sched, device)
    if done:
        print(f"tune_adapter: resumed after step {done}/{len(plan)} ({out / 'resume.pt'})", flush=True)
    model.train()
    t1 = time.perf_counter()
    for step, batch in enumerate(plan, 1):
        if step <= done:
            continue
        total = 0.0
        for micro in micro_batches(batch, args.micro_tokens):
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                loss = batch_loss(model, micro, device, softcap) * len(micro) / len(batch)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(total, 4))
        if step % 50 == 0 or step == len(plan):
            recent = losses[-50:]
            print(
                f"tune_adapter: step {step}/{len(plan)} loss {sum(recent) / len(recent):.4f} "
                f"{time.perf_counter() - t1:.0f} s",
                flush=True,
            )
        late = args.max_minutes is not None and time.perf_counter() - t1 > 60 * args.max_minutes
        if step in saves or late:
            save(model, out / f"ckpt-{step / len(plan):.2f}")
        if step % args.save_every == 0 or step == len(plan) or late:
            save_state(out / "resume.pt", model, opt, sched, step, losses, before + time.perf_counter() - t1, args)
        if late:
            print(f"tune_adapter: stopped after {args.max_minutes} minutes, step {step}/{len(plan)}", flush=True)
            break
    seconds = before + time.perf_counter() - t1
    model.eval()
    final = reference_loss(model, probe, device, softcap)
    by_dataset = {}
    for _, _, name in examples:
        by_dataset[name] = by_dataset.get(name, 0) + 1
    log = {
        "settings": vars(args),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "examples": len(examples),
        "examples_by_dataset": by_dataset,
        "steps": len(plan),
        "steps_done": len(losses),
        "resumed_after_step": done,
        "reference_loss": {"before": round(ref, 4), "after": round(final, 4)},
        "seconds": {"load": round(t_load, 1), "train": round(seconds, 1)},
        "checkpoints": sorted(p.name for p in out.glob("ckpt-*")),
        "losses": losses,
    }
    (out / "tuning.json").write_text(json.dumps(log, indent=1))
    what = "done" if len(losses) == len(plan) else "stopped"
    print(f"tune_adapter: {what}, {len(losses)}/{len(plan)} steps in {seconds:.0f} s; loss {ref:.4f} -> {final:.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
