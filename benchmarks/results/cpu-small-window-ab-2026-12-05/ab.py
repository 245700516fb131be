"""Interleaved A/B of the window recompute's attention in one in-process engine: "bmm" is the
shipped window_attention (baddbmm, softmax, bmm), "sdpa" patches back ATen's SDPA (the code
before this change). GEO, CONC, NGEN, ROUNDS, OUT from the environment."""
import os, time, statistics, json
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
geo = os.environ.get("GEO", "small"); conc = int(os.environ.get("CONC", "1"))
import torch
import torch.nn.functional as F
from dgemma_vllm.checkpoints.factory import cached_checkpoint
from vllm import LLM, SamplingParams
import dgemma_vllm.engine.attention as A
ck = cached_checkpoint(geo, dtype="float32")
llm = LLM(str(ck), dtype="float32", max_model_len=512, kv_cache_memory_bytes=2 << 30,
          hf_overrides={"dgemma_steps_per_engine_step": 8}, seed=0)
prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 1000 + 10 for j in range(32)]} for i in range(conc)]
sp = SamplingParams(max_tokens=64, ignore_eos=True, extra_args={"diffusion_max_steps": 8})


def sdpa(q, k, v, bias, scale):  # the code before: SDPA with a boolean mask and enable_gqa
    keep = torch.isfinite(bias)[:, :, None, :]  # [B, 1, 1, n]
    o = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                       v.transpose(1, 2).float(), attn_mask=keep, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


variants = {"bmm": A.window_attention, "sdpa": sdpa}
for _ in range(3):
    llm.generate(prompts, sp, use_tqdm=False)
res = {v: [] for v in variants}
n = int(os.environ.get("NGEN", "10")); rounds = int(os.environ.get("ROUNDS", "6"))
order = list(variants)
for r in range(rounds):
    for v in (order if r % 2 == 0 else order[::-1]):
        A.window_attention = variants[v]
        t = time.perf_counter()
        for _ in range(n):
            llm.generate(prompts, sp, use_tqdm=False)
        res[v].append((time.perf_counter() - t) / n * 1000)
A.window_attention = variants["bmm"]
med = {v: statistics.median(x) for v, x in res.items()}
for v, x in res.items():
    print(f"{v:6s} median {med[v]:.2f} ms/gen  {conc*64/med[v]*1000:.1f} tok/s  vs bmm {med[v]/med['bmm']:.3f}  runs {[round(a,1) for a in x]}")
json.dump(dict(geometry=geo, concurrency=conc, ngen=n, rounds=rounds, ms_per_generate=res),
          open(os.environ.get("OUT", "/dev/null"), "w"), indent=1)
