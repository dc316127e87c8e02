#!/usr/bin/env bash
# Time to resume a stream whose decode worker fails (issue 18's figure): `tandem up --decode 2`,
# STREAMS concurrent greedy streams of 200 tokens (ignore_eos), run once undisturbed, then again
# while SIGNAL (KILL or STOP) hits one decode worker 1.5 s in. For each stream (those on the other
# worker show no long gap): the longest gap between two chunks (the failure's detection plus the re-prefill
# of the prompt and the tokens already sent), and whether its text equals the undisturbed run.
# Environment: SIGNAL (KILL), STREAMS (4), OUT (folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --quiet --release --locked -p tandem-cli
SIGNAL=${SIGNAL:-KILL}
STREAMS=${STREAMS:-4}
OUT=${OUT:-target/bench-failover}
mkdir -p "$OUT"
# shellcheck source=scripts/up-background.sh
source scripts/up-background.sh
start_cluster "$OUT" --decode 2 --worker-threads 1
python3 - "$URL" "$SIGNAL" "$STREAMS" <<'PY'
import http.client, json, os, re, signal, subprocess, sys, threading, time, urllib.parse
url, sig, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
u = urllib.parse.urlparse(url)
import urllib.request
model = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]

def run(i, out):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": 200,
            "ignore_eos": True, "temperature": 0, "stream": True}
    c.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    text, times, err, buf = "", [], False, b""
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        p = line[6:]
        if p == b"[DONE]":
            break
        e = json.loads(p)
        if "error" in e:
            err = True
            continue
        times.append(time.monotonic())
        text += e["choices"][0].get("text", "")
    out[i] = (text, times, err)

def batch():
    out = [None] * n
    ts = [threading.Thread(target=run, args=(i, out)) for i in range(n)]
    for t in ts: t.start()
    return ts, out

ts, base = batch()
for t in ts: t.join()
# The decode workers' pids, from /proc: children of `tandem up` running decode-worker.
def decode_pids():
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"decode-worker" in cmd:
                pids.append(int(d))
    return pids
ts, hit = batch()
time.sleep(1.5)
pids = decode_pids()
victim = pids[0]
t_kill = time.monotonic()
os.kill(victim, getattr(signal, "SIG" + sig))
for t in ts: t.join()
if sig == "STOP":
    os.kill(victim, signal.SIGCONT)
for i in range(n):
    text, times, err = hit[i]
    gaps = [b - a for a, b in zip(times, times[1:])]
    g = max(gaps) if gaps else 0
    after = [t for t in times if t > t_kill]
    resume = (after[0] - t_kill) if after else float("nan")
    same = text == base[i][0]
    print(f"stream {i}: {len(times)} chunks, longest gap {g*1000:.0f} ms, first chunk {resume*1000:.0f} ms after the signal, error chunk {err}, equal to undisturbed {same}")
PY
