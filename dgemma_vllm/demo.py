"""Demo: DiffusionGemma through vLLM with the plugin, on an embedded tiny random-weight checkpoint.

    make demo            # or: python -m dgemma_vllm.demo [--geometry tiny] [--steps 8]

The checkpoint is built on first run (seconds) and cached under .cache/. Random weights produce
gibberish; the point is the machinery: batching, block refinement, exact lengths, statistics.
"""

from __future__ import annotations

import argparse
import os
import time


def run(geometry: str = "tiny", steps: int = 8, max_tokens: int = 40, requests: int = 4) -> list[dict]:
    from vllm import LLM, SamplingParams

    from dgemma_vllm.checkpoints.factory import cached_checkpoint, get_geometry
    from dgemma_vllm.engine.stats import request_stats

    path = cached_checkpoint(geometry)
    geo = get_geometry(geometry)
    print(f"[demo] checkpoint: {path} (geometry {geometry}, canvas {geo.canvas_length}, random weights)")
    t0 = time.perf_counter()
    llm = LLM(str(path), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1,
              max_model_len=1024, max_num_seqs=16, seed=0, disable_log_stats=False)
    print(f"[demo] engine started in {time.perf_counter() - t0:.1f} s")
    prompts = ["Why is the sky blue?", "Write a poem about the moon.",
               "Tell me a story about a robot who learns to paint.", "What is the capital of France?"]
    prompts = (prompts * ((requests + len(prompts) - 1) // len(prompts)))[:requests]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    params = [SamplingParams(max_tokens=max_tokens, seed=i, extra_args={"diffusion_max_steps": steps})
              for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = llm.chat(messages, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    stats = request_stats(llm)
    rows = []
    for p, o in zip(prompts, outs):
        s = stats.get(o.request_id, {})
        n = len(o.outputs[0].token_ids)
        m = o.metrics  # vLLM's per-request timing (stats logging is on)
        latency = None
        if m is not None and getattr(m, "first_token_ts", 0) and getattr(m, "last_token_ts", 0):
            latency = m.first_token_latency + (m.last_token_ts - m.first_token_ts)
        row = dict(prompt=p, text=o.outputs[0].text, tokens=n, canvases=s.get("canvases"),
                   denoising_steps=s.get("denoising_steps"),
                   tokens_per_forward=(n / s["denoising_steps"]) if s.get("denoising_steps") else None,
                   latency=latency, tokens_per_s=(n / latency) if latency else None)
        rows.append(row)
    total = sum(r["tokens"] for r in rows)
    print("\n[demo] NOTE: the checkpoint has RANDOM weights, so the text below is gibberish by design.\n")
    for r in rows:
        print(f"prompt: {r['prompt']!r}")
        print(f"  text: {r['text']!r}")
        tpf, tps = r["tokens_per_forward"], r["tokens_per_s"]
        print(f"  tokens={r['tokens']} canvases={r['canvases']} denoising_steps={r['denoising_steps']} "
              f"tokens/forward={'n/a' if tpf is None else f'{tpf:.3f}'} "
              f"tokens/s={'n/a' if tps is None else f'{tps:.1f}'}")
    print(f"\n[demo] {len(rows)} requests batched, {total} tokens in {wall:.2f} s "
          f"= {total / wall:.1f} tokens/s (CPU, fp32)")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="dgemma-vllm demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="tiny")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (cap)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--requests", type=int, default=4)
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(a.geometry, a.steps, a.max_tokens, a.requests)


if __name__ == "__main__":
    main()
