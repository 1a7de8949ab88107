"""LoRA-tunes a GGUF model (Gemma 3 270M) on token-id examples, with torch, transformers and peft alone.

    python scripts/tune_adapter.py --model MODEL.gguf --data training/adapter/ner-v1.npz --out training/adapter/ner-v1

The examples come from ``spacy-llmner finetune-data`` (token ids of the component's own prompts and gold answers),
so this script needs neither spaCy nor llama.cpp and runs as is on a GPU machine (``--device cuda``, the default
when one is present) or, slowly, on the CPU. It is the package's one LoRA loop (``spacy_llmner/finetune/loop.py``,
which ``spacy-llmner finetune`` also runs) with the package's one loader (``backends.weights``). Before training, the
mean answer loss of the first examples is checked against the value stored by ``finetune-data`` (a wrong load stops
here). Writes peft folders at each ``--checkpoints`` fraction (``ckpt-<fraction>/``) and ``tuning.json`` (settings,
data, loss curve, seconds).

Resumable: the loop keeps ``<out>/resume.pt`` (every ``--save-every`` steps and when ``--max-minutes`` stops it). Run
the same command again and it continues from that step, with the same result as a run never stopped; a state
written with other settings is refused before the model loads (``--fresh`` starts over).
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from spacy_llmner.finetune import loop

MICRO_TOKENS = {"cuda": 12288, "cpu": 2048}  # padded tokens per forward pass, by device kind


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
    ap.add_argument(
        "--micro-tokens",
        type=int,
        default=None,
        help=f"padded tokens per forward pass at most (default {MICRO_TOKENS['cuda']} on a GPU, {MICRO_TOKENS['cpu']} "
        "on the CPU: 12288 there held 24 GB when killed)",
    )
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


def settings_of(args, device: str = "cpu") -> "loop.TrainingSettings":
    return loop.TrainingSettings(
        r=args.r,
        alpha=args.alpha,
        lora_dropout=args.dropout,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        accumulate=args.batch,
        micro_tokens=args.micro_tokens or MICRO_TOKENS["cuda" if device.startswith("cuda") else "cpu"],
        epochs=args.epochs,
        max_tokens=args.max_tokens,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=device,
        seed=args.seed,
    )


def identity_of(args) -> dict:
    """What else a resumed run must share with the stopped one."""
    return {"model": args.model, "data": [str(d) for d in args.data], "exclude": list(args.exclude)}


def dry_run(args) -> None:
    """The examples and the training plan as JSON, without torch or the model (checks arguments and data)."""
    settings = settings_of(args)
    examples = load_examples(args.data, set(args.exclude), args.max_tokens)
    steps = loop.plan(examples, settings)
    saves = sorted({max(1, math.ceil(float(f) * len(steps))) for f in args.checkpoints.split(",")})
    by_dataset = {}
    for _, _, name in examples:
        by_dataset[name] = by_dataset.get(name, 0) + 1
    micro = [len(loop.micro_batches(batch, settings.micro_tokens)) for batch in steps]
    print(
        json.dumps(
            {
                "examples": len(examples),
                "examples_by_dataset": by_dataset,
                "steps": len(steps),
                "forward_passes": sum(micro),
                "checkpoints": [f"ckpt-{step / len(steps):.2f}" for step in saves] if steps else [],
                "out": args.out,
            }
        )
    )


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch

    from spacy_llmner.backends.weights import load_causal_lm

    if not os.path.isfile(args.model):  # a packaged model's short name (needs spacy_llmner installed)
        from spacy_llmner.backends.llamacpp import resolve_model_path

        args.model = resolve_model_path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = settings_of(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    identity = identity_of(args)
    try:
        state = None if args.fresh else loop.load_state(out / "resume.pt", loop.resume_settings(settings, **identity))
    except ValueError as e:
        sys.exit(f"tune_adapter: {e}")
    examples = load_examples(args.data, set(args.exclude), args.max_tokens)
    model = load_causal_lm(args.model, None, "float32").to(device)
    t_load = time.perf_counter() - t0
    probe = load_examples(args.data[:1], (), args.max_tokens)  # the same first examples whatever is excluded
    ref = loop.reference_loss(model, probe, device)
    print(f"tune_adapter: {len(examples)} examples, reference loss {ref:.4f}, load {t_load:.0f} s", flush=True)
    if args.check_only:
        return
    if args.expect_loss is not None and abs(ref - args.expect_loss) > 0.01:
        sys.exit(f"tune_adapter: reference loss {ref:.4f}, expected {args.expect_loss:.4f}: the model loaded wrongly")
    if state is not None:
        print(
            f"tune_adapter: resumed after step {state['step']}/{len(loop.plan(examples, settings))} "
            f"({out / 'resume.pt'})",
            flush=True,
        )

    def progress(log):
        step = log.optimizer_steps
        if step % 50 == 0 or step == log.steps:
            recent = log.losses[-50:]
            print(
                f"tune_adapter: step {step}/{log.steps} loss {sum(recent) / len(recent):.4f} {log.seconds:.0f} s",
                flush=True,
            )
        if log.stopped_early:
            print(f"tune_adapter: stopped after {args.max_minutes} minutes, step {step}/{log.steps}", flush=True)

    tuned, log = loop.tune(
        model,
        examples,
        settings,
        out=out,
        identity=identity,
        state=state,
        checkpoints=[float(f) for f in args.checkpoints.split(",")],
        save_every=args.save_every,
        progress=progress,
    )
    final = loop.reference_loss(model, probe, device)
    record = {
        "settings": vars(args),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "examples": len(examples),
        "examples_by_dataset": dict(Counter(name for _, _, name in examples)),
        "steps": log.steps,
        "steps_done": len(log.losses),
        "resumed_after_step": log.resumed_after_step,
        "reference_loss": {"before": round(ref, 4), "after": round(final, 4)},
        "seconds": {"load": round(t_load, 1), "train": round(log.seconds, 1)},
        "checkpoints": sorted(p.name for p in out.glob("ckpt-*")),
        "losses": log.losses,
    }
    (out / "tuning.json").write_text(json.dumps(record, indent=1))
    what = "done" if len(log.losses) == log.steps else "stopped"
    print(
        f"tune_adapter: {what}, {len(log.losses)}/{log.steps} steps in {log.seconds:.0f} s; "
        f"loss {ref:.4f} -> {final:.4f}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
