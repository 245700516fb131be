"""Compiled against eager, per engine step, on one plugin engine (issue 24's before/after).

    .venv/bin/python benchmarks/compiled_steps.py compiled 1,16 20 '{"dgemma_steps_per_engine_step": 8}'
    .venv/bin/python benchmarks/compiled_steps.py eager 1,16 20

Arguments: compiled|eager, concurrencies, seconds of load per concurrency, optional hf_overrides
(JSON). `lean` geometry, fp32, 8 fixed denoising steps, prompt 32, output 64, unseeded. Prints the
engine start time, then per concurrency tokens/s, engine steps, denoising steps, the runner's
per-engine-step times (ms: forward, head, whole runner) and the wall time per engine step. A
single run per call (bench.py --repeat N gives interleaved medians against the other systems).
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main():
    from vllm import LLM, SamplingParams

    from dgemma_vllm.checkpoints.factory import cached_checkpoint
    from dgemma_vllm.engine.stats import runner_stats

    eager = sys.argv[1] == "eager"
    concs = [int(x) for x in sys.argv[2].split(",")]
    dur = float(sys.argv[3])
    hf = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    ck = cached_checkpoint("lean", dtype="float32")
    t0 = time.time()
    llm = LLM(str(ck), dtype="float32", enforce_eager=eager, gpu_memory_utilization=0.2,
              max_model_len=1024, seed=0, max_num_seqs=16, max_num_batched_tokens=8192,
              hf_overrides=hf)
    print("START", round(time.time() - t0, 1), "s", flush=True)
    for c in concs:
        params = [SamplingParams(max_tokens=64, ignore_eos=True,
                                 extra_args={"diffusion_max_steps": 8}) for _ in range(c)]
        prompts = [{"prompt_token_ids": list(range(200 + i, 232 + i))} for i in range(c)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        t0, n, b = time.time(), 0, runner_stats(llm)
        while time.time() - t0 < dur:
            llm.generate(prompts, params, use_tqdm=False)
            n += 1
        wall, a = time.time() - t0, runner_stats(llm)
        steps = a["engine_steps"] - b["engine_steps"]
        print("C", c, round(64 * c * n / wall, 1), "tok/s", "engine steps", steps,
              "denoising steps", a["inner_steps"] - b["inner_steps"],
              {k: round(1000 * (a[k] - b[k]) / steps, 2) for k in a if k.startswith("time_")},
              "ms/step wall", round(1000 * wall / steps, 2), flush=True)


if __name__ == "__main__":
    main()
