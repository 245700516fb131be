"""Editing / infill: start the first canvas from your own tokens and pin the ones to keep.

    python examples/infill_pinned.py [--model PATH]

`diffusion_seed_canvas` is the starting canvas (exactly one canvas of token ids);
`diffusion_pinned` lists canvas positions that keep their seed token through every denoising
step and in the committed output; the other positions are refined (infilled) around them.
"""

from __future__ import annotations

import argparse


def run(llm, canvas_length: int) -> list[int]:
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    keep = tok.encode("The quick brown fox", add_special_tokens=False)
    tail = tok.encode(" lazy dog.", add_special_tokens=False)
    seed = [tok.pad_token_id] * canvas_length
    pinned = list(range(len(keep))) + list(range(canvas_length - len(tail), canvas_length))
    seed[: len(keep)] = keep
    seed[canvas_length - len(tail):] = tail
    sp = SamplingParams(max_tokens=canvas_length, seed=0, ignore_eos=True,
                        extra_args={"diffusion_seed_canvas": seed, "diffusion_pinned": pinned,
                                    "diffusion_max_steps": 8})
    out = llm.generate("Complete the sentence:", sp, use_tqdm=False)[0].outputs[0]
    ids = list(out.token_ids)
    assert all(ids[i] == seed[i] for i in pinned), "pinned tokens must survive"
    print(f"pinned {len(pinned)} of {canvas_length} positions; output: {out.text!r}")
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    from vllm import LLM

    from dgemma_vllm.checkpoints.factory import cached_checkpoint

    model = a.model or str(cached_checkpoint("tiny"))
    llm = LLM(model, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024)
    canvas = llm.llm_engine.model_config.hf_config.dgemma_canvas_length
    run(llm, canvas)


if __name__ == "__main__":
    main()
