"""The cost of vLLM's sampling parameters (issue 18) and of structured-output constraints (issue
17), side by side in one run on one engine.

    .venv/bin/python benchmarks/sampling_cost.py                    # medium, concurrency 1 and 16
    .venv/bin/python benchmarks/bench.py --modes constrained        # = --variants plain,json,any,regex_az,json+steps,any+steps
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
# Constraints (issue 17; `bench.py --modes constrained` runs these): a JSON object (the walk
# keeps most of a random canvas inside its string value; once the object closes, later canvases
# are free), any tokens (xgrammar's any_tokens: every canvas walked, every token kept, the cost
# of the walk itself; a regex like (.|\n)* would refuse the random byte sequences that are not
# UTF-8), and
# `[a-z ]*` (almost every token replaced: the worst case, top-8 candidates then exact fallbacks);
# "+steps": the same with diffusion_grammar_every_step (a projection after every step).
_JSON = {"json": {"type": "object", "properties": {"text": {"type": "string"},
                                                   "n": {"type": "integer"}},
                  "required": ["text", "n"]}}
_ANY = {"structural_tag": '{"type": "structural_tag", "format": {"type": "any_tokens"}}'}
CONSTRAINTS = {  # name: (structured_outputs, extra vllm_xargs)
    "json": (_JSON, {}),
    "any": (_ANY, {}),
    "regex_az": ({"regex": "[a-z ]*"}, {}),
    "json+steps": (_JSON, {"diffusion_grammar_every_step": True}),
    "any+steps": (_ANY, {"diffusion_grammar_every_step": True}),
}


def run(llm, conc, steps, args, vocab, variant):
    from vllm import SamplingParams

    prompts = prompts_for(conc, args.prompt_len, vocab, seed=conc * 100 + steps)
    from vllm.sampling_params import StructuredOutputsParams

    kw = dict(VARIANTS.get(variant, {}))
    xargs = {"diffusion_max_steps": steps}
    if variant in CONSTRAINTS:
        so, more = CONSTRAINTS[variant]
        kw["structured_outputs"] = StructuredOutputsParams(**so)
        xargs.update(more)
    params = [SamplingParams(max_tokens=args.output_len, ignore_eos=True, extra_args=xargs, **kw)
              for _ in range(conc)]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if kw.get("logprobs") is not None:
        assert all(len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids) for o in outs)
    return tokens / wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="medium")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {list(VARIANTS)} and the constraints {list(CONSTRAINTS)}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="run the plugin eagerly (default: compiled, vLLM's default)")
    args = ap.parse_args(argv)
    args.conc_list = [int(x) for x in args.concurrency.split(",")]
    variants = args.variants.split(",")
    if "plain" not in variants:
        variants.insert(0, "plain")

    from dgemma_vllm.checkpoints.factory import cached_checkpoint, get_geometry

    geo = get_geometry(args.geometry)
    ck = cached_checkpoint(args.geometry, dtype=args.dtype)
    llm, start = vllm_engine(ck, args, diffusion=True,
                             system="plugin_eager" if args.enforce_eager else "plugin")
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
