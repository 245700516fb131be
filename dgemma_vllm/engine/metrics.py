"""Prometheus metrics of block refinement on vLLM's ``/metrics``.

Two halves, in two processes:

- :class:`RefinementMetrics` lives in the scheduler (EngineCore). Every engine step it sees which
  requests had a canvas scheduled and whether the runner returned tokens (a commit) or none (a
  denoising step), and accumulates integer counts.
- :class:`DGemmaStatLogger` lives in the front end (the API server's ``AsyncLLM``), loaded
  through vLLM's ``vllm.stat_logger_plugins`` entry point, and turns the counts into
  ``dgemma:*`` counters and histograms on vLLM's Prometheus registry.

The counts travel inside vLLM's per-step ``SchedulerStats`` (see ``vllm_api.stats_carrier``) as
``{"dgemma.<kind>.<name>[=<value>]": count}`` integers; the front-end logger removes them before
vLLM's own loggers read the stats. Histogram observations are sent as value -> count pairs;
``tokens_per_forward`` values are sent in thousandths.

Metrics (labels ``model_name``, ``engine``):

- ``dgemma:canvases_committed_total``: canvases committed (one commit pass each).
- ``dgemma:denoising_steps_total``: denoising forwards over a canvas.
- ``dgemma:fused_commits_total``: commits that ran in the same forward as the next canvas's first
  denoising step (``dgemma_fuse_commit``).
- ``dgemma:canvas_tokens_committed_total``: tokens committed (before EOS / stop / max_tokens cuts).
- ``dgemma:denoising_steps_per_canvas``: histogram, denoising steps each committed canvas took.
- ``dgemma:tokens_per_forward``: histogram, per committed canvas: its tokens / its forwards
  (denoising steps + the commit pass, fused or not; a request's last canvas has no commit pass
  when its last denoising step returns the tokens).
- ``dgemma:refinement_batch_size``: histogram, canvases (denoising or committing) per engine step.
"""

from __future__ import annotations

from collections import Counter

from . import vllm_api as V

PREFIX = "dgemma."
MILLI = 1000

STEP_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512]
TPF_BUCKETS = [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class RefinementMetrics:
    """Scheduler-side accumulator (integers only: the carrier is a ``dict[str, int]``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.steps: dict[str, int] = {}  # request -> denoising steps of its current canvas

    def _inc(self, name: str, n: int = 1) -> None:
        self.counts[f"{PREFIX}c.{name}"] += n

    def _observe(self, name: str, value: int) -> None:
        self.counts[f"{PREFIX}h.{name}={int(value)}"] += 1

    def record_step(self, canvases: dict[str, int], fused: set[str] = frozenset(),
                    final=frozenset()) -> None:
        """`canvases`: request id -> tokens the runner returned for its scheduled canvas
        (0 = a denoising step, > 0 = the commit of that many tokens); `fused`: requests whose
        commit ran in one forward with the next canvas's first denoising step; `final`: requests
        whose tokens came from their canvas's last denoising step (the request ends with them:
        no commit pass)."""
        if not canvases:
            return
        self._observe("refinement_batch_size", len(canvases) + len(fused))
        if fused:
            self._inc("fused_commits", len(fused))
        for req_id, got in canvases.items():
            if got == 0:
                self.steps[req_id] = self.steps.get(req_id, 0) + 1
                self._inc("denoising_steps")
                continue
            steps = self.steps.pop(req_id, 0)
            forwards = steps + 1  # the commit pass (fused or not)
            if req_id in final:  # this step denoised, then committed: no pass of its own
                steps = forwards
                self._inc("denoising_steps")
            self._inc("canvases_committed")
            self._inc("canvas_tokens_committed", got)
            self._observe("denoising_steps_per_canvas", steps)
            self._observe("tokens_per_forward", round(MILLI * got / forwards))
            if req_id in fused:  # the next canvas's first denoising step
                self.steps[req_id] = 1
                self._inc("denoising_steps")

    def forget(self, live_request_ids) -> None:
        """Drop the step counts of requests that finished or were aborted."""
        for req_id in [r for r in self.steps if r not in live_request_ids]:
            del self.steps[req_id]

    def drain(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


_METRICS: dict | None = None


def _prometheus_metrics() -> dict:
    """Created once per process (vLLM may rebuild its loggers; the registry keeps names)."""
    global _METRICS
    if _METRICS is None:
        import prometheus_client as P

        labels = ["model_name", "engine"]
        _METRICS = {
            "c.canvases_committed": P.Counter(
                "dgemma:canvases_committed", "Canvases committed by block refinement.", labels),
            "c.denoising_steps": P.Counter(
                "dgemma:denoising_steps", "Denoising forwards over a canvas.", labels),
            "c.fused_commits": P.Counter(
                "dgemma:fused_commits",
                "Commits run in one forward with the next canvas's first denoising step.", labels),
            "c.canvas_tokens_committed": P.Counter(
                "dgemma:canvas_tokens_committed",
                "Tokens committed with canvases (before EOS/stop/max_tokens cuts).", labels),
            "h.denoising_steps_per_canvas": P.Histogram(
                "dgemma:denoising_steps_per_canvas", "Denoising steps each committed canvas took.",
                labels, buckets=STEP_BUCKETS),
            "h.tokens_per_forward": P.Histogram(
                "dgemma:tokens_per_forward",
                "Per committed canvas: its tokens / its forwards (denoising steps + commit).",
                labels, buckets=TPF_BUCKETS),
            "h.refinement_batch_size": P.Histogram(
                "dgemma:refinement_batch_size", "Canvases refined or committed per engine step.",
                labels, buckets=BATCH_BUCKETS),
        }
    return _METRICS


class DGemmaStatLogger(V.AggregateStatLoggerBase):
    """Front-end stat logger (entry point ``vllm.stat_logger_plugins: dgemma``)."""

    def __init__(self, vllm_config, engine_indexes=None):
        self.metrics = _prometheus_metrics()
        name = vllm_config.model_config.served_model_name
        self.model_name = name if isinstance(name, str) else (name[0] if name else "")

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        carrier = V.stats_carrier(scheduler_stats)
        if not carrier:
            return
        mine = [k for k in carrier if k.startswith(PREFIX)]
        for key in mine:
            count = carrier.pop(key)
            name, _, value = key[len(PREFIX):].partition("=")
            metric = self.metrics.get(name)
            if metric is None:
                continue
            labelled = metric.labels(model_name=self.model_name, engine=str(engine_idx))
            if name.startswith("c."):
                labelled.inc(count)
            else:
                v = int(value) / (MILLI if name == "h.tokens_per_forward" else 1)
                for _ in range(count):
                    labelled.observe(v)

    def log_engine_initialized(self):
        pass
