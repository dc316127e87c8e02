#!/usr/bin/env python3
"""Serving figures for BENCHMARKS.md: TTFT and ITL through `tandem up` (1 prefill + 1 decode worker)
at 1 and 16 concurrent streams, beside `tandem generate` on prompts of the same length in the same
script, and the share of TTFT spent in the KV transfer (from the gateway's /metrics, which carry the
prefill workers' own timings). With --compare: the same two worker processes once split into
prefill and decode and once as two aggregated workers, on the three named workloads, with goodput at
the stated TTFT and ITL objectives.
Usage: scripts/bench_serving.py [--requests N] [--transport tcp|shm] [--compare]
B=path/to/tandem picks the binary (default: target/release/tandem)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("B") or os.path.join(ROOT, "target", "release", "tandem")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
ISL, OSL = 128, 64


def metrics(url):
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def find(obj, key):
    """The first value under `key` anywhere in a JSON tree."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            r = find(v, key)
            if r is not None:
                return r
    return None


def start(extra):
    return subprocess.Popen([BIN, "up", "--port", "0", "--json", "--model", MODEL] + extra,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def holder(obj, key):
    """The first dict anywhere in a JSON tree that has `key`."""
    if isinstance(obj, dict):
        if key in obj:
            return obj
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            r = holder(v, key)
            if r is not None:
                return r
    return None


def serve(concurrency, requests, transport):
    up = subprocess.Popen([BIN, "up", "--port", "0", "--json", "--model", MODEL,
                           "--transport", transport],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = json.loads(up.stdout.readline())
        url = ready["url"]
        before = metrics(url)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([BIN, "bench", "--url", url, "--model", ready["model"], "--api",
                            "completions", "--isl", str(ISL), "--osl", str(OSL), "--concurrency",
                            str(concurrency), "--requests", str(requests), "--warmup", "2",
                            "--tokenizer", MODEL, "--quiet", "--json", out.name],
                           check=True, stdout=subprocess.DEVNULL)
            summary = json.load(open(out.name))
        after = metrics(url)
    finally:
        up.terminate()
        up.wait(timeout=30)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "ttft_p50_ms": find(summary, "ttft_ms")["p50"],
        "itl_p50_ms": find(summary, "itl_ms")["p50"],
        "tokens_per_s": find(summary, "output_token_throughput"),
        "transfer_ms": 1000 * d["tandem_kv_transfer_seconds_sum"] / d["tandem_kv_transfer_seconds_count"],
        "overlap_ms": 1000 * d["tandem_kv_transfer_overlap_seconds_sum"] / d["tandem_kv_transfer_overlap_seconds_count"],
        "ttft_mean_ms": 1000 * d["tandem_gateway_time_to_first_token_seconds_sum"] / d["tandem_gateway_time_to_first_token_seconds_count"],
    }


def single_process():
    prompt = " ".join(["token"] * (ISL - 1))
    out = subprocess.run([BIN, "generate", "--json", "--model", MODEL, "--prompt", prompt,
                          "--max-tokens", str(OSL), "--ignore-eos"],
                         check=True, capture_output=True, text=True)
    v = json.loads(out.stdout)
    return {"prompt_tokens": v["prompt_tokens"],
            "ttft_ms": 1000 * v["prompt_tokens"] / v["prefill_tokens_per_s"],
            "itl_ms": 1000 / v["decode_tokens_per_s"]}


# Objectives for this 2-core CPU machine and the 135M model, per workload: TTFT and ITL in ms.
SLO = {"chat": (1500, 150), "long-prompt": (4000, 150), "long-answer": (1000, 150)}
SHAPES = {"disaggregated 1P+1D": ["--prefill", "1", "--decode", "1"],
          "aggregated 2x": ["--prefill", "0", "--decode", "0", "--aggregated", "2"]}


def compare(requests, concurrency):
    print(f"same 2 worker processes (1 compute thread each), {requests} requests per run at "
          f"concurrency {concurrency}; goodput = requests/s meeting both objectives")
    for workload, (ttft, itl) in SLO.items():
        for name, shape in SHAPES.items():
            up = start(shape + ["--worker-threads", "1"])
            try:
                ready = json.loads(up.stdout.readline())
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    subprocess.run([BIN, "bench", "--url", ready["url"], "--model", ready["model"],
                                    "--api", "completions", "--workload", workload,
                                    "--concurrency", str(concurrency), "--requests", str(requests),
                                    "--warmup", "2", "--slo-ttft", f"{ttft}ms", "--slo-itl",
                                    f"{itl}ms", "--tokenizer", MODEL, "--quiet", "--json", out.name],
                                   check=True, stdout=subprocess.DEVNULL)
                    summary = json.load(open(out.name))
            finally:
                up.terminate()
                up.wait(timeout=30)
            slo = holder(summary, "goodput_rps")
            ok = holder(summary, "succeeded")
            ttft_d, itl_d = find(summary, "ttft_ms"), find(summary, "itl_ms")
            p50 = lambda d: f"{d['p50']:7.0f}" if d else "      -"
            print(f"{workload:12} {name:20} ok {ok['succeeded']}/{ok['requests']}  "
                  f"TTFT p50 {p50(ttft_d)} ms  ITL p50 {p50(itl_d)} ms  "
                  f"{find(summary, 'output_token_throughput'):6.1f} tok/s  "
                  f"attainment {100 * slo['attainment']:5.1f}% (TTFT {100 * slo['ttft_attainment']:.0f}%, "
                  f"ITL {100 * slo['itl_attainment']:.0f}%)  goodput {slo['goodput_rps']:.3f} req/s  "
                  f"[objectives TTFT {ttft} ms, ITL {itl} ms]", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release -p tandem-cli")
    if a.compare:
        compare(a.requests, a.concurrency)
        return
    ref = single_process()
    print(f"tandem generate (one process, {ref['prompt_tokens']} prompt tokens, {OSL} output): "
          f"TTFT {ref['ttft_ms']:.1f} ms, ITL {ref['itl_ms']:.2f} ms")
    for c in (1, 16):
        r = serve(c, a.requests, a.transport)
        exposed = max(0.0, r["transfer_ms"] - r["overlap_ms"])
        hidden = r["overlap_ms"] / r["transfer_ms"] if r["transfer_ms"] else 0
        print(f"tandem up 1P+1D {a.transport}, concurrency {c:2}: TTFT p50 {r['ttft_p50_ms']:.1f} ms, "
              f"ITL p50 {r['itl_p50_ms']:.2f} ms, {r['tokens_per_s']:.0f} output tokens/s; "
              f"KV transfer window {r['transfer_ms']:.1f} ms (first byte to ack), "
              f"{100 * hidden:.0f}% of it while compute ran; exposed after compute "
              f"{exposed:.2f} ms = {100 * exposed / r['ttft_mean_ms']:.2f}% of mean TTFT "
              f"{r['ttft_mean_ms']:.1f} ms")


if __name__ == "__main__":
    main()
