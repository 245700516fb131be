"""Offline generation with vLLM + dgemma_vllm, with per-request diffusion knobs.

    python examples/offline_generate.py [--model PATH]   # default: the tiny random-weight checkpoint

Random weights produce gibberish; use a real DiffusionGemma checkpoint for real text.
"""

from __future__ import annotations

import argparse


def run(llm, max_tokens: int = 40) -> list[str]:
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=max_tokens, seed=1),                                   # reference defaults
        SamplingParams(max_tokens=max_tokens, seed=2, extra_args={"diffusion_max_steps": 8}),
        SamplingParams(max_tokens=max_tokens, temperature=0.5,                            # colder schedule
                       extra_args={"diffusion_max_steps": 8, "diffusion_entropy_bound": 0.5}),
    ]
    chats = [[{"role": "user", "content": q}] for q in
             ("Why is the sky blue?", "Write a haiku about rain.", "Explain block diffusion.")]
    outs = llm.chat(chats, params, use_tqdm=False)
    texts = []
    for chat, o in zip(chats, outs):
        texts.append(o.outputs[0].text)
        print(f"{chat[0]['content']!r} -> {len(o.outputs[0].token_ids)} tokens: {o.outputs[0].text!r}")
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    from vllm import LLM

    from dgemma_vllm.checkpoints.factory import cached_checkpoint

    model = a.model or str(cached_checkpoint("tiny"))
    run(LLM(model, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024))


if __name__ == "__main__":
    main()
