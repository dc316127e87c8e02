#!/usr/bin/env bash
# Time to resume a stream whose decode worker fails (issue 18's figure): `tandem up --decode 2`,
# STREAMS concurrent greedy streams of 200 tokens (ignore_eos), run once undisturbed, then again
# while SIGNAL (KILL or STOP) hits the busier decode worker ~1.8 s in. For each stream (those on
# the other worker show no long gap): the longest gap between two chunks (the failure's detection
# plus the re-prefill of the prompt and the tokens already sent), and whether its text equals the
# undisturbed run. From the gateway's log: when each moved stream's failure was detected, and how
# long its move (the re-prefill) took.
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
python3 - "$URL" "$SIGNAL" "$STREAMS" "$OUT/up.log" <<'PY'
import datetime, http.client, json, os, re, signal, subprocess, sys, threading, time, urllib.parse
url, sig, n, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
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
# The busier decode worker (most CPU over 300 ms): the one running most of the streams.
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
pids = decode_pids()
before = {p: cpu(p) for p in pids}
time.sleep(0.3)
victim = max(pids, key=lambda p: cpu(p) - before[p])
t_kill, wall_kill = time.monotonic(), time.time()
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
# The gateway's log says when it saw each moved stream fail and when the stream resumed: the
# detection, and the re-prefill's share (reservation, prefill of prompt and sent tokens, commit).
def stamps(what):
    out = {}
    for line in open(log, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = re.match(r"(\S+Z) .*" + what + r".*request=(\S+)", line)
        if m:
            t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            out.setdefault(m.group(2), t)
    return out
failed, resumed = stamps("failed mid-stream"), stamps("stream resumed")
for req, t in sorted(failed.items(), key=lambda kv: kv[1]):
    if t < wall_kill:
        continue
    back = resumed.get(req)
    share = f"{(back - t) * 1000:.0f} ms" if back else "never"
    print(f"moved {req}: detected {(t - wall_kill) * 1000:.0f} ms after the signal, resumed {share} after that")
PY
