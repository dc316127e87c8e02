#!/usr/bin/env python3
"""Single-stream decode of our engine against llama.cpp on the same GGUF (issue 5 goal: >= 0.8x).

Each round runs llama.cpp (through llama-cpp-python, in this process, the model loaded once) and
then `tandem generate --json` (a fresh process; its JSON carries its own prefill and decode
timings, model loading excluded) on the same 200-token prompt, greedy, 128 generated tokens, past
EOS, both on the same number of threads. Timings on the llama.cpp side are taken the way `tandem
generate` takes its own: prefill is the prompt's forward pass plus picking the first token; decode
is the 127 forward passes (each with its argmax) that produce the rest. The ratio is the median of
the per-round ratios (ours / llama.cpp), so that a round disturbed by other work on a shared
machine counts once; the throughputs are each side's median.

Usage: bench_llamacpp.py --bin target/release/tandem --model models/X.gguf [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

try:
    import llama_cpp
except ImportError:
    sys.exit("llama-cpp-python is not installed (scripts/bench-llamacpp.sh installs it)")

PROMPT_TOKENS = 200
GEN_TOKENS = 128

# Plain prose, repeated as needed and cut to exactly PROMPT_TOKENS tokens.
TEXT = (
    "The harbour town woke slowly. Fishing boats came in under a grey sky, their crews calling "
    "prices across the water before the nets were even ashore. In the square the baker set out "
    "trays of bread, the postmaster unlocked his shutters, and a schoolteacher crossed toward the "
    "hill with a stack of corrected essays under one arm. Nobody hurried; the tide would turn when "
    "it turned, and the ferry to the mainland never left before the church bell had rung nine. "
)


def make_prompt(llm):
    """Text whose tokenization (no BOS, as `tandem generate` feeds a plain prompt) is 200 tokens."""
    text = TEXT
    while len(llm.tokenize(text.encode(), add_bos=False)) < PROMPT_TOKENS + 20:
        text += TEXT
    ids = llm.tokenize(text.encode(), add_bos=False)[:PROMPT_TOKENS]
    cut = llm.detokenize(ids).decode("utf-8", errors="ignore")
    # Detokenizing and tokenizing again can merge or split at the cut: trim until it is exact.
    while len(llm.tokenize(cut.encode(), add_bos=False)) > PROMPT_TOKENS:
        cut = cut[:-1]
    return cut, llm.tokenize(cut.encode(), add_bos=False)


def llama_round(llm, ids):
    n_vocab = llm.n_vocab()

    def argmax():
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = argmax()
    t1 = time.perf_counter()
    out = [tok]
    # Tokens are fed back by hand, so EOS stops nothing: every round makes GEN_TOKENS tokens.
    for _ in range(GEN_TOKENS - 1):
        llm.eval([tok])
        tok = argmax()
        out.append(tok)
    t2 = time.perf_counter()
    return {
        "prefill_tokens_per_s": len(ids) / (t1 - t0),
        "decode_tokens_per_s": (GEN_TOKENS - 1) / (t2 - t1),
        "tokens": out,
    }


def tandem_round(binary, model, prompt, threads):
    cmd = [binary, "generate", "--model", model, "--prompt", prompt, "--max-tokens",
           str(GEN_TOKENS), "--ignore-eos", "--temperature", "0", "--threads", str(threads), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the tandem binary (a release build)")
    ap.add_argument("--model", required=True, help="the GGUF file both engines load")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    loaded = load > cores - 0.5
    if loaded:
        print(f"warning: load average {load:.1f} on {cores} cores before the run. llama.cpp's OpenMP "
              "workers spin at every barrier and slow down several-fold when their cores are shared "
              "(OMP_WAIT_POLICY=PASSIVE softens it), so figures taken under load do not compare.")
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=512, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, logits_all=False, verbose=False)
    prompt, ids = make_prompt(llm)
    print(f"llama-cpp-python {llama_cpp.__version__}; model {a.model}; {a.threads} threads; "
          f"{len(ids)}-token prompt, {GEN_TOKENS} tokens generated greedily past EOS; {a.rounds} rounds")
    llama_round(llm, ids)  # warm-up: page the weights in, size the buffers
    rows = []
    for r in range(a.rounds):
        lc = llama_round(llm, ids)
        td = tandem_round(a.bin, a.model, prompt, a.threads)
        if td["prompt_tokens"] != len(ids):
            print(f"  note: tandem tokenized the prompt to {td['prompt_tokens']} tokens, llama.cpp to {len(ids)}")
        same = sum(1 for x, y in zip(td["tokens"], lc["tokens"]) if x == y)
        rows.append((lc, td))
        print(f"  round {r + 1}: decode tandem {td['decode_tokens_per_s']:.1f} tok/s, llama.cpp "
              f"{lc['decode_tokens_per_s']:.1f} tok/s, ratio {td['decode_tokens_per_s'] / lc['decode_tokens_per_s']:.3f}; "
              f"prefill tandem {td['prefill_tokens_per_s']:.0f} tok/s, llama.cpp {lc['prefill_tokens_per_s']:.0f} tok/s, "
              f"ratio {td['prefill_tokens_per_s'] / lc['prefill_tokens_per_s']:.3f}; "
              f"greedy tokens equal for {same}/{GEN_TOKENS}")

    def med(side, key):
        return statistics.median(row[side][key] for row in rows)

    def ratio(key):
        return statistics.median(td[key] / lc[key] for lc, td in rows)

    for key, what, goal in [("decode_tokens_per_s", "decode, batch 1", 0.8),
                            ("prefill_tokens_per_s", "prefill, 200-token prompt", None)]:
        r = ratio(key)
        if goal is None:
            verdict = ""
        elif loaded:
            verdict = f" (goal >= {goal}x: not judged, the machine was loaded)"
        else:
            verdict = f" (goal >= {goal}x: {'met' if r >= goal else 'not met'})"
        print(f"{what}: tandem {med(1, key):.1f} tok/s, llama.cpp {med(0, key):.1f} tok/s (medians); "
              f"median per-round ratio {r:.3f}x{verdict}")
    print(f"load average {os.getloadavg()[0]:.1f} on {cores} cores after the run")


if __name__ == "__main__":
    main()
