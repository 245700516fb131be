"""Parallel layouts side by side (issue 22): engine start and time per canvas for one rank,
tensor_parallel_size=2 and pipeline_parallel_size=2 (vLLM's multiprocess executor).

    .venv/bin/python benchmarks/parallel.py [--geometry medium] [--steps 8] [--rounds 3]

Each layout runs in its own child process, one after the other in this one run, on the same
checkpoint (fp32) and requests: a 64-token prompt, one full canvas (``max_tokens`` = canvas
length), exactly ``steps`` denoising steps (stopping off), seeded; first one request alone
(concurrency 1), then a batch of 8. Reported: engine start, median seconds per canvas
(concurrency 1) and per batch of 8 canvases over ``rounds`` rounds, tokens/s, and how many
tokens equal the one-rank engine's. One rank binds both cores; each rank of a two-rank layout
binds one core (``VLLM_CPU_OMP_THREADS_BIND=0|1``); a one-rank engine on one core is the row
that each stage of PP=2 should match token for token (same operations, same thread count). On two cores the point is each layout's
overhead (process hand-offs, the collectives of TP, the per-step plan broadcast and the
stage-to-stage hidden states of PP), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LAYOUTS = {"1 rank": {}, "1 rank, one core": {}, "TP=2": {"tensor_parallel_size": 2},
           "PP=2": {"pipeline_parallel_size": 2}}
BATCH = 8


def _child(cfg: dict) -> None:
    from vllm import LLM

    from dgemma_vllm.checkpoints.factory import cached_checkpoint
    from lora import fixed_step_batch  # benchmarks/ is on sys.path when run as a script

    ckpt = cached_checkpoint(cfg["geometry"], dtype="float32")
    t0 = time.perf_counter()
    llm = LLM(str(ckpt), dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
              max_num_seqs=BATCH, seed=0, **cfg["layout"])
    start = time.perf_counter() - t0
    canvas = llm.llm_engine.model_config.hf_config.dgemma_canvas_length
    prompts, params = fixed_step_batch(BATCH, canvas, cfg["steps"])
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
    one, batch, tokens = [], [], None
    for _ in range(cfg["rounds"]):
        t0 = time.perf_counter()
        llm.generate(prompts[:1], params[:1], use_tqdm=False)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        batch.append(time.perf_counter() - t0)
        tokens = [t for o in out for t in o.outputs[0].token_ids]
    print("RESULT " + json.dumps({"start_s": start, "one_s": one, "batch_s": batch,
                                  "tokens": tokens, "canvas": canvas}), flush=True)
    llm.llm_engine.engine_core.shutdown()


def _run(cfg: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # every core for the model, as bench.py
    if cfg["layout"]:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    elif cfg.get("one_core"):
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0"
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                       capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"child failed: {cfg['layout']}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="medium")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(json.loads(a.child))
    from lora import _machine  # benchmarks/ is on sys.path when run as a script

    res = {name: _run(dict(geometry=a.geometry, steps=a.steps, rounds=a.rounds, layout=layout,
                           one_core="one core" in name))
           for name, layout in LAYOUTS.items()}
    base = res["1 rank"]
    canvas = base["canvas"]
    print(f"\n{_machine()}; {a.geometry}, fp32, one {canvas}-token canvas per request, "
          f"{a.steps} steps; medians of {a.rounds} rounds; vLLM's multiprocess executor\n")
    print("| layout | engine start (s) | s per canvas, 1 request | / 1 rank | s per 8 canvases "
          "(batch of 8) | / 1 rank | tokens/s at 8 | tokens equal to 1 rank | to 1 rank, one core |")
    print("|---|---|---|---|---|---|---|---|---|")
    one0, b0 = statistics.median(base["one_s"]), statistics.median(base["batch_s"])
    for name, r in res.items():
        one, b = statistics.median(r["one_s"]), statistics.median(r["batch_s"])
        same = sum(x == y for x, y in zip(r["tokens"], base["tokens"]))
        same1 = sum(x == y for x, y in zip(r["tokens"], res["1 rank, one core"]["tokens"]))
        print(f"| {name} | {r['start_s']:.1f} | {one:.3f} | {one / one0:.2f} | {b:.3f} | "
              f"{b / b0:.2f} | {BATCH * canvas / b:.0f} | {same}/{len(base['tokens'])} | "
              f"{same1}/{len(base['tokens'])} |")
    print("\n(fp32 GEMMs on one and on two threads sum in different orders, and TP's all-reduce "
          "in another: on a random-weight model near-ties then flip some tokens; a stage of PP=2 "
          "runs the one-core engine's operations)")


if __name__ == "__main__":
    main()
