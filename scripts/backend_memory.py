"""Resident memory while llama.cpp backends are created and dropped one after another (each runs a generation
and a scoring call). Flat when a backend's contexts are freed with it; growing ~0.9 GB a backend when they leak.

    python scripts/backend_memory.py [--backends 6]
"""

import argparse
import gc

from spacy_llmner.backends.llamacpp import LlamaCppBackend
from spacy_llmner.ty import GenerationRequest, ScoreRequest


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", type=int, default=6, help="backends created and dropped one after another")
    args = ap.parse_args()
    for i in range(args.backends):
        b = LlamaCppBackend()
        b.generate([GenerationRequest("The capital of France is", max_tokens=3)])
        b.score([ScoreRequest("The capital of France is", (" Paris", " Rome"))])
        del b
        gc.collect()
        print(f"backend {i + 1}: RSS {rss():.2f} GB", flush=True)


if __name__ == "__main__":
    main()
