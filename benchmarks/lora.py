"""LoRA serving cost: tokens/s with 0, 1 and 4 distinct adapters in a batch of 16 (issue 19).

    .venv/bin/python benchmarks/lora.py [--geometry medium] [--steps 8] [--rounds 3] [--rank 8]

One engine with ``enable_lora`` (``max_loras`` 4, ``max_lora_rank`` = rank) serves, in each
round, the same 16 seeded requests (a 64-token prompt, one full canvas, exactly ``steps``
denoising steps, stopping off) three ways, interleaved: no adapter, every request on one adapter,
requests spread over four adapters (random rank-`rank` adapters on every supported module,
written by peft: ``dgemma-vllm make-adapter``). A second engine without LoRA runs the same batch
(before, in its own process) as the reference for what enabling LoRA costs. Reported: median
tokens/s per row, ratio to the no-LoRA engine, and how many tokens differ from the no-adapter
row (adapters must change the output). First, the CPU LoRA op on its own: one projection's
shrink + expand over a batch of 16 canvases at this geometry, vLLM 0.32's torch ops against the
plugin's grouped GEMMs (dgemma_vllm/model/lora_ops.py), which the engine uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

N_REQ = 16


def fixed_step_batch(n: int, canvas: int, steps: int):
    """`n` seeded requests: a 64-token prompt each, one full canvas, exactly `steps` denoising
    steps (stopping off). Returns (prompts, sampling params)."""
    from vllm import SamplingParams

    xargs = {"diffusion_max_steps": steps, "diffusion_stability_threshold": 0,
             "diffusion_confidence_threshold": 0}
    prompts = [{"prompt_token_ids": [(7 * j + 3 * i) % 300 + 5 for j in range(64)]}
               for i in range(n)]
    params = [SamplingParams(max_tokens=canvas, ignore_eos=True, seed=2 + i, extra_args=xargs)
              for i in range(n)]
    return prompts, params


def _child(cfg: dict) -> None:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from dgemma_vllm.checkpoints.adapters import cached_adapter
    from dgemma_vllm.checkpoints.factory import cached_checkpoint

    ckpt = cached_checkpoint(cfg["geometry"], dtype="float32")
    ads = [LoRARequest(f"bench{i}", i + 1, str(cached_adapter(ckpt, f"bench{i}", rank=cfg["rank"],
                                                                 alpha=2 * cfg["rank"], seed=i)))
           for i in range(4)]
    lora = dict(enable_lora=True, max_loras=4, max_lora_rank=cfg["rank"]) if cfg["lora"] else {}
    t0 = time.perf_counter()
    llm = LLM(str(ckpt), dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
              max_num_seqs=N_REQ, seed=0, **lora)
    start = time.perf_counter() - t0
    canvas = llm.llm_engine.model_config.hf_config.dgemma_canvas_length
    prompts, params = fixed_step_batch(N_REQ, canvas, cfg["steps"])
    modes = {"no adapter": [None] * N_REQ}
    if cfg["lora"]:
        modes["1 adapter"] = [ads[0]] * N_REQ
        modes["4 adapters"] = [ads[i % 4] for i in range(N_REQ)]
    for lr in ([None] + ads[:4]) if cfg["lora"] else [None]:  # warm-up: load every adapter once
        llm.generate(prompts[:1], params[:1], lora_request=lr, use_tqdm=False)
    rows = {m: {"tok_s": [], "tokens": None} for m in modes}
    for _ in range(cfg["rounds"]):
        for m, lrs in modes.items():
            t0 = time.perf_counter()
            out = llm.generate(prompts, params, lora_request=lrs if cfg["lora"] else None,
                               use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = [t for o in out for t in o.outputs[0].token_ids]
            rows[m]["tok_s"].append(len(toks) / dt)
            rows[m]["tokens"] = toks
    print("RESULT " + json.dumps({"start_s": start, "rows": rows}), flush=True)
    llm.llm_engine.engine_core.shutdown()


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def _run(cfg: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # both cores for the model, as bench.py
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                       capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit("child failed")
    return json.loads(line[0][7:])


def op_times(hidden: int, out: int, rank: int, rows: int, reps: int = 5) -> list[tuple]:
    """(case, vLLM's ms, grouped ms) for one shrink + expand of a [rows, hidden] batch."""
    import torch

    from dgemma_vllm.engine import vllm_api as V
    from dgemma_vllm.model import lora_ops as G

    vs, ve, _ = V.vllm_cpu_lora_ops()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    a = torch.randn(4, 1, rank, hidden, generator=g)
    b = torch.randn(4, 1, out, rank, generator=g)
    cases = {"1 adapter": torch.zeros(rows, dtype=torch.long),
             "4 adapters": torch.arange(rows) // (rows // 4) % 4,
             "4 adapters + base rows": torch.arange(rows) // (rows // 5) % 5 - 1}

    def run(shrink, expand, idx):
        y, o = torch.zeros(rows, rank), torch.zeros(rows, out)
        t0 = time.perf_counter()
        for _ in range(reps):
            shrink(x, a, y, idx, 1.0)
            expand(y, b, o, idx, True)
        return (time.perf_counter() - t0) / reps * 1e3

    return [(name, run(vs, ve, idx), run(G.bgmv_shrink, G.bgmv_expand, idx))
            for name, idx in cases.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="medium")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(json.loads(a.child))
    cfg = dict(geometry=a.geometry, steps=a.steps, rounds=a.rounds, rank=a.rank)
    from dgemma_vllm.checkpoints.factory import get_geometry

    geo = get_geometry(a.geometry)
    rows = N_REQ * geo.canvas_length
    ops = op_times(geo.hidden_size, geo.intermediate_size, a.rank, rows)
    off = _run({**cfg, "lora": False})
    on = _run({**cfg, "lora": True})
    base = statistics.median(off["rows"]["no adapter"]["tok_s"])
    ref_tokens = on["rows"]["no adapter"]["tokens"]
    print(f"\n{_machine()}; {a.geometry}, "
          f"fp32, batch of {N_REQ}, one canvas each, {a.steps} steps, rank-{a.rank} adapters on "
          f"attention + dense MLP + self-conditioning MLP; medians of {a.rounds} interleaved rounds\n")
    print(f"one LoRA projection (shrink + expand), {rows} rows, {geo.hidden_size} -> "
          f"{geo.intermediate_size}, rank {a.rank}:\n")
    print("| adapters | vLLM 0.32 CPU ops (ms) | grouped GEMMs (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, t_v, t_g in ops:
        print(f"| {name} | {t_v:.1f} | {t_g:.2f} | {t_v / t_g:.0f}x |")
    print()
    print(f"engine start: {off['start_s']:.1f} s without LoRA, {on['start_s']:.1f} s with "
          "--enable-lora\n")
    print("| engine | adapters in the batch | tokens/s | / no-LoRA engine | tokens differing from "
          "the no-adapter row |")
    print("|---|---|---|---|---|")
    print(f"| LoRA off | none | {base:.1f} | 1.00 | - |")
    for m, r in on["rows"].items():
        tps = statistics.median(r["tok_s"])
        diff = sum(x != y for x, y in zip(r["tokens"], ref_tokens))
        print(f"| --enable-lora | {m} | {tps:.1f} | {tps / base:.2f} | {diff}/{len(ref_tokens)} |")
    same_off = sum(x == y for x, y in zip(off["rows"]["no adapter"]["tokens"], ref_tokens))
    print(f"\nno-adapter tokens equal between the engines: {same_off}/{len(ref_tokens)}")


if __name__ == "__main__":
    main()
