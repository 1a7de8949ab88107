"""Raw decode-step cost of the embedded model against batch width (tokens/s of parallel sequences).

python benchmarks/decode_steps.py --model gemma3-270m
"""

import argparse
import time

from spacy_llmner.backends.batched import BatchedDecoder
from spacy_llmner.backends.llamacpp import LlamaCppBackend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--widths", default="1,2,4,8,16", help="sequences decoded together (at most 16)")
    args = ap.parse_args()
    llm = LlamaCppBackend(model=args.model).llm
    # 16 sequences (+ the prefix's) of 1,024 positions each: the prefix (~100 tokens) and --steps more
    decoder = BatchedDecoder(llm, n_seq=16, n_ctx_seq=1024)
    lc = decoder.llama_cpp
    prefix = llm.tokenize(b"A shared prompt prefix of a realistic length for the measurement. " * 8)
    decoder.set_prefix(prefix)
    print("| sequences | ms/step | tokens/s |\n|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        for s in range(1, width + 1):
            # between KV streams llama.cpp copies whole sequences only (sequence 0 holds exactly the prefix)
            lc.llama_memory_seq_cp(decoder.memory, 0, s, -1, -1)
        t0 = time.perf_counter()
        for step in range(args.steps):
            decoder.decode_step([(prefix[step], len(prefix) + step, s, True) for s in range(1, width + 1)])
        dt = (time.perf_counter() - t0) / args.steps
        print(f"| {width} | {dt * 1000:.1f} | {width / dt:.0f} |")
        for s in range(1, width + 1):
            lc.llama_memory_seq_rm(decoder.memory, s, -1, -1)
    decoder.close()


if __name__ == "__main__":
    main()
