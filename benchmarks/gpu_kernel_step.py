"""Kernel-level cost of one refinement step vs one autoregressive decode step (plain torch, no vLLM).

    python benchmarks/gpu_kernel_step.py                       # GPU: full 26B-A4B geometry, bf16
    python benchmarks/gpu_kernel_step.py --device cpu --geometry tiny --dtype float32   # smoke test

One refinement step = the decoder forward of B canvases of 256 tokens over a cached prefix
(bidirectional canvas attention; sliding layers see the last W-1 cached keys plus the canvas),
the tied vocabulary head, self-conditioning (softmax @ E and its MLP) and the sampler's
elementwise work over [rows, vocab]. One decode step = the same layers for B single tokens with
causal attention over the prefix, and the head. Layers are timed one of each type with random
weights and multiplied by the layer counts (weights of 30 layers in bf16 need ~52 GB; one layer of
each kind keeps the script runnable on any card); the MoE runs as a grouped loop over experts.

Printed per batch size: time, FLOPs and bytes moved (weights touched + KV read) per step, and the
implied output tokens/s: B*256/(N*t_step) for N denoising steps per canvas, B/t_step for decode.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

GEOS = {
    "full": dict(H=2816, layers=30, full_every=6, heads=16, kv_s=8, hd_s=256, kv_f=2, hd_f=512,
                 W=1024, inter=2112, E=128, k=8, moe=704, V=262144, C=256),
    "tiny": dict(H=64, layers=4, full_every=2, heads=2, kv_s=1, hd_s=32, kv_f=1, hd_f=64,
                 W=16, inter=128, E=4, k=2, moe=32, V=512, C=16),
}


def rms(x, w=None, eps=1e-6):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float() if w is not None else y).to(x.dtype)


class Layer:
    def __init__(self, g, full, dev, dt):
        H = g["H"]
        self.full = full
        self.kv = g["kv_f"] if full else g["kv_s"]
        self.hd = g["hd_f"] if full else g["hd_s"]
        self.h = g["heads"]
        r = lambda *s: (torch.randn(*s, device=dev, dtype=dt) * 0.02)  # noqa: E731
        self.wq, self.wk = r(self.h * self.hd, H), r(self.kv * self.hd, H)
        self.wv = None if full else r(self.kv * self.hd, H)
        self.wo = r(H, self.h * self.hd)
        self.gate, self.up, self.down = r(g["inter"], H), r(g["inter"], H), r(H, g["inter"])
        self.router = r(g["E"], H)
        self.w13 = r(g["E"], 2 * g["moe"], H)
        self.w2 = r(g["E"], H, g["moe"])
        self.k, self.E = g["k"], g["E"]

    def weight_bytes(self, experts_touched):
        per = lambda t: t.numel() * t.element_size()  # noqa: E731
        b = sum(per(t) for t in (self.wq, self.wk, self.wo, self.gate, self.up, self.down, self.router))
        b += per(self.wv) if self.wv is not None else 0
        b += experts_touched * (per(self.w13[0]) + per(self.w2[0]))
        return b

    def forward(self, x, kv_cache):
        """x: [B, q, H] (q = canvas length or 1); kv_cache: [B, keys, kv, hd] (used for K and V).
        Queries attend to the cached keys plus every query position of their own sequence
        (bidirectional canvas; for q = 1 that is exactly causal decode)."""
        B, q, H = x.shape
        xf = x.reshape(B * q, H)
        qh = rms((xf @ self.wq.T).view(B, q, self.h, self.hd))
        k = rms((xf @ self.wk.T).view(B, q, self.kv, self.hd))
        v = k if self.wv is None else rms((xf @ self.wv.T).view(B, q, self.kv, self.hd))
        kk = torch.cat([kv_cache, k], 1).transpose(1, 2)  # [B, kv, S, hd]
        vv = torch.cat([kv_cache, v], 1).transpose(1, 2)
        rep = self.h // self.kv
        o = F.scaled_dot_product_attention(qh.transpose(1, 2), kk.repeat_interleave(rep, 1),
                                           vv.repeat_interleave(rep, 1), scale=1.0)
        xf = xf + rms(o.transpose(1, 2).reshape(B * q, -1) @ self.wo.T)
        h = rms(xf)
        m1 = (F.gelu(h @ self.gate.T, approximate="tanh") * (h @ self.up.T)) @ self.down.T
        probs = torch.softmax((rms(xf) @ self.router.T).float(), -1)
        w, idx = probs.topk(self.k, -1)
        w = (w / w.sum(-1, keepdim=True)).flatten()
        m2 = torch.zeros_like(xf)
        flat = idx.flatten()
        order = flat.argsort()
        tok = torch.arange(B * q, device=x.device).repeat_interleave(self.k)[order]
        ws = w[order]
        start, touched = 0, 0
        for e, n in enumerate(torch.bincount(flat, minlength=self.E).tolist()):
            if n == 0:
                continue
            touched += 1
            t = tok[start:start + n]
            g_, u = (h[t] @ self.w13[e].T).chunk(2, -1)
            y = (F.gelu(g_, approximate="tanh") * u) @ self.w2[e].T
            m2.index_add_(0, t, y * ws[start:start + n, None].to(y.dtype))
            start += n
        return (xf + rms(m1 + m2)).view(B, q, H), touched


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, dev, reps=5):
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="full", choices=sorted(GEOS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", default="8,16", help="denoising steps per canvas for the implied tokens/s")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    g, dev, dt = GEOS[a.geometry], a.device, getattr(torch, a.dtype)
    torch.manual_seed(0)
    n_full = g["layers"] // g["full_every"]
    n_slide = g["layers"] - n_full
    layers = {False: Layer(g, False, dev, dt), True: Layer(g, True, dev, dt)}
    emb = torch.randn(g["V"], g["H"], device=dev, dtype=dt) * 0.02
    sc = [torch.randn(g["inter"], g["H"], device=dev, dtype=dt) * 0.02 for _ in range(2)] + \
         [torch.randn(g["H"], g["inter"], device=dev, dtype=dt) * 0.02]
    L, C, H, V = a.prefix, g["C"], g["H"], g["V"]
    results = []
    for B in [int(b) for b in a.batches.split(",")]:
        for mode in ("refine", "decode"):
            T = B * C if mode == "refine" else B
            q_len = C if mode == "refine" else 1
            x = torch.randn(B, q_len, H, device=dev, dtype=dt)
            t_layers, flops, wbytes, kvbytes = 0.0, 0.0, 0.0, 0.0
            for full, count in ((False, n_slide), (True, n_full)):
                ly = layers[full]
                # canvas: W-1 cached keys on sliding layers (reference semantics); decode: W-1 + itself
                keys = L if full else min(L, g["W"] - 1)
                kc = torch.randn(B, keys, ly.kv, ly.hd, device=dev, dtype=dt)
                t_layer, (_, touched) = timeit(lambda: ly.forward(x, kc), dev)
                t_layers += count * t_layer
                att = 2 * 2 * B * q_len * ly.h * ly.hd * (keys + q_len)
                proj = 2 * T * H * (ly.h * ly.hd * 2 + ly.kv * ly.hd * (1 if full else 2))
                mlp = 2 * T * H * g["inter"] * 3 + 2 * T * g["k"] * H * g["moe"] * 3 + 2 * T * H * g["E"]
                flops += count * (att + proj + mlp)
                wbytes += count * ly.weight_bytes(touched)
                kvbytes += count * B * keys * ly.kv * ly.hd * 2 * torch.finfo(dt).bits / 8
                del kc
            h = torch.randn(T if mode == "refine" else B, H, device=dev, dtype=dt)

            def head():
                logits = (h @ emb.T).float()
                logits = torch.tanh(logits / 30) * 30
                if mode == "refine":
                    p = torch.softmax(logits, -1)
                    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
                    am = logits.argmax(-1)
                    soft = p.to(dt) @ emb
                    s = rms(soft)
                    s = (F.gelu(s @ sc[0].T, approximate="tanh") * (s @ sc[1].T)) @ sc[2].T
                    return ent, am, s
                return logits.argmax(-1)

            t_head, _ = timeit(head, dev)
            rows = h.shape[0]
            flops += 2 * rows * H * V * (2 if mode == "refine" else 1)
            wbytes += V * H * torch.finfo(dt).bits / 8
            t = t_layers + t_head
            r = dict(mode=mode, batch=B, rows=T, step_s=t, layers_s=t_layers, head_sc_sampler_s=t_head,
                     tflops=flops / 1e12, achieved_tflops_per_s=flops / t / 1e12,
                     gbytes=(wbytes + kvbytes) / 1e9)
            if mode == "refine":
                for n in [int(s) for s in a.steps.split(",")]:
                    r[f"tokens_per_s_at_{n}_steps"] = B * C / (n * t)
            else:
                r["tokens_per_s"] = B / t
            results.append(r)
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), device=torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
                           results=results), f, indent=2)


if __name__ == "__main__":
    main()
