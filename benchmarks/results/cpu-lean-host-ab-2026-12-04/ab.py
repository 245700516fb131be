"""Interleaved A/B of this session's host-work changes in one in-process engine: each variant
undoes one change by patching it back (the runner, head and sampler live in this process)."""
import os, time, statistics, json, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
geo = os.environ.get("GEO", "lean"); conc = int(os.environ.get("CONC", "1"))
from dgemma_vllm.checkpoints.factory import cached_checkpoint
from vllm import LLM, SamplingParams
import dgemma_vllm.refine.head as H
import dgemma_vllm.refine.sampler as S
from dgemma_vllm.engine.runner import DGemmaRunnerMixin as R
ck = cached_checkpoint(geo, dtype="float32")
llm = LLM(str(ck), dtype="float32", max_model_len=512, kv_cache_memory_bytes=2 << 30,
          hf_overrides={"dgemma_steps_per_engine_step": 8}, seed=0)
prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 3000 + 10 for j in range(32)]} for i in range(conc)]
sp = SamplingParams(max_tokens=64, ignore_eos=True, extra_args={"diffusion_max_steps": 8})

import importlib.util
_spec = importlib.util.spec_from_file_location("dgemma_vllm.refine._old_sampler", os.path.join(os.path.dirname(os.path.abspath(__file__)), "old_sampler.py"))
_old = importlib.util.module_from_spec(_spec); sys.modules[_spec.name] = _old; _spec.loader.exec_module(_old)
old_apply_steps = _old.apply_steps  # the code before 6dbecab, for the A/B only

new = dict(fast=H.softcap_fast_, apply=S.apply_steps, ends=R._dg_ends_here)
variants = {
    "all": {},
    "no_final": {"ends": lambda self, row, req_id: False},
    "tanh": {"fast": H.softcap_},
    "old_apply": {"apply": old_apply_steps},
}
def setv(v):
    d = dict(new, **variants[v])
    H.softcap_fast_ = d["fast"]; S.apply_steps = d["apply"]; H.apply_steps = d["apply"]; R._dg_ends_here = d["ends"]
import dgemma_vllm.refine.head as HH
assert hasattr(HH, "apply_steps"), "head imports apply_steps"
for _ in range(3):
    llm.generate(prompts, sp, use_tqdm=False)
res = {v: [] for v in variants}
n = int(os.environ.get("NGEN", "10")); rounds = int(os.environ.get("ROUNDS", "6"))
order = list(variants)
for r in range(rounds):
    for v in (order if r % 2 == 0 else order[::-1]):
        setv(v)
        t = time.perf_counter()
        for _ in range(n):
            llm.generate(prompts, sp, use_tqdm=False)
        res[v].append((time.perf_counter() - t) / n * 1000)
setv("all")
med = {v: statistics.median(x) for v, x in res.items()}
for v, x in res.items():
    print(f"{v:10s} median {med[v]:.2f} ms/gen  {conc*64/med[v]*1000:.1f} tok/s  vs all {med[v]/med['all']:.3f}  runs {[round(a,1) for a in x]}")
json.dump(dict(geometry=geo, concurrency=conc, ngen=n, rounds=rounds, ms_per_generate=res), open(os.environ.get("OUT", "/dev/null"), "w"), indent=1)
