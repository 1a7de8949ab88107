"""Tuned models and adapters against the base model, measured in one run on the same sentences: F1 and speed.

The same retrieval pipeline (configs/retrieval.cfg: span retrieval, lines format, constrained decoding; --k
demonstrations, the domain's train split as the pool) is built per system; each annotates the first --n sentences
(0: all) of --split of each domain one at a time, the systems in alternating order (a, b, b, a, ...), so none gets
a quieter CPU. A system is NAME=MODEL or NAME=MODEL+ADAPTER (ADAPTER: a shipped name, a GGUF LoRA path, or none),
optionally followed by @ENGINE (llama.cpp or torch: the backend's greedy decoder, with its default batch).
--lower lower-cases the sentences and the pool (offsets unchanged). Reports per domain and averaged: strict F1,
P, R, median seconds per sentence, prompt / generated tokens per sentence, answers cut by their token limit.

    python benchmarks/finetune.py --system base=gemma3-270m+none --system ner-v1=gemma3-270m+ner-v1 --n 100
    python benchmarks/finetune.py --system tuned=training/finetuned/model.gguf --k 8 --split dev --lower
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import spacy
from spacy.scorer import get_ner_prf
from spacy.tokens import Doc, Span
from spacy.training import Example

from spacy_llmner.backends.cache import CachedBackend
from spacy_llmner.backends.llamacpp import LlamaCppBackend
from spacy_llmner.corpora import unannotated

from common import CROSSNER_LABELS, load_split


def pipeline(system, labels, pool, k, encoder=None, cache=None, demonstrations=None, parallel=None, dtype=None):
    system, _, engine = system.partition("@")
    model, _, adapter = system.partition("+")
    config = spacy.util.load_config("configs/retrieval.cfg")
    config["components"]["llm_lar_ner"]["backend"]["model"] = model
    if engine:
        config["components"]["llm_lar_ner"]["backend"]["engine"] = engine
        config["components"]["llm_lar_ner"]["backend"]["parallel"] = parallel
    config["components"]["llm_lar_ner"]["backend"]["adapter"] = (adapter or "auto") if adapter != "none" else None
    config["components"]["llm_lar_ner"]["cache_path"] = cache
    if dtype:  # the torch engine's precision ("auto", the default: int8 products on a CPU)
        config["components"]["llm_lar_ner"]["backend"]["dtype"] = dtype
    if demonstrations:  # the torch engine's reading of them ("parallel", the default, or "sequential")
        config["components"]["llm_lar_ner"]["backend"]["demonstrations"] = demonstrations
    nlp = spacy.util.load_model_from_config(config, auto_fill=True)
    ner = nlp.get_pipe("llm_lar_ner")
    ner.retriever.k = k
    if encoder is not None:
        ner.retriever.encoder = encoder
    ner.initialize(pool=pool, labels=labels)
    return nlp


def run_domain(args, domain, models):
    blank = spacy.blank("en")
    train = load_split(args.data, domain, "train", blank)
    gold = load_split(args.data, domain, args.split, blank, limit=args.n or None)
    if args.lower:
        train, gold = [lowered(d) for d in train], [lowered(d) for d in gold]
    labels = CROSSNER_LABELS[domain].split()
    systems, encoder = {}, None
    for name, model in models.items():
        systems[name] = pipeline(
            model, labels, train, args.k, encoder, args.cache, args.demonstrations, args.parallel, args.dtype
        )
        encoder = systems[name].get_pipe("llm_lar_ner").retriever.encoder
        systems[name]("Warm-up sentence .")  # load the model outside the timing
    seconds = {k: [] for k in systems}
    preds = {k: [] for k in systems}
    compute = {}
    if args.batched:  # throughput: nlp.pipe over the split, one system after the other
        for name, nlp in systems.items():
            docs = [unannotated(g, nlp.vocab) for g in gold]
            before = decoder_usage(nlp)
            t0 = time.perf_counter()
            preds[name] = list(nlp.pipe(docs, batch_size=args.batch_size))
            seconds[name] = [(time.perf_counter() - t0) / len(gold)] * len(gold)
            after = decoder_usage(nlp)
            if after is not None:  # the embedded decoders count what they evaluated
                used = {k: after[k] - before.get(k, 0) for k in after}
                compute[name] = {f"engine_{k}_per_sentence": v / len(gold) for k, v in used.items()}
                compute[name]["achieved_gflops"] = used.get("gflop", 0) / sum(seconds[name])
    for i, g in enumerate(gold if not args.batched else []):
        for name in list(systems) if i % 2 == 0 else list(reversed(systems)):
            nlp = systems[name]
            doc = unannotated(g, nlp.vocab)
            t0 = time.perf_counter()
            preds[name].append(nlp(doc))
            seconds[name].append(time.perf_counter() - t0)
    out = {}
    for name in systems:
        usage = [d._.llm_ner_usage["llm_lar_ner"] for d in preds[name]]
        prf = get_ner_prf([Example(p, g) for p, g in zip(preds[name], gold)])
        out[name] = {
            "sentences": len(gold),
            "f1": 100 * prf["ents_f"],
            "p": 100 * prf["ents_p"],
            "r": 100 * prf["ents_r"],
            "median_seconds": statistics.median(seconds[name]),
            "sentences_per_second": len(gold) / sum(seconds[name]),
            "prompt_tokens_per_sentence": sum(u["prompt_tokens"] for u in usage) / len(gold),
            "completion_tokens_per_sentence": sum(u["completion_tokens"] for u in usage) / len(gold),
            "calls_per_sentence": sum(u["calls"] for u in usage) / len(gold),
            # answers cut by their token limit (max_new_tokens; the default scales with the chunk): must be 0
            "truncated_answers": sum(u.get("truncated", 0) for u in usage),
            **compute.get(name, {}),
        }
        print(f"  {domain} {name}: F1 {out[name]['f1']:.1f}, median {out[name]['median_seconds']:.2f} s", flush=True)
    return out


def decoder_usage(nlp):
    """The embedded decoder's counters (tokens evaluated, head rows, GFLOP), or None for other backends."""
    backend = nlp.get_pipe("llm_lar_ner").backend
    if isinstance(backend, CachedBackend):
        backend = backend.backend
    return backend.compute_usage() if isinstance(backend, LlamaCppBackend) else None


