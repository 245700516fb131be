"""Engine options side by side: tensor-parallel ranks (multiprocess / Ray), head tile, denoising
steps per engine step. One run, one machine, each configuration in its own process.

    .venv/bin/python benchmarks/engine_options.py [--geometry medium] [--steps 4] [--canvases 2]
        [--concurrency 1] [--configs mp1,mp2,ray2,mp1+tile=4096,mp1+group=4]

A configuration is ``<mp|ray><ranks>`` plus ``+tile=N`` (``dgemma_head_tile``), ``+group=K``
(``dgemma_steps_per_engine_step``) and/or ``+fuse=0|1`` (``dgemma_fuse_commit``). Each one: start an engine (timed), one warm-up
request, then `concurrency` requests of `canvases` full canvases with exactly `steps` denoising
steps each (stopping off), timed. Reported: engine start, time per forward (generate time over
the forwards the runner counted: prefill, denoising steps, commits, a fused commit + first step
once), tokens/s, ratios to the first configuration, and how many seeded tokens equal the first
configuration's. On CPU each rank gets one core
(`VLLM_CPU_OMP_THREADS_BIND`); a one-rank engine gets both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _child(cfg: dict) -> None:
    from dgemma_vllm.checkpoints.factory import cached_checkpoint
    from vllm import LLM, SamplingParams

    ckpt = cached_checkpoint(cfg["geometry"], dtype="float32")
    ray_ctx = None
    if cfg["backend"] == "ray":
        import ray

        ray_ctx = ray.init(num_cpus=2, num_gpus=cfg["tp"], include_dashboard=False, log_to_driver=False)
        os.environ["RAY_ADDRESS"] = ray_ctx.address_info["address"]
    overrides = {}
    if cfg.get("tile"):
        overrides["dgemma_head_tile"] = cfg["tile"]
    if cfg.get("group"):
        overrides["dgemma_steps_per_engine_step"] = cfg["group"]
    if "fuse" in cfg:
        overrides["dgemma_fuse_commit"] = bool(cfg["fuse"])
    t0 = time.perf_counter()
    llm = LLM(str(ckpt), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=1024, seed=0, tensor_parallel_size=cfg["tp"],
              distributed_executor_backend=cfg["backend"], hf_overrides=overrides or None)
    start = time.perf_counter() - t0
    canvas = llm.llm_engine.model_config.hf_config.dgemma_canvas_length
    xargs = {"diffusion_max_steps": cfg["steps"], "diffusion_stability_threshold": 0,
             "diffusion_confidence_threshold": 0}
    prompts = [{"prompt_token_ids": [(7 * j + 3 * i) % 300 + 5 for j in range(64)]}
               for i in range(cfg["concurrency"])]
    llm.generate(prompts[:1], SamplingParams(max_tokens=canvas, ignore_eos=True, seed=1, extra_args=xargs),
                 use_tqdm=False)
    params = [SamplingParams(max_tokens=canvas * cfg["canvases"], ignore_eos=True,
                             seed=None if cfg["unseeded"] else 2 + i, extra_args=xargs)
              for i in range(len(prompts))]
    from dgemma_vllm.engine.stats import runner_stats

    before = runner_stats(llm)
    t0 = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    gen = time.perf_counter() - t0
    after = runner_stats(llm)
    # forwards the runner ran (prefill, denoising steps, commits; fused ones count once)
    forwards = sum(after[k] - before[k] for k in ("engine_steps", "inner_steps"))
    tokens = [t for o in out for t in o.outputs[0].token_ids]
    print("RESULT " + json.dumps({**cfg, "start_s": start, "generate_s": gen,
                                  "forward_s": gen / forwards, "tok_s": len(tokens) / gen,
                                  "token_ids": tokens}), flush=True)
    llm.llm_engine.engine_core.shutdown()
    if ray_ctx is not None:
        import ray

        ray.shutdown()


def _parse(spec: str) -> dict:
    name, *opts = spec.split("+")
    cfg = {"backend": name.rstrip("0123456789"), "tp": int(name[len(name.rstrip("0123456789")):])}
    for o in opts:
        k, v = o.split("=")
        cfg[k] = int(v)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="medium")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--canvases", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--configs", default="mp1,mp2,ray2")
    ap.add_argument("--unseeded", action="store_true",
                    help="unseeded requests (served traffic; batched sampling) instead of seeded")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(json.loads(a.child))
    rows = []
    for spec in a.configs.split(","):
        cfg = dict(geometry=a.geometry, steps=a.steps, canvases=a.canvases,
                   concurrency=a.concurrency, unseeded=a.unseeded, spec=spec, **_parse(spec))
        env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        if cfg["tp"] == 2 and cfg["backend"] == "mp":
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env,
                           capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(p.stdout[-3000:], p.stderr[-3000:])
            raise SystemExit(f"{spec} failed")
        rows.append(json.loads(line[0][7:]))
    base = rows[0]
    print(f"\n{a.geometry}, {a.steps} steps, {a.canvases} canvases per request, concurrency "
          f"{a.concurrency}, {'unseeded' if a.unseeded else 'seeded'}\n")
    print(f"| config | engine start (s) | time per forward (s) | tokens/s | tokens/s / {base['spec']} "
          f"| seeded tokens equal to {base['spec']} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        same = sum(x == y for x, y in zip(r["token_ids"], base["token_ids"]))
        print(f"| {r['spec']} | {r['start_s']:.1f} | {r['forward_s']:.3f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base['tok_s']:.2f} | {same}/{len(base['token_ids'])} |")


if __name__ == "__main__":
    main()
