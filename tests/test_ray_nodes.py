"""Two Ray nodes on one machine: a head and a worker node started separately by ``ray start``
(loopback, one logical GPU each, the placement unit vLLM's Ray executor asks for on CPU; see
dgemma_vllm.engine.plugin.cpu_ray_platform). tensor_parallel_size=2 places one rank on each
node, and so does pipeline_parallel_size=2: seeded tokens equal the reference's both times. The
test stops both nodes and leaves no Ray process behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.engine.stats import engine_env
from test_pipeline_parallel import _check_stages, _seeded


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return ref.load_reference(str(tiny_ckpt))


RAY_PORT = 6391


def _ray(*args, env):
    ray_bin = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray_bin), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _ray_processes(temp_dir: str) -> dict[int, str]:
    """Ray processes: those whose command line names the cluster's temp dir (GCS, raylets,
    monitors, dashboard) and Ray's own workers and agents (``ray::...``)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if (temp_dir in args or args.startswith("ray::")) and "ps -eww" not in args:
            procs[int(pid)] = args[:200]
    return procs


@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory):
    """A head node and a worker node, each started by ``ray start`` as a separate process tree
    on loopback with one logical GPU (the placement unit vLLM's Ray executor asks for) and one
    CPU; stopped at the end, leaving no Ray process behind."""
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    before = set(_ray_processes(temp_dir))  # Ray workers of something else, if any
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1",
              "--disable-usage-stats"]
    try:
        head = _ray("start", "--head", f"--port={RAY_PORT}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", *common, env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = _ray("start", f"--address=127.0.0.1:{RAY_PORT}", *common, env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        import ray

        ray.init(address=f"127.0.0.1:{RAY_PORT}", log_to_driver=False)
        try:
            for _ in range(60):  # the worker node registers asynchronously
                if len([n for n in ray.nodes() if n["Alive"]]) == 2:
                    break
                time.sleep(1)
            nodes = [n for n in ray.nodes() if n["Alive"]]
            assert len(nodes) == 2 and all(n["Resources"].get("GPU") == 1 for n in nodes), nodes
        finally:
            ray.shutdown()
        with engine_env(RAY_ADDRESS=f"127.0.0.1:{RAY_PORT}", RAY_AUTH_MODE="disabled"):
            yield temp_dir
    finally:
        _ray("stop", "--force", env=env)
        for _ in range(30):
            left = {p: a for p, a in _ray_processes(temp_dir).items() if p not in before}
            if not left:
                break
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, left


def test_ray_two_nodes_one_rank_each(ray_nodes, tiny_ckpt, model):
    """tensor_parallel_size=2 across the two nodes (one rank on each: each node has one GPU),
    then pipeline_parallel_size=2 across them: the reference's tokens both times."""
    for layout in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        llm = start_llm(tiny_ckpt, distributed_executor_backend="ray", **layout)
        try:
            stats = _seeded(llm, model, first_seed=700)
            info = llm.collective_rpc("dgemma_rank_info")
            assert len({i["node"] for i in info}) == 2 and None not in {i["node"] for i in info}, info
            if "pipeline_parallel_size" in layout:
                _check_stages(llm, stats, stages=2, ranks=1)
            else:  # both tensor ranks hold the canvas states and committed the same canvases
                ranks = llm.collective_rpc("dgemma_request_stats")
                assert len(ranks) == 2 and ranks[0] == ranks[1]
        finally:
            stop_llm(llm)
    # the cluster outlives the engines (the fixture stops it): both raylets still run
    assert sum("raylet/raylet" in a for a in _ray_processes(ray_nodes).values()) == 2
