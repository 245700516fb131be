"""The GPU check: run it on a CUDA machine with CUDA vLLM (0.32 or 0.33) and this package
installed. Not part of CI (no GPU there); never run by this project yet (no GPU was lent).

    python benchmarks/gpu_check.py                  # one GPU
    python benchmarks/gpu_check.py --tp 2           # two GPUs, tensor parallel

1. builds a tiny random-weight checkpoint in the release layout (fp32 weights, so that the fp32
   engine and the fp32 reference use the same values);
2. starts `vllm serve` on it on the GPU (fp32, the plugin's defaults: Triton attention, the
   reference canvas window through Triton's prefix ranges, commit fusion);
3. sends seeded completions (prompts shorter and longer than the sliding window, several
   canvases) and compares their tokens with transformers' `generate` on the same GPU in fp32
   (the oracle), its random draws (canvas noise, multinomial) taken from the CPU generator as
   the plugin's seeded requests take them (``torch.randint`` / ``torch.multinomial`` redirected
   to the host for that run): prints the agreement per request (token equality is the goal; a
   near-tied draw shows as a late first difference, a mask or window error as an early one);
4. prints a speed line: output tokens/s for a batch of concurrent unseeded requests.

Exit status 0 when every seeded request equals the reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path


class host_draws:
    """``torch.randint`` and ``torch.multinomial`` of device tensors drawn from the host's
    default generator (the CPU reference's draws, which the plugin's seeded requests reproduce)."""

    def __enter__(self):
        import torch

        self.randint, self.multinomial = torch.randint, torch.multinomial
        randint, multinomial = self.randint, self.multinomial

        def host_randint(*args, device=None, **kw):
            return randint(*args, **kw).to(device) if device is not None else randint(*args, **kw)

        def host_multinomial(probs, *args, **kw):
            return multinomial(probs.cpu(), *args, **kw).to(probs.device)

        torch.randint, torch.multinomial = host_randint, host_multinomial
        return self

    def __exit__(self, *exc):
        import torch

        torch.randint, torch.multinomial = self.randint, self.multinomial


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="small", help="factory geometry (default small)")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--requests", type=int, default=6, help="seeded requests to compare")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per canvas")
    ap.add_argument("--concurrency", type=int, default=16, help="requests of the speed line")
    ap.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run of this script on the CPU build (tests/test_benchmarks.py)")
    a = ap.parse_args(argv)

    import requests
    import torch

    from dgemma_vllm.checkpoints.factory import EOS_IDS, get_geometry, make_diffusion_checkpoint, text_token_ids
    from dgemma_vllm.cli import serve_subprocess

    if a.device == "cuda":
        assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    out = Path(a.out or tempfile.mkdtemp(prefix="dgemma_gpu_check_"))
    path = make_diffusion_checkpoint(out / "ckpt", a.geometry, dtype="float32")
    g = get_geometry(a.geometry)
    words = text_token_ids(g.vocab_size, 5)
    lengths = [3, g.sliding_window - 1, g.sliding_window + 5, 2 * g.sliding_window + 3, 7, 40]
    prompts = [[words[(17 * i + 5 * j) % len(words)] for j in range(lengths[i % 6])]
               for i in range(a.requests)]
    max_tokens = 2 * g.canvas_length + 3
    args = ["--served-model-name", "m", "--dtype", "float32", "--max-model-len", "1024",
            "--gpu-memory-utilization", "0.5" if a.device == "cuda" else "0.2", "--seed", "0",
            "--tensor-parallel-size", str(a.tp),
            # the CPU reference's draws for seeded requests (the GPU default draws on the device)
            "--hf-overrides", '{"dgemma_seeded_noise": "host"}']
    xargs = {"diffusion_max_steps": a.steps}
    with serve_subprocess(path, args, out / "server.log", timeout=900) as base:
        def complete(prompt, seed=None):
            body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "vllm_xargs": xargs,
                    "return_token_ids": True}
            if seed is not None:
                body["seed"] = seed
            r = requests.post(f"{base}/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            return r.json()

        got = [complete(p, seed=100 + i)["choices"][0].get("token_ids") for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.concurrency) as ex:
            outs = list(ex.map(lambda i: complete(prompts[i % len(prompts)]), range(a.concurrency)))
        dt = time.perf_counter() - t0
        tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").to(a.device).eval()
    ok = True
    for i, (p, toks) in enumerate(zip(prompts, got)):
        with host_draws():
            torch.manual_seed(100 + i)
            ids = torch.tensor([p], device=a.device)
            seq = model.generate(ids, max_new_tokens=max_tokens, max_denoising_steps=a.steps)
        seq = seq.sequences if hasattr(seq, "sequences") else seq
        want = seq[0, len(p):].tolist()[:max_tokens]
        cut = next((k for k, t in enumerate(want) if t in EOS_IDS), None)
        want = want if cut is None else want[:cut + 1]
        same = toks == want
        ok &= same
        first = next((k for k, (x, y) in enumerate(zip(toks or [], want)) if x != y), None)
        print(f"request {i}: prompt {len(p)} tokens, {len(want)} reference tokens, "
              f"{'EQUAL' if same else f'first difference at {first}'}")
    print(f"speed: {tokens} output tokens from {a.concurrency} concurrent requests in {dt:.2f} s = "
          f"{tokens / dt:.1f} tok/s ({a.geometry}, TP={a.tp}, {a.steps} steps per canvas, "
          f"{torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
