"""Live migration figures (BENCHMARKS.md, "Migration"), driven against a running `tandem up`
cluster with two decode workers whose log goes to UP_LOG:

1. one stream per prompt length (256, 1,024, 2,048 tokens; REPEAT times each, default 3), its decode worker drained (SIGTERM) mid-stream: the KV it moved,
   the copy and the pause the worker logged, the stream's usual gap between tokens and its largest
   one around the move (goal: under twice the usual), beside its largest one elsewhere;
2. STREAMS (default 16) streams at once, the decode worker running the most of them drained: how
   long it took to exit, and whether every stream ended with all its tokens.

Usage: bench_migrate.py URL ROUTER UP_LOG TANDEM_BINARY
"""
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

URL, ROUTER, UP_LOG, TANDEM = sys.argv[1:5]
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M: 30 layers, K and V, 3 heads of 64, f32


def model():
    u = urllib.parse.urlparse(URL)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    c.request("GET", "/v1/models")
    return json.loads(c.getresponse().read())["data"][0]["id"]


MODEL = model()


def stream(prompt, max_tokens, out):
    """Streams a completion; appends (arrival time, tokens) per event to out['chunks']."""
    u = urllib.parse.urlparse(URL)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    c.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    out["chunks"], out["usage"], out["error"] = [], None, None
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        if "error" in d:
            out["error"] = d["error"]
        if d.get("usage"):
            out["usage"] = d["usage"]["completion_tokens"]
        if d.get("choices"):
            out["chunks"].append(time.monotonic())
    out["status"] = r.status


def workers():
    out = subprocess.run([TANDEM, "workers", "--router", ROUTER, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def busiest_decode():
    ds = [w for w in workers() if w["role"] == "decode" and w["state"] == "ready"]
    return max(ds, key=lambda w: w["running"])


def wait_decodes_ready(n=2, within=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if sum(1 for w in workers() if w["role"] == "decode" and w["state"] == "ready") >= n:
            return
        time.sleep(0.2)
    raise SystemExit("decode workers not ready")


def exited(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def log_size():
    return os.path.getsize(UP_LOG)


def migrated_lines(since):
    with open(UP_LOG, errors="replace") as f:
        f.seek(since)
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
    return [l for l in text.splitlines() if "sequence migrated" in l]


def dur_ms(s):
    m = re.match(r"([0-9.]+)(ns|µs|us|ms|s)$", s)
    v, u = float(m.group(1)), m.group(2)
    return v * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[u]


print("prompt  KV moved      copy ms  pause ms  GB/s (copy+pause)  usual gap ms  gap at the move ms  ratio  largest elsewhere ms")
def one(tokens):
    wait_decodes_ready()
    prompt = [1000 + (i * 7) % 20000 for i in range(tokens)]
    out = {}
    t = threading.Thread(target=stream, args=(prompt, 300, out))
    t.start()
    t_start = time.monotonic()
    while not out.get("chunks") or len(out["chunks"]) < 40:
        if time.monotonic() - t_start > 120:
            raise SystemExit(f"{tokens}-token prompt: no 40 tokens within 120 s")
        time.sleep(0.05)
    victim = busiest_decode()
    since = log_size()
    t_kill = time.monotonic()
    os.kill(victim["pid"], signal.SIGTERM)
    t.join()
    lines = migrated_lines(since)
    pairs = list(zip(out["chunks"], out["chunks"][1:]))
    usual = statistics.median(b - a for a, b in pairs) * 1e3
    # The gaps from the signal to 2 s after it hold the move; the others are the host's own.
    near = [b - a for a, b in pairs if b > t_kill and a < t_kill + 2]
    far = [b - a for a, b in pairs if not (b > t_kill and a < t_kill + 2)]
    at_move = max(near) * 1e3
    elsewhere = max(far) * 1e3
    if not lines or out["usage"] != 300:
        print(f"{tokens:6}  not migrated (usage {out['usage']}, error {out['error']})")
        return None
    f = dict(re.findall(r"(\w+)=(\S+)", lines[-1]))
    kv = int(f["kv_tokens"])
    copy, pause = dur_ms(f["copy"]), dur_ms(f["pause"])
    gbps = kv * KV_BYTES_PER_TOKEN / ((copy + pause) / 1e3) / 1e9
    print(f"{tokens:6}  {kv:5} tokens  {copy:8.1f}  {pause:8.1f}  {gbps:17.2f}  {usual:12.1f}  {at_move:18.1f}  {at_move / usual:5.2f}  {elsewhere:20.1f}")
    return at_move / usual, gbps


REPEAT = int(os.environ.get("REPEAT", "3"))
summary = []
for tokens in (256, 1024, 2048):
    runs = [r for r in (one(tokens) for _ in range(REPEAT)) if r]
    if runs:
        summary.append((tokens, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
for tokens, ratio, gbps in summary:
    print(f"{tokens}-token prompt, median of {REPEAT}: gap at the move {ratio:.2f}x the usual gap, {gbps:.2f} GB/s")

wait_decodes_ready()
STREAMS = int(os.environ.get("STREAMS", "16"))
outs = [{} for _ in range(STREAMS)]
threads = [threading.Thread(target=stream, args=(f"Story {i}: once upon a time", 400, o))
           for i, o in enumerate(outs)]
for t in threads:
    t.start()
t_start = time.monotonic()
while min(len(o.get("chunks") or []) for o in outs) < 20:
    if time.monotonic() - t_start > 120:
        raise SystemExit(f"{STREAMS} streams: no 20 tokens each within 120 s")
    time.sleep(0.05)
victim = busiest_decode()
since = log_size()
t0 = time.monotonic()
os.kill(victim["pid"], signal.SIGTERM)
while not exited(victim["pid"]):
    time.sleep(0.005)
took = time.monotonic() - t0
for t in threads:
    t.join()
ok = sum(1 for o in outs if o["usage"] == 400 and not o["error"] and o["status"] == 200)
moved = len(migrated_lines(since))
print(f"\ndrain of a decode worker running {victim['running']} sequences: exited {took * 1e3:.0f} ms "
      f"after SIGTERM, {moved} sequences migrated; {ok} of {STREAMS} streams ended with all 400 tokens")
