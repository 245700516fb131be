"""The cost of vLLM's sampling parameters (issue 18), side by side in one run on one engine.

    .venv/bin/python benchmarks/sampling_cost.py                    # medium, concurrency 1 and 16
    .venv/bin/python benchmarks/sampling_cost.py --geometry tiny --concurrency 2 --repeat 1  # smoke

One plugin engine serves every variant; each point runs ``--repeat`` times with the variants
taking turns (plain, logprobs=5, top_p=0.9, ...), so this machine's drift hits them alike, and the
median run is reported with its ratio to the plain requests of the same point. Unseeded requests,
fixed denoising steps (random weights never converge), fixed output length (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import cpu_name, prompts_for, shutdown_engine, vllm_engine  # noqa: E402

VARIANTS = {
    "plain": {},
    "logprobs=5": {"logprobs": 5},
    "top_p=0.9": {"top_p": 0.9},
    "top_k=50": {"top_k": 50},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
}


def run(llm, conc, steps, args, vocab, variant):
    from vllm import SamplingParams

    prompts = prompts_for(conc, args.prompt_len, vocab, seed=conc * 100 + steps)
    params = [SamplingParams(max_tokens=args.output_len, ignore_eos=True,
                             extra_args={"diffusion_max_steps": steps}, **VARIANTS[variant])
              for _ in range(conc)]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if VARIANTS[variant].get("logprobs") is not None:
        assert all(len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids) for o in outs)
    return tokens / wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="medium")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.conc_list = [int(x) for x in args.concurrency.split(",")]
    variants = args.variants.split(",")
    if "plain" not in variants:
        variants.insert(0, "plain")

    from dgemma_vllm.checkpoints.factory import cached_checkpoint, get_geometry

    geo = get_geometry(args.geometry)
    ck = cached_checkpoint(args.geometry, dtype=args.dtype)
    llm, start = vllm_engine(ck, args, diffusion=True)
    rows = []
    try:
        for v in variants:  # warm-up: one canvas each
            warm = argparse.Namespace(**{**vars(args), "output_len": geo.canvas_length})
            run(llm, 1, args.steps, warm, geo.vocab_size, v)
        for c in args.conc_list:
            runs = {v: [] for v in variants}
            for _ in range(args.repeat):
                for v in variants:
                    runs[v].append(run(llm, c, args.steps, args, geo.vocab_size, v))
            base = statistics.median(runs["plain"])
            for v in variants:
                med = statistics.median(runs[v])
                rows.append(dict(variant=v, concurrency=c, tokens_per_s=med, runs=runs[v],
                                 over_plain=med / base))
    finally:
        shutdown_engine(llm)
    print(f"machine: {cpu_name()}; geometry {args.geometry}, {args.dtype}, {args.steps} steps, "
          f"prompt {args.prompt_len}, output {args.output_len}, median of {args.repeat} "
          f"interleaved runs; engine start {start:.1f} s")
    print("| variant | concurrency | tok/s (median) | runs | vs plain |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in r['runs'])} | {r['over_plain']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, args=vars(args)), indent=1))


if __name__ == "__main__":
    main()
