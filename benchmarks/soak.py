"""A bounded soak of `dgemma-vllm serve` on loopback: mixed requests for a time and a count limit.

    .venv/bin/python benchmarks/soak.py --duration 600                 # the long soak (RESULTS.md)
    .venv/bin/python benchmarks/soak.py --duration 120 --json out.json # the suite's two minutes

It starts its own server (tiny random-weight checkpoint, release configuration, bf16 by default;
``VLLM_SERVER_DEV_MODE=1`` for vLLM's ``/collective_rpc``, from which it reads the plugin's
per-request state count) and keeps ``--concurrency`` clients busy with requests of these kinds,
in turn:

- ``plain``: a completion; ``chat``: a chat completion; ``seeded``: a completion with a seed;
- ``stream``: a streamed completion; ``drafts``: streamed with ``diffusion_stream_drafts``;
- ``seed_canvas``: a completion from a seed canvas with pinned positions;
- ``abort``: a streamed request with drafts whose client closes the connection at the first
  draft (in the middle of a canvas: vLLM aborts it);
- ``disconnect``: a streamed request whose client closes after the first committed text.

Reported: requests and errors by kind (a 4xx or 5xx, a broken stream, a missing final event),
p50 / p99 latency of completed requests, the running / waiting requests and KV-cache usage
after the run, the plugin's live per-request states after the run (all three back to zero), and
the RSS of the server and every engine process at the end of the warm-up and at the end.
Loopback only; bounded by ``--duration`` seconds and ``--max-requests``; stops by itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

KINDS = ("plain", "stream", "drafts", "seeded", "seed_canvas", "chat", "abort", "disconnect")


def _rss(proc_pid: int) -> dict[str, float]:
    """RSS in MiB of the server process and each of its descendants (engine core, workers)."""
    import psutil

    out = {}
    root = psutil.Process(proc_pid)
    for p in [root] + root.children(recursive=True):
        try:
            out[f"{p.pid}:{p.name()}"] = p.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return out


def _metric(text: str, name: str) -> float:
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(vals)


class Client:
    def __init__(self, base: str, canvas: int, vocab_ids: list[int]):
        import requests

        self.s = requests.Session()
        self.base = base
        self.canvas = canvas
        self.ids = vocab_ids

    def run(self, kind: str, i: int) -> tuple[bool, int, str]:
        """(completed as the kind expects, HTTP status, what went wrong)."""
        xargs = {"diffusion_max_steps": 3}
        body = {"model": "soak", "prompt": f"Request {i}: why is the sky blue?",
                "max_tokens": 8 + (i * 7) % 41, "ignore_eos": True, "vllm_xargs": xargs}
        if kind == "seeded":
            body["seed"] = i % 17
        if kind == "seed_canvas":
            xargs["diffusion_seed_canvas"] = [self.ids[(i + k) % len(self.ids)] for k in range(self.canvas)]
            xargs["diffusion_pinned"] = [0, 3, self.canvas - 1]
        if kind == "chat":
            body = {"model": "soak", "messages": [{"role": "user", "content": f"Hello {i}"}],
                    "max_tokens": body["max_tokens"], "ignore_eos": True, "vllm_xargs": xargs}
            r = self.s.post(f"{self.base}/v1/chat/completions", json=body, timeout=300)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == body["max_tokens"]
            return ok, r.status_code, "" if ok else r.text[:200]
        if kind in ("plain", "seeded", "seed_canvas"):
            r = self.s.post(f"{self.base}/v1/completions", json=body, timeout=300)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == body["max_tokens"]
            return ok, r.status_code, "" if ok else r.text[:200]
        body["stream"] = True
        if kind in ("drafts", "abort"):
            xargs["diffusion_stream_drafts"] = True
        if kind == "abort":
            xargs["diffusion_max_steps"] = 50  # the close lands inside a canvas
        with self.s.post(f"{self.base}/v1/completions", json=body, stream=True, timeout=300) as r:
            if r.status_code != 200:
                return False, r.status_code, r.text[:200]
            done = False
            for line in r.iter_lines():
                if not line:
                    continue
                if b'"error"' in line:
                    return False, 500, line[:200].decode(errors="replace")
                if kind == "abort" and b"dgemma_draft" in line:
                    return True, 200, ""  # leaving the with-block closes the connection
                if kind == "disconnect" and b'"text":"' in line and b'"text":""' not in line:
                    return True, 200, ""
                if line == b"data: [DONE]":
                    done = True
            return done, 200, "" if done else "stream ended without [DONE]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    ap.add_argument("--max-requests", type=int, default=100000, help="request limit")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds of load before the first RSS reading (default 20)")
    ap.add_argument("--dtype", default="auto", help="server dtype (default auto: bf16)")
    ap.add_argument("--json", default=None, help="write the report here")
    a = ap.parse_args(argv)

    import requests

    from dgemma_vllm.checkpoints.factory import cached_checkpoint, get_geometry, text_token_ids
    from dgemma_vllm.cli import serve_subprocess

    path = cached_checkpoint("tiny")
    g = get_geometry("tiny")
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc: the plugin's state count
    log = Path(tempfile.mkdtemp(prefix="dgemma_soak_")) / "server.log"
    args = ["--served-model-name", "soak", "--dtype", a.dtype, "--max-model-len", "512",
            "--gpu-memory-utilization", "0.2", "--seed", "0", "--max-num-seqs", "16"]
    stats = {k: {"requests": 0, "completed": 0, "errors": 0, "5xx": 0, "latencies": []} for k in KINDS}
    problems: list[str] = []
    lock = threading.Lock()
    counter = itertools.count()
    with serve_subprocess(path, args, log, timeout=300) as base:
        import psutil

        server = next(p for p in psutil.Process().children() if "serve" in " ".join(p.cmdline()))
        t_end = time.time() + a.duration
        rss_warm: dict = {}

        def worker():
            c = Client(base, g.canvas_length, text_token_ids(g.vocab_size, 5))
            while time.time() < t_end:
                i = next(counter)
                if i >= a.max_requests:
                    return
                kind = KINDS[i % len(KINDS)]
                t0 = time.time()
                try:
                    ok, status, why = c.run(kind, i)
                except Exception as e:  # noqa: BLE001 - a broken connection is an error
                    ok, status, why = False, 0, repr(e)[:200]
                dt = time.time() - t0
                with lock:
                    s = stats[kind]
                    s["requests"] += 1
                    s["completed" if ok else "errors"] += 1
                    s["5xx"] += status >= 500
                    if ok and kind not in ("abort", "disconnect"):
                        s["latencies"].append(dt)
                    if not ok and len(problems) < 20:
                        problems.append(f"{kind} #{i}: {status} {why}")

        threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
        t_start = time.time()
        for t in threads:
            t.start()
        time.sleep(min(a.warmup, a.duration))
        rss_warm = _rss(server.pid)
        for t in threads:
            t.join()
        elapsed = time.time() - t_start
        time.sleep(3)  # aborts and finished requests reach the engine
        metrics = requests.get(f"{base}/metrics", timeout=30).text
        rpc = requests.post(f"{base}/collective_rpc", json={"method": "dgemma_runner_stats"},
                            timeout=60).json()["results"]
        rss_end = _rss(server.pid)
    report = {
        "duration_s": round(elapsed, 1), "concurrency": a.concurrency, "dtype": a.dtype,
        "by_kind": {k: {"requests": v["requests"], "completed": v["completed"], "errors": v["errors"],
                        "5xx": v["5xx"]} for k, v in stats.items()},
        "requests": sum(v["requests"] for v in stats.values()),
        "errors": sum(v["errors"] for v in stats.values()),
        "5xx": sum(v["5xx"] for v in stats.values()),
        "problems": problems,
        "running_after": _metric(metrics, "vllm:num_requests_running"),
        "waiting_after": _metric(metrics, "vllm:num_requests_waiting"),
        "kv_cache_usage_after": _metric(metrics, "vllm:kv_cache_usage_perc"),
        "plugin_live_states_after": [r["live_states"] for r in rpc],
        "rss_mib_warm": rss_warm, "rss_mib_end": rss_end,
    }
    lat = sorted(x for v in stats.values() for x in v["latencies"])
    if lat:
        report["latency_p50_s"] = round(statistics.median(lat), 3)
        report["latency_p99_s"] = round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)
    common = set(rss_warm) & set(rss_end)
    report["rss_growth_after_warmup"] = {k: round(rss_end[k] / rss_warm[k] - 1, 4) for k in common}
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