def peak_gflops(threads: int) -> dict:
    """The machine's matrix-product peak on these threads (torch, the body's largest shape, 256 rows): for each
    precision the best of three runs of up to ~1 s each. Runs are bounded by time, not a count of calls: without
    bfloat16 units (AVX2 only) one bfloat16 call takes ~0.07 s, and a fixed count took minutes."""
    import torch

    from spacy_llmner.backends.torch_model import Int8Linear, SharedInput
    from spacy_llmner.backends.weights import int8_kernel

    torch.set_num_threads(threads)
    shape = 2 * 256 * 640 * 4096  # multiply-adds × 2 of one call
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, w = torch.randn(256, 640, dtype=dtype), torch.randn(2048 * 2, 640, dtype=dtype)
        out[str(dtype).split(".")[1]] = shape / best_call_seconds(lambda a=a, w=w: a @ w.T) / 1e9
    # int8 (GOP/s): the engine's int8 layer with the kernel `dtype = "int8"` takes on this CPU, the input quantized
    # once (held by identity)
    layer = Int8Linear(torch.nn.Linear(640, 4096, bias=False), SharedInput(torch.ones(640), int8_kernel()))
    x = torch.randn(256, 640)
    with torch.inference_mode():
        out["int8"] = shape / best_call_seconds(lambda: layer(x)) / 1e9
    return out


def best_call_seconds(call, runs: int = 3, seconds: float = 1.0, most: int = 600) -> float:
    """Seconds per call of ``call``: the best of ``runs`` runs, each of up to ``most`` calls or until ``seconds``
    have passed (after one call to warm up)."""
    call()
    best = float("inf")
    for _ in range(runs):
        calls, t0 = 0, time.perf_counter()
        while calls < most and time.perf_counter() - t0 < seconds:
            call()
            calls += 1
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def lowered(doc: Doc) -> Doc:
    """The doc with lower-cased words and the same entities (by token)."""
    out = Doc(doc.vocab, words=[t.text.lower() for t in doc], spaces=[t.whitespace_ for t in doc])
    out.ents = [Span(out, e.start, e.end, label=e.label_) for e in doc.ents]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ap.add_argument("--lower", action="store_true", help="lower-case the sentences and the pool")
    ap.add_argument("--system", action="append", required=True, help="NAME=MODEL or NAME=MODEL+ADAPTER")
    ap.add_argument("--batched", action="store_true", help="nlp.pipe per system (throughput), not one at a time")
    ap.add_argument("--batch-size", type=int, default=64, help="docs per nlp.pipe batch (--batched)")
    ap.add_argument("--cache", default=None, help="an answer cache (sqlite): reruns cost nothing")
    ap.add_argument("--demonstrations", choices=["parallel", "sequential"], help="the torch engine's reading")
    ap.add_argument("--parallel", type=int, default=None, help="sequences decoded together (the engine's default)")
    ap.add_argument("--dtype", default=None, help="the torch engine's precision (its default: auto)")
    ap.add_argument("--out", default="metrics/finetune.json")
    args = ap.parse_args()
    models = dict(s.split("=", 1) for s in args.system)
    result = {"args": vars(args), "domains": {}, "peak_gflops": peak_gflops(2)}
    for domain in args.domains.split(","):
        result["domains"][domain] = run_domain(args, domain, models)
    per = result["domains"].values()
    keys = {m: sorted({key for d in per for key in d[m]}) for m in models}  # counters a domain never hit are 0
    result["average"] = {m: {key: sum(d[m].get(key, 0) for d in per) / len(per) for key in keys[m]} for m in models}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for m, avg in result["average"].items():
        print(f"{m}: F1 {avg['f1']:.1f} (P {avg['p']:.1f}, R {avg['r']:.1f}), {avg['sentences_per_second']:.2f} sent/s")
    print("peak GFLOP/s (2 threads):", {k: round(v) for k, v in result["peak_gflops"].items()})


if __name__ == "__main__":
    main()
