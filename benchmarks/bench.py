"""Side-by-side benchmark: the plugin in vLLM vs autoregressive Gemma 4 in the same vLLM vs the
`transformers` reference, on the same backbone geometry, in one run on one machine.

    .venv/bin/python benchmarks/bench.py                      # CPU defaults: medium, 1/4/16, 8 & 16 steps
    .venv/bin/python benchmarks/bench.py --geometry full --concurrency 1,8,32,64 --dtype bfloat16  # GPU machine

Systems (each started once, used for every point, stopped before the next):
  plugin      DiffusionGemma through vLLM with dgemma_vllm (offline LLM and `vllm serve`)
  ar          Gemma4ForCausalLM, same geometry and random weights, in the same vLLM
  reference   transformers' DiffusionGemmaForBlockDiffusion.generate (batched; offline only)

Random weights never converge, so every canvas runs exactly the fixed number of denoising steps
set with ``--steps`` (the per-request knob ``diffusion_max_steps``; ``max_denoising_steps`` for
the reference). Output length is fixed (``ignore_eos``). Per point: output tokens/s, request
latency, time to first token, time per canvas, tokens per forward, denoising steps per canvas,
peak memory (RSS of the process tree), and the ratios plugin/ar and plugin/reference.
Results: results.json, results.md, throughput.png, ttft.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU backend keeps cores for its scheduler and front-end processes by default (one on x86
# with one rank: VLLM_CPU_NUM_OF_RESERVED_CPU unset), and its worker runs one OpenMP thread per
# remaining core. That default is what both vLLM systems run with (`--reserved-cpus` sets it).
# On a 2-core machine it leaves the worker one core while the in-process reference uses both;
# with 0 reserved the worker gets both, but vLLM's engine core spins (sched_yield) on the same
# cores while the worker computes, which costs the small-compute geometries more than the second
# core gains (RESULTS.md, 2026-12-03).


# ----------------------------------------------------------------------------- helpers
class PeakRSS:
    """Peak resident memory of this process and its children, sampled every 50 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self):
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def cpu_name() -> str:
    """CPU model and the vector ISA torch uses (GEMM and elementwise speed depend on both)."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()})"


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    from dgemma_vllm.checkpoints.factory import text_token_ids

    words = text_token_ids(vocab, 5)  # no special tokens (turn, tool or image markers)
    return [[rnd.choice(words) for _ in range(length)] for _ in range(n)]


def batches(args, elapsed):
    """Batch indices of one offline run: batches of `concurrency` requests, one after the other,
    until the run's generate time (``elapsed()``) reaches ``--min-run-s`` (at least one). A
    single request of a small geometry takes ~0.1 s here, where one run is too noisy to rank
    systems by (one run's tokens/s ranged 481-991 at concurrency 1); every system gets the same
    rule, each batch new prompts (no prefix-cache hits from an earlier batch)."""
    b = 0
    while b == 0 or elapsed() < getattr(args, "min_run_s", 0.0):
        yield b
        b += 1


def batch_seed(conc: int, steps: int, b: int) -> int:
    """The prompts' seed of batch `b` of a run (batch 0: the seed single-batch runs used)."""
    return conc * 100 + steps + 7919 * b


def summarize(system, mode, conc, steps, tokens, wall, latencies, ttfts, peak, extra=None):
    row = dict(system=system, mode=mode, concurrency=conc, steps=steps, output_tokens=tokens,
               wall_s=wall, tokens_per_s=tokens / wall if wall > 0 else None,
               latency_s=statistics.mean(latencies) if latencies else None,
               ttft_s=statistics.mean([t for t in ttfts if t is not None]) if any(t is not None for t in ttfts) else None,
               peak_rss_gb=peak / 2**30 if peak else None)
    row.update(extra or {})
    return row


# ----------------------------------------------------------------------------- vLLM offline
AR_SYSTEMS = ("ar", "ar_eager")  # the autoregressive twin: vLLM's defaults (compiled), and eager
# the plugin: compiled (vLLM's default and the plugin's), and eager (the compiled forward's
# before/after measured side by side in one run)
# plugin_alt: the compiled plugin with --alt-hf-overrides instead of --hf-overrides (two knob
# settings side by side in one run)
PLUGIN_SYSTEMS = ("plugin", "plugin_eager", "plugin_alt")
VLLM_SYSTEMS = PLUGIN_SYSTEMS + AR_SYSTEMS


def plugin_eager(system, args) -> bool:
    return system == "plugin_eager"


def plugin_overrides(system, args):
    """The hf_overrides of a plugin system: --alt-hf-overrides for plugin_alt, else --hf-overrides."""
    return getattr(args, "alt_hf_overrides_dict" if system == "plugin_alt" else "hf_overrides_dict",
                   None)


def vllm_engine(path, args, diffusion: bool, system: str = "plugin"):
    """The plugin with its settings (a canvas of 256 rows per request needs the larger token
    budget; `plugin` compiled, vLLM's default; `plugin_eager` with enforce_eager; both
    with --hf-overrides), or the autoregressive twin with vLLM's defaults (`ar`: compiled, as
    `vllm serve` runs it; `ar_eager`: the same with enforce_eager, an extra row)."""
    from vllm import LLM

    kw = dict(dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=args.prompt_len + args.output_len + 512, seed=0,
              disable_log_stats=False)
    if diffusion:
        kw.update(max_num_seqs=max(args.conc_list),
                  enforce_eager=plugin_eager(system, args),
                  hf_overrides=plugin_overrides(system, args),
                  max_num_batched_tokens=max(8192, max(args.conc_list) * 256))
    elif system == "ar_eager":
        kw.update(enforce_eager=True)
    from dgemma_vllm.engine.stats import engine_env

    env = dict(getattr(args, "plugin_env_dict", None) or {}) if diffusion else {}
    if system == "plugin_alt":
        env.update(getattr(args, "alt_env_dict", None) or {})
    if env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        # in-process engine: vLLM sizes the KV cache as the utilization's share less this
        # process's RSS, which holds every other in-process engine of the run; an explicit
        # size instead (2 GiB: far more than these benchmarks' sequences use)
        kw.update(kv_cache_memory_bytes=2 << 30)
    with engine_env(**env):  # inherited by the engine's processes, spawned now
        t0 = time.perf_counter()
        llm = LLM(str(path), **kw)
        return llm, time.perf_counter() - t0


def run_vllm_offline(llm, system, conc, steps, args, vocab, canvas):
    from vllm import SamplingParams

    from dgemma_vllm.engine.stats import request_stats

    diffusion = system in PLUGIN_SYSTEMS
    extra = {"diffusion_max_steps": steps} if diffusion else None
    # unseeded, as served traffic is (seeded requests draw the reference's exact noise)
    params = [SamplingParams(max_tokens=args.output_len, ignore_eos=True, extra_args=extra)
              for i in range(conc)]
    if diffusion:
        from dgemma_vllm.engine.stats import runner_stats

        before = runner_stats(llm)
    outs, wall = [], 0.0
    with PeakRSS() as mem:
        for b in batches(args, lambda: wall):
            prompts = prompts_for(conc, args.prompt_len, vocab, seed=batch_seed(conc, steps, b))
            t0 = time.perf_counter()
            outs += llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            wall += time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    lat, ttft = [], []
    for o in outs:
        m = o.metrics
        if m is not None and getattr(m, "first_token_latency", 0):
            ttft.append(m.first_token_latency)
        if m is not None and getattr(m, "last_token_ts", 0) and getattr(m, "first_token_ts", 0):
            lat.append(m.first_token_latency + (m.last_token_ts - m.first_token_ts))
    extra_cols = {}
    if diffusion:
        st = request_stats(llm)
        mine = [st.get(o.request_id) for o in outs]
        canv = sum(s["canvases"] for s in mine if s)
        steps_total = sum(s["denoising_steps"] for s in mine if s)
        extra_cols = dict(canvases=canv, steps_per_canvas=steps_total / canv if canv else None,
                          tokens_per_forward=tokens / steps_total if steps_total else None,
                          time_per_canvas_s=(statistics.mean(lat) / (canv / len(outs))) if lat and canv else None)
        extra_cols.update(step_breakdown(before, runner_stats(llm), wall))
    else:
        extra_cols = dict(tokens_per_forward=1.0)
    extra_cols["batches"] = len(outs) // conc
    return summarize(system, "offline", conc, steps if diffusion else None, tokens, wall, lat, ttft,
                     mem.peak, extra_cols)


def step_breakdown(before: dict, after: dict, wall: float) -> dict:
    """Where an engine step's time went during one busy `generate` (rank 0's runner, host
    clock), in ms per engine step: the model forward, the canvas head with the per-row updates,
    the rest of the runner's work (input preparation, attention metadata, bookkeeping), and what
    lies outside the runner (scheduling, the hand-off between the engine's processes, output
    processing): the generate's wall time over its engine steps, less the runner's."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    steps = d.get("engine_steps", 0)
    if not steps or "time_runner_s" not in d:
        return {}
    ms = lambda x: 1000.0 * x / steps  # noqa: E731
    return dict(step_ms=ms(wall), step_forward_ms=ms(d["time_forward_s"]),
                step_head_ms=ms(d["time_head_s"]),
                step_runner_other_ms=ms(d["time_runner_s"] - d["time_forward_s"] - d["time_head_s"]),
                step_outside_ms=ms(wall - d["time_runner_s"]))


# ----------------------------------------------------------------------------- reference
def run_reference(model, conc, steps, args, vocab, canvas):
    import torch

    class FirstCanvas:
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:
                self.first = time.perf_counter()

        def end(self):
            pass

    torch.manual_seed(0)
    tokens, wall, lat, ttfts, n = 0, 0.0, [], [], 0
    with PeakRSS() as mem:
        for b in batches(args, lambda: wall):
            prompts = prompts_for(conc, args.prompt_len, vocab, seed=batch_seed(conc, steps, b))
            ids = torch.tensor(prompts, dtype=torch.long)
            streamer = FirstCanvas()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.output_len, max_denoising_steps=steps,
                                 eos_token_id=None, pad_token_id=None, streamer=streamer)
            took = time.perf_counter() - t0
            wall += took
            seqs = out.sequences if hasattr(out, "sequences") else out
            tokens += conc * min(args.output_len, seqs.shape[1] - args.prompt_len)
            lat += [took] * conc
            ttfts.append(streamer.first - t0 if streamer.first else None)
            n += 1
    canv = math.ceil(args.output_len / canvas)
    return summarize("reference", "offline", conc, steps, tokens, wall, lat, ttfts, mem.peak,
                     dict(canvases=canv * conc * n, steps_per_canvas=float(steps),
                          tokens_per_forward=args.output_len / (steps * canv),
                          time_per_canvas_s=wall / n / canv, batches=n))


# ----------------------------------------------------------------------------- server
def vllm_server(path, args, system="plugin"):
    from dgemma_vllm.cli import serve_subprocess

    serve_args = ["--served-model-name", "m", "--dtype", args.dtype,
                  "--max-model-len", str(args.prompt_len + args.output_len + 512),
                  "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if system in PLUGIN_SYSTEMS:  # as vllm_engine: the plugin's settings, vLLM's defaults for `ar`
        serve_args += ["--max-num-seqs", str(max(args.conc_list)),
                       "--max-num-batched-tokens", str(max(8192, max(args.conc_list) * 256))]
        if plugin_eager(system, args):
            serve_args += ["--enforce-eager"]
        if plugin_overrides(system, args):
            serve_args += ["--hf-overrides", json.dumps(plugin_overrides(system, args))]
    elif system == "ar_eager":
        serve_args += ["--enforce-eager"]
    return serve_subprocess(path, serve_args, Path(args.out) / f"server_{system}_{Path(path).name}.log")


def run_server(base, system, conc, steps, args, vocab):
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", timeout=3600)
    prompts = prompts_for(conc, args.prompt_len, vocab, seed=conc * 100 + steps)
    extra = {"ignore_eos": True}
    if system in PLUGIN_SYSTEMS:
        extra["vllm_xargs"] = {"diffusion_max_steps": steps}

    def one(i):
        t0 = time.perf_counter()
        first, n = None, 0
        for ev in client.completions.create(model="m", prompt=prompts[i], max_tokens=args.output_len,
                                            stream=True, extra_body=extra,
                                            stream_options={"include_usage": True}):
            if ev.choices and ev.choices[0].text and first is None:
                first = time.perf_counter() - t0
            if ev.usage is not None:
                n = ev.usage.completion_tokens
        return time.perf_counter() - t0, first, n

    with PeakRSS() as mem, ThreadPoolExecutor(conc) as ex:
        t0 = time.perf_counter()
        res = list(ex.map(one, range(conc)))
        wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in res)
    return summarize(system, "server", conc, steps if system in PLUGIN_SYSTEMS else None, tokens, wall,
                     [r[0] for r in res], [r[1] for r in res], mem.peak)


def run_vllm_bench_serve(server, system, conc, steps, args, tokenizer):
    """The same point with vLLM's own client, `vllm bench serve` (random dataset, prompt and
    output lengths as given, `ignore_eos`, `--max-concurrency conc`, 2 x conc prompts; the
    plugin's requests carry their fixed steps in `vllm_xargs`), run through `dgemma-vllm vllm`
    (the CPU wheel's `vllm` script cannot start). Its JSON result gives the row."""
    import subprocess

    name = f"vbs_{system}_{conc}_{steps}.json"
    cmd = [sys.executable, "-c", "from dgemma_vllm.cli import main; main()", "vllm", "bench", "serve",
           "--backend", "vllm", "--base-url", server, "--model", "m", "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(args.prompt_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(2 * conc),
           "--max-concurrency", str(conc), "--ignore-eos", "--save-result",
           "--result-dir", str(args.out), "--result-filename", name, "--seed", "0"]
    if system in PLUGIN_SYSTEMS:
        cmd += ["--extra-body", json.dumps({"vllm_xargs": {"diffusion_max_steps": steps}})]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    res = json.loads((Path(args.out) / name).read_text())
    if res.get("failed"):
        raise RuntimeError(f"vllm bench serve: {res['failed']} of {res['num_prompts']} requests failed")
    row = dict(system=system, mode="server", client="vllm bench serve", concurrency=conc,
               steps=steps if system in PLUGIN_SYSTEMS else None,
               output_tokens=res.get("total_output_tokens"),
               wall_s=res.get("duration"), tokens_per_s=res.get("output_throughput"),
               latency_s=(statistics.mean(res["latencies"]) if res.get("latencies") else None),
               failed=res.get("failed"),
               ttft_s=(res.get("mean_ttft_ms") or 0) / 1e3 or None, peak_rss_gb=None)
    if system in PLUGIN_SYSTEMS:
        row["tokens_per_forward"] = None
    return row


# ----------------------------------------------------------------------------- report
def add_ratios(rows):
    def find(system, mode, conc, steps):
        for r in rows:
            if (r["system"], r["mode"], r["concurrency"]) == (system, mode, conc) and \
                    (system in AR_SYSTEMS or r["steps"] == steps):
                return r
        return None

    for r in rows:
        if r["system"] not in PLUGIN_SYSTEMS:
            continue
        ar = find("ar", r["mode"], r["concurrency"], None)
        hf = find("reference", "offline", r["concurrency"], r["steps"])
        r["plugin_over_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar else None
        eager = find("ar_eager", r["mode"], r["concurrency"], None)
        r["plugin_over_ar_eager"] = r["tokens_per_s"] / eager["tokens_per_s"] if eager else None
        r["plugin_over_reference"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        if r["system"] == "plugin":  # the compiled forward against the eager one, same run
            eg = find("plugin_eager", r["mode"], r["concurrency"], r["steps"])
            r["compiled_over_eager"] = r["tokens_per_s"] / eg["tokens_per_s"] if eg else None
        if r["system"] == "plugin_alt":  # the other knob setting against plugin, same run
            base = find("plugin", r["mode"], r["concurrency"], r["steps"])
            r["alt_over_plugin"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None


def fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, list):
        return " / ".join(fmt(x, nd) for x in v)
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 0.01 else f"{v:.2e}"
    return str(v)


def write_report(rows, meta, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ["system", "mode", "concurrency", "steps", "tokens_per_s", "latency_s", "ttft_s",
            "time_per_canvas_s", "tokens_per_forward", "steps_per_canvas", "peak_rss_gb",
            "plugin_over_ar", "plugin_over_ar_eager", "plugin_over_reference", "compiled_over_eager", "alt_over_plugin",
            "step_ms", "step_forward_ms", "step_head_ms", "step_runner_other_ms", "step_outside_ms"]
    if any("tokens_per_s_runs" in r for r in rows):
        cols.insert(5, "tokens_per_s_runs")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["mode"], r["steps"] or 0, r["concurrency"], r["system"])):
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    md = [f"# Benchmark results ({meta['date']})", "",
          f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
          f"- command: `{meta['command']}`",
          f"- geometry: {meta['geometry']} ({meta['dtype']}), prompt {meta['prompt_len']} tokens, "
          f"output {meta['output_len']} tokens (ignore_eos), fixed denoising steps {meta['steps']}",
          f"- engine start: {meta.get('engine_start_s')}",
          f"- cores reserved by vLLM (VLLM_CPU_NUM_OF_RESERVED_CPU): {meta.get('reserved_cpus')}; "
          f"torch threads of this process (the reference): {meta.get('reference_threads')}",
          f"- plugin systems' environment (--plugin-env): {meta.get('plugin_env') or 'none'}; "
          f"plugin_alt's (--alt-env): {meta.get('alt_env') or 'none'}; hf_overrides: "
          f"plugin {meta.get('hf_overrides')}, plugin_alt {meta.get('alt_hf_overrides')}",
          "", *lines, ""]
    (out / "results.md").write_text("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for metric, fname, label in [("tokens_per_s", "throughput.png", "output tokens/s"),
                                     ("ttft_s", "ttft.png", "time to first token (s)")]:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            keys = sorted({(r["system"], r["mode"], r["steps"]) for r in rows}, key=str)
            for k in keys:
                pts = sorted([(r["concurrency"], r[metric]) for r in rows
                              if (r["system"], r["mode"], r["steps"]) == k and r.get(metric) is not None])
                if pts:
                    name = f"{k[0]} ({k[1]}{', ' + str(k[2]) + ' steps' if k[2] else ''})"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.set_title(f"{meta['geometry']} geometry, {meta['machine_short']}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
    except ImportError:
        print("[bench] matplotlib missing: no plots")


def shutdown_engine(llm):
    from vllm.distributed import cleanup_dist_env_and_memory

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    cleanup_dist_env_and_memory()


def warm_engine(system, ck, args, steps, geo, starts):
    """The vLLM engine of `system` (its start time into `starts`), after one canvas-long warm-up
    request."""
    llm, starts[system] = vllm_engine(ck[system], args, system in PLUGIN_SYSTEMS, system)
    try:
        warm = argparse.Namespace(**{**vars(args), "output_len": geo.canvas_length})
        run_vllm_offline(llm, system, 1, steps, warm, geo.vocab_size, geo.canvas_length)
    except BaseException:
        shutdown_engine(llm)
        raise
    return llm


def warm_reference(ck, args, geo):
    """The `transformers` reference on every core, after one canvas-long warm-up generate."""
    import torch

    from dgemma_vllm.reference import load_reference

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_reference(str(ck["reference"]), dtype=args.dtype)
    warm = argparse.Namespace(**{**vars(args), "output_len": geo.canvas_length})
    run_reference(model, 1, 2, warm, geo.vocab_size, geo.canvas_length)
    return model


def run_offline_interleaved(systems, ck, args, steps_list, geo, starts, bar):
    """``--repeat N``: every system loaded at once; each point runs N times with the systems taking
    turns (plugin, ar, reference, plugin, ...), so this machine's drift (+-15% within minutes)
    hits them alike. Per point the row of the median run is kept, with every run's tokens/s."""
    runners, engines = {}, []
    try:
        for system in [s for s in systems if s in VLLM_SYSTEMS]:
            llm = warm_engine(system, ck, args, steps_list[0], geo, starts)
            engines.append(llm)
            runners[system] = (lambda c, st, llm=llm, system=system: run_vllm_offline(
                llm, system, c, st, args, geo.vocab_size, geo.canvas_length))
        if "reference" in systems:
            model = warm_reference(ck, args, geo)
            runners["reference"] = (lambda c, st: run_reference(model, c, st, args, geo.vocab_size,
                                                                 geo.canvas_length))
        rows = []
        for steps in steps_list:
            for c in args.conc_list:
                # the autoregressive model has no steps: measured with the first steps value only
                turn = [s for s in runners if s not in AR_SYSTEMS or steps == steps_list[0]]
                runs = {s: [] for s in turn}
                for _ in range(args.repeat):
                    for system in turn:
                        # vLLM's processes spin (shm queue readers, busy_loop_s 1 s) after the
                        # last read: wait them out, so that the system measured next has the
                        # cores to itself (the reference, in this process, most of all)
                        time.sleep(args.settle_s)
                        runs[system].append(runners[system](c, 0 if system in AR_SYSTEMS else steps))
                for system, rs in runs.items():
                    rs.sort(key=lambda r: r["tokens_per_s"])
                    row = dict(rs[len(rs) // 2])
                    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rs]
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix_str(f"{system} c={c} {row['tokens_per_s']:.1f} tok/s (median)")
        return rows
    finally:
        for llm in engines:
            shutdown_engine(llm)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="medium")
    ap.add_argument("--concurrency", default="1,4,16", help="comma list, e.g. 1,4,16,64")
    ap.add_argument("--steps", default="8,16", help="fixed denoising steps per canvas, comma list")
    ap.add_argument("--server-steps", default=None,
                    help="steps for server mode (default: the first of --steps), comma list")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--hf-overrides", default=None,
                    help="JSON object for the plugin's engines' hf_overrides (the plugin's knobs, "
                         "e.g. '{\"dgemma_steps_per_engine_step\": 8}'); the other systems "
                         "run without")
    ap.add_argument("--alt-hf-overrides", default=None,
                    help="JSON object: the hf_overrides of the plugin_alt system (the compiled "
                         "plugin with other knobs, side by side with plugin in one run)")
    ap.add_argument("--alt-env", default=None,
                    help="KEY=VALUE[,KEY=VALUE]: environment of the plugin_alt engine's processes "
                         "only (e.g. DGEMMA_TWO_RPC_STEP=1: vLLM's two RPCs per engine step)")
    ap.add_argument("--plugin-env", default=None,
                    help="KEY=VALUE[,KEY=VALUE]: environment of every plugin system's engine (plugin, "
                         "plugin_eager, plugin_alt; --alt-env adds to it for plugin_alt), e.g. "
                         "VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's in-process engine, the plugin's "
                         "recommended offline setting on a small CPU (README, 'Speed'); the "
                         "autoregressive systems keep vLLM's defaults")
    ap.add_argument("--systems", default="plugin,ar,ar_eager,reference",
                    help="plugin; plugin_alt (plugin with --alt-hf-overrides); plugin_eager (the plugin with enforce_eager: the compiled "
                         "forward's before/after in one run); ar (the autoregressive twin with vLLM's defaults: compiled); "
                         "ar_eager (the same, enforce_eager); reference (transformers' generate)")
    ap.add_argument("--server-client", default="vllm-bench", choices=["vllm-bench", "openai"],
                    help="server mode's load generator: vLLM's own `vllm bench serve` (default) "
                         "or the script's OpenAI-client threads (streaming, one request per thread)")
    ap.add_argument("--modes", default="offline,server",
                    help="offline,server; or constrained alone: the plugin with structured-output "
                         "constraints against plain requests (sampling_cost.py's variants)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--settle-s", type=float, default=1.5,
                    help="--repeat: seconds of idle before each measured run, so that the other "
                         "loaded engines' processes stop spinning (vLLM's shm readers busy-loop "
                         "1 s after a read); default 1.5")
    ap.add_argument("--reserved-cpus", type=int, default=None,
                    help="cores vLLM keeps for its scheduler / front-end processes "
                         "(VLLM_CPU_NUM_OF_RESERVED_CPU) for both vLLM systems; default: vLLM's "
                         "own (1 on x86 with one rank; the worker's OpenMP threads get the rest)")
    ap.add_argument("--min-run-s", type=float, default=1.0,
                    help="offline: each run repeats its batch of `concurrency` requests (new prompts "
                         "each time) until its generate time reaches this many seconds (at least "
                         "one batch; 0: one batch, as before 2026-12-04)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="offline: run every point N times, the systems taking turns (all loaded at "
                         "once), and report the median run (default 1: one system after the other)")
    args = ap.parse_args(argv)
    if args.reserved_cpus is not None:
        if args.reserved_cpus < 0 or args.reserved_cpus >= (os.cpu_count() or 1):
            ap.error(f"--reserved-cpus must be in [0, {(os.cpu_count() or 1) - 1}] "
                     f"(got {args.reserved_cpus})")
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1 (got {args.repeat})")
    args.hf_overrides_dict = json.loads(args.hf_overrides) if args.hf_overrides else None
    if args.hf_overrides_dict is not None and not isinstance(args.hf_overrides_dict, dict):
        ap.error(f"--hf-overrides must be a JSON object (got {args.hf_overrides})")
    args.alt_hf_overrides_dict = json.loads(args.alt_hf_overrides) if args.alt_hf_overrides else None
    if args.alt_hf_overrides_dict is not None and not isinstance(args.alt_hf_overrides_dict, dict):
        ap.error(f"--alt-hf-overrides must be a JSON object (got {args.alt_hf_overrides})")
    for flag in ("alt_env", "plugin_env"):
        parsed = {}
        for item in filter(None, (getattr(args, flag) or "").split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                ap.error(f"--{flag.replace('_', '-')} must be KEY=VALUE[,KEY=VALUE] "
                         f"(got {getattr(args, flag)})")
            parsed[key] = value
        setattr(args, flag + "_dict", parsed)
    if args.modes == "constrained":
        # structured-output constraints against unconstrained requests on one plugin engine,
        # interleaved (benchmarks/sampling_cost.py): the first --steps value, --repeat runs
        import sampling_cost

        Path(args.out).mkdir(parents=True, exist_ok=True)
        return sampling_cost.main([
            "--geometry", args.geometry, "--concurrency", args.concurrency,
            "--steps", args.steps.split(",")[0], "--prompt-len", str(args.prompt_len),
            "--output-len", str(args.output_len), "--dtype", args.dtype,
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--repeat", str(max(args.repeat, 1)),
            "--variants", "plain," + ",".join(sampling_cost.CONSTRAINTS),
            "--json", str(Path(args.out) / "constrained.json")])
    args.conc_list = [int(x) for x in args.concurrency.split(",")]
    steps_list = [int(x) for x in args.steps.split(",")]
    server_steps = [int(x) for x in (args.server_steps or str(steps_list[0])).split(",")]
    systems = args.systems.split(",")
    modes = args.modes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    from dgemma_vllm.checkpoints.factory import cached_checkpoint, get_geometry

    geo = get_geometry(args.geometry)
    if args.geometry == "full":
        # 25.2 B parameters: ~52 GB of random bf16 weights per checkpoint (diffusion and the
        # autoregressive twin), written once under $DGEMMA_CACHE. Meant for a GPU machine.
        if args.dtype == "float32":
            raise SystemExit("--geometry full needs --dtype bfloat16 (fp32 weights would be ~100 GB)")
        print("[bench] full geometry: writing ~52 GB random-weight checkpoints on first use")
    ck = {"plugin": cached_checkpoint(args.geometry, dtype=args.dtype),
          "reference": cached_checkpoint(args.geometry, dtype=args.dtype),
          "ar": cached_checkpoint(args.geometry, kind="autoregressive", dtype=args.dtype)}
    ck["ar_eager"], ck["plugin_eager"], ck["plugin_alt"] = ck["ar"], ck["plugin"], ck["plugin"]
    rows, starts = [], {}
    total = 0
    for s in systems:
        for m in modes:
            if s == "reference" and m == "server":
                continue
            total += len(args.conc_list) * (1 if s in AR_SYSTEMS else len(steps_list if m == "offline" else server_steps))
    bar = tqdm(total=total, desc="bench", unit="pt")
    if "offline" in modes and args.repeat > 1:
        rows += run_offline_interleaved(systems, ck, args, steps_list, geo, starts, bar)
    elif "offline" in modes:
        for system in [s for s in systems if s in VLLM_SYSTEMS]:
            llm = warm_engine(system, ck, args, steps_list[0], geo, starts)
            try:
                for steps in (steps_list if system in PLUGIN_SYSTEMS else [None]):
                    for c in args.conc_list:
                        rows.append(run_vllm_offline(llm, system, c, steps or 0, args, geo.vocab_size, geo.canvas_length))
                        bar.update(1)
                        bar.set_postfix_str(f"{system} c={c} {rows[-1]['tokens_per_s']:.1f} tok/s")
            finally:
                shutdown_engine(llm)
                del llm
        if "reference" in systems:
            model = warm_reference(ck, args, geo)
            for steps in steps_list:
                for c in args.conc_list:
                    rows.append(run_reference(model, c, steps, args, geo.vocab_size, geo.canvas_length))
                    bar.update(1)
                    bar.set_postfix_str(f"reference c={c} {rows[-1]['tokens_per_s']:.1f} tok/s")
            del model
    if "server" in modes:
        for system in [s for s in systems if s in VLLM_SYSTEMS]:
            with vllm_server(ck[system], args, system) as server:
                base = f"{server}/v1"
                for steps in (server_steps if system in PLUGIN_SYSTEMS else [None]):
                    for c in args.conc_list:
                        if args.server_client == "vllm-bench":
                            rows.append(run_vllm_bench_serve(server, system, c, steps or 0, args,
                                                             ck[system]))
                        else:
                            rows.append(run_server(base, system, c, steps or 0, args, geo.vocab_size))
                        bar.update(1)
                        bar.set_postfix_str(f"{system} server c={c} {rows[-1]['tokens_per_s']:.1f} tok/s")
    bar.close()
    add_ratios(rows)
    import torch
    import transformers
    import vllm

    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=f"{cpu_name()}, {os.cpu_count()} cores, "
                        f"{round(__import__('psutil').virtual_memory().total / 2**30)} GiB RAM, "
                        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
                machine_short=f"{os.cpu_count()}-core CPU",
                versions=f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
                command=" ".join([Path(sys.executable).name, "benchmarks/bench.py", *(argv or sys.argv[1:])]),
                geometry=args.geometry, dtype=args.dtype, prompt_len=args.prompt_len,
                output_len=args.output_len, steps=steps_list, min_run_s=args.min_run_s,
                hf_overrides=args.hf_overrides_dict, alt_hf_overrides=args.alt_hf_overrides_dict, alt_env=args.alt_env_dict or None,
                plugin_env=args.plugin_env_dict or None,
                reserved_cpus=os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM default"),
                reference_threads=torch.get_num_threads(),
                engine_start_s={k: round(v, 1) for k, v in starts.items()})
    write_report(rows, meta, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
