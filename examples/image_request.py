"""Image input with vLLM + dgemma_vllm: offline and through the OpenAI client.

    python examples/image_request.py [--model PATH] [--image FILE]    # offline, default: the tiny checkpoint
    python examples/image_request.py --server http://127.0.0.1:8000 --served-model-name NAME [--image FILE]

One ``<|image|>`` per image in a raw prompt (the chat template places it for chat messages);
the plugin expands it to the image's soft tokens. Random weights produce gibberish; use a real
DiffusionGemma checkpoint for real descriptions.
"""

from __future__ import annotations

import argparse
import base64
import io


def demo_image():
    """A 96x64 picture drawn with PIL (no file needed): sky, sea and a sun."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 40, 96, 64], fill=(20, 70, 160))
    d.ellipse([60, 6, 84, 30], fill=(250, 210, 60))
    return img


def run_offline(llm, image) -> list[str]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=32, seed=1, extra_args={"diffusion_max_steps": 8})
    # 1. a chat message with an image part (the chat template places the image token)
    chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    texts = [llm.chat([chat], sp, use_tqdm=False)[0].outputs[0].text]
    # 2. a raw prompt with one <|image|> where the image belongs
    prompt = "<|turn>user\n<|image|>Describe the colours.<turn|>\n<|turn>model\n"
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], sp,
                       use_tqdm=False)[0]
    texts.append(out.outputs[0].text)
    for t in texts:
        print(f"-> {t!r}")
    return texts


def run_openai(base_url: str, image, model: str) -> str:
    import openai

    buf = io.BytesIO()
    image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
    r = client.chat.completions.create(
        model=model, max_tokens=32, seed=1, extra_body={"vllm_xargs": {"diffusion_max_steps": 8}},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in this picture?"}]}])
    text = r.choices[0].message.content or ""
    print(f"-> {text!r} ({r.usage.prompt_tokens} prompt tokens, image included)")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--image", default=None, help="an image file (default: a drawn picture)")
    ap.add_argument("--server", default=None, help="base URL of a running `vllm serve`")
    ap.add_argument("--served-model-name", default=None)
    a = ap.parse_args()
    from PIL import Image

    image = Image.open(a.image).convert("RGB") if a.image else demo_image()
    if a.server:
        run_openai(a.server, image, a.served_model_name or a.model)
        return
    from vllm import LLM

    from dgemma_vllm.checkpoints.factory import cached_checkpoint

    model = a.model or str(cached_checkpoint("tiny"))
    run_offline(LLM(model, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024), image)


if __name__ == "__main__":
    main()
