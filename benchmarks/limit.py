"""The compute limit of a denoising step, and an H100 projection (issue 24 item 4).

    .venv/bin/python benchmarks/limit.py --results benchmarks/out/results.json   # fraction of the limit
    .venv/bin/python benchmarks/limit.py --project-h100                          # the projection only

FLOPs per step are counted from the geometry: the parameters of transformers' own model class
(built on the meta device from the factory's config, so nothing is allocated) split into the
embedding, the experts and everything else; per canvas row a step multiplies by every non-expert
weight and by top_k / num_experts of the expert weights (2 FLOPs per weight), attends over its
context (sliding layers: at most the window), and runs the vocabulary head twice (the logits, and
the self-conditioning soft embedding ``softmax @ E``). This machine's GEMM throughput is measured
here (fp32 and bf16, the best of several runs of canvas-shaped products), and each plugin row of a
`bench.py` result gets the fraction of that limit its steps reached (its step time from the
per-step breakdown).

The H100 part is a **projection, not a measurement** (no GPU was used): per step the larger of a
compute bound (FLOPs / peak dense tensor throughput) and a bandwidth bound (the bytes of every
weight a step touches / HBM bandwidth), for the full geometry; checked against published figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# H100 SXM (dense, no sparsity): bf16 989 TFLOP/s, fp8 1979 TFLOP/s, HBM3 3.35 TB/s
H100 = {"bf16": 989e12, "fp8": 1979e12, "hbm": 3.35e12}
# published figures the projection is checked against (issue 24)
PUBLISHED = {"canvas_ms_16_steps_fp8_batch1": 145.7, "ar_tok_s_c1": 199.0, "ar_tok_s_c16": 975.0}


def param_counts(geometry: str) -> dict:
    """Parameters of the text model by kind: embedding (tied head), experts, other."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgemma_vllm.checkpoints.factory import diffusion_config, get_geometry

    geo = get_geometry(geometry)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(diffusion_config(geo))
    out = {"embedding": 0, "experts": 0, "other": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or "vision" in name:
            continue
        seen.add(id(p))
        kind = ("embedding" if "embed_tokens" in name or "lm_head" in name
                else "experts" if "experts" in name else "other")
        out[kind] += p.numel()
    return out


def step_flops(geometry: str, rows: int, context: int, counts: dict | None = None) -> float:
    """FLOPs of one denoising step over `rows` canvas rows whose context (committed tokens plus
    the canvas) holds `context` positions."""
    from dgemma_vllm.checkpoints.factory import _layer_types, get_geometry

    geo = get_geometry(geometry)
    c = counts or param_counts(geometry)
    active = c["other"] + c["experts"] * geo.top_k_experts / geo.num_experts
    linear = 2.0 * rows * active
    attn = 0.0
    for t in _layer_types(geo):
        if t == "full_attention":
            attn += 4.0 * rows * context * geo.num_attention_heads * geo.global_head_dim
        else:
            attn += 4.0 * rows * min(context, geo.sliding_window) * geo.num_attention_heads * geo.head_dim
    head = 2 * 2.0 * rows * geo.vocab_size * geo.hidden_size  # logits, soft embedding
    return linear + attn + head


def gemm_throughput(dtype: str, m: int, k: int, n: int, repeat: int = 5) -> float:
    """This machine's FLOP/s for an [m, k] x [k, n] matmul (the best of `repeat` timed runs)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def project_h100() -> dict:
    """Plugin time per canvas (16 steps, batch 1, 256-row canvas) and autoregressive tokens/s at
    concurrency 1 and 16, full geometry, from compute and bandwidth bounds. A projection."""
    from dgemma_vllm.checkpoints.factory import get_geometry

    geo = get_geometry("full")
    c = param_counts("full")
    out = {"params": c}
    prompt = 1024

    def touched_experts(rows):  # expected share of experts a batch of rows routes to
        return 1.0 - (1.0 - geo.top_k_experts / geo.num_experts) ** rows

    for prec, nbytes in (("fp8", 1.0), ("bf16", 2.0)):
        # plugin: one step over a 256-row canvas after `prompt` committed tokens
        rows = geo.canvas_length
        flops = step_flops("full", rows, prompt + rows, c)
        weights = (c["other"] + c["embedding"] + c["experts"] * touched_experts(rows)) * nbytes
        t_step = max(flops / H100[prec], weights / H100["hbm"])
        out[f"plugin_{prec}"] = dict(step_ms=1e3 * t_step, canvas_16_steps_ms=16e3 * t_step,
                                     compute_ms=1e3 * flops / H100[prec],
                                     bandwidth_ms=1e3 * weights / H100["hbm"])
        # autoregressive: one token per stream per step
        for conc in (1, 16):
            flops = conc * 2.0 * (c["other"] + c["experts"] * geo.top_k_experts / geo.num_experts
                                  + c["embedding"])
            weights = (c["other"] + c["embedding"] + c["experts"] * touched_experts(conc)) * nbytes
            t_tok = max(flops / H100[prec], weights / H100["hbm"])
            out[f"ar_{prec}_c{conc}"] = dict(step_ms=1e3 * t_tok, tok_s=conc / t_tok)
    out["published"] = PUBLISHED
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="a bench.py results.json (plugin rows with step_ms)")
    ap.add_argument("--project-h100", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = {}
    if args.results:
        data = json.loads(Path(args.results).read_text())
        meta, rows = data["meta"], data["rows"]
        geo_name = meta["geometry"]
        from dgemma_vllm.checkpoints.factory import get_geometry

        geo = get_geometry(geo_name)
        counts = param_counts(geo_name)
        peak = {d: max(gemm_throughput(d, m, geo.hidden_size, 4 * geo.hidden_size)
                       for m in (geo.canvas_length, 16 * geo.canvas_length)) for d in ("fp32", "bf16")}
        report["gemm_tflops"] = {d: v / 1e12 for d, v in peak.items()}
        print(f"GEMM throughput here: fp32 {peak['fp32'] / 1e12:.3f} TFLOP/s, bf16 "
              f"{peak['bf16'] / 1e12:.3f} TFLOP/s; parameters {counts}")
        print("| system | concurrency | steps | step ms | GFLOP per step | achieved TFLOP/s | fraction of the "
              f"{meta['dtype']} GEMM limit |")
        print("|---|---|---|---|---|---|---|")
        limit = peak["bf16" if meta["dtype"] == "bfloat16" else "fp32"]
        report["rows"] = []
        for r in rows:
            if r["system"] not in ("plugin", "plugin_eager") or not r.get("step_ms"):
                continue
            canvas_rows = r["concurrency"] * geo.canvas_length
            context = meta["prompt_len"] + meta["output_len"] // 2  # the mean over the output
            flops = step_flops(geo_name, canvas_rows, context, counts)
            achieved = flops / (r["step_ms"] / 1e3)
            row = dict(system=r["system"], concurrency=r["concurrency"], steps=r["steps"], step_ms=r["step_ms"],
                       gflop=flops / 1e9, achieved_tflops=achieved / 1e12, fraction=achieved / limit)
            report["rows"].append(row)
            print(f"| {row['system']} | {row['concurrency']} | {row['steps']} | {row['step_ms']:.1f} | {row['gflop']:.2f} | "
                  f"{row['achieved_tflops']:.3f} | {row['fraction']:.2f} |")
    if args.project_h100 or not args.results:
        p = project_h100()
        report["h100_projection"] = p
        print("H100 projection (full geometry; a projection, not a measurement):")
        for prec in ("fp8", "bf16"):
            q = p[f"plugin_{prec}"]
            print(f"  plugin {prec}: step {q['step_ms']:.2f} ms (compute {q['compute_ms']:.2f}, "
                  f"bandwidth {q['bandwidth_ms']:.2f}), 16-step canvas {q['canvas_16_steps_ms']:.1f} ms"
                  + (f" (published: {PUBLISHED['canvas_ms_16_steps_fp8_batch1']} ms)" if prec == "fp8" else ""))
            for conc in (1, 16):
                a = p[f"ar_{prec}_c{conc}"]
                pub = PUBLISHED[f"ar_tok_s_c{conc}"]
                print(f"  autoregressive {prec} c={conc}: {a['tok_s']:.0f} tok/s bound "
                      f"(published: {pub:.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
