"""Streaming chat against `vllm serve` (or `dgemma-vllm serve`) with the plugin.

    dgemma-vllm serve /path/to/checkpoint --port 8000 &
    python examples/openai_chat_stream.py --base-url http://127.0.0.1:8000/v1

Each streamed delta is one committed canvas (or the part of it before a stop).
"""

from __future__ import annotations

import argparse


def run(base_url: str, model: str | None = None) -> str:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none")
    model = model or client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me about block diffusion."}],
        max_tokens=48, stream=True, seed=7,
        extra_body={"vllm_xargs": {"diffusion_max_steps": 8}})
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(f"[delta {len(parts)}] {chunk.choices[0].delta.content!r}", flush=True)
    return "".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    run(a.base_url, a.model)


if __name__ == "__main__":
    main()
