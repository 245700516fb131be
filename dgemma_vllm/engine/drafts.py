"""Streaming intermediate drafts (``diffusion_stream_drafts``) on the OpenAI server.

A request that opts in gets, after every denoising step that does not end its canvas, the
current argmax canvas as an extra stream chunk whose choice carries no text and a
``dgemma_draft`` object::

    {"index": 0, "text": "", "finish_reason": null,
     "dgemma_draft": {"token_ids": [...], "text": "...", "step": 2, "num_committed": 32}}

(chat: ``"delta": {}`` instead of ``"text"``). ``num_committed`` is the number of tokens
committed before this canvas, ``step`` the denoising step within it. Drafts are raw canvases:
EOS, stop strings and ``max_tokens`` apply only to committed text, which streams exactly as
without drafts (a draft never becomes output). Non-streaming requests get no drafts.

How: the runner and scheduler put each draft in a token-less engine output
(``kv_transfer_params["dgemma_draft"]``, see scheduler.py). vLLM's streaming generators for
completions and chat are wrapped here, in the API server process only: the original generator
runs in a task over the request's outputs with the drafts taken out (so it sees exactly the
outputs it would see without drafts), and the draft chunks are interleaved as they arrive.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json

_installed = False


def _wants_drafts(request) -> bool:
    xargs = getattr(request, "vllm_xargs", None) or {}
    return bool(xargs.get("diffusion_stream_drafts")) and bool(getattr(request, "stream", False))


def _wrap(orig, chat: bool):
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    async def generator(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        request = bound.arguments["request"]
        if not _wants_drafts(request):
            async for chunk in orig(self, *args, **kwargs):
                yield chunk
            return
        request_id = bound.arguments["request_id"]
        model_name = bound.arguments["model_name"]
        tokenizer = bound.arguments.get("tokenizer")
        created = bound.arguments.get("created_time")
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def draft_chunk(index: int, draft: dict) -> str:
            text = None
            if tokenizer is not None:
                try:
                    text = tokenizer.decode(draft["token_ids"])
                except Exception:  # ids outside the tokenizer's vocabulary
                    text = None
            choice = {"index": index, "logprobs": None, "finish_reason": None,
                      "dgemma_draft": {**draft, "text": text}}
            if chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            return "data: " + json.dumps({
                "id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created if created is not None else 0, "model": model_name,
                "choices": [choice]}) + "\n\n"

        async def source(results):
            async for item in results:
                res = item if chat else item[1]
                kv = res.kv_transfer_params
                draft = kv.pop("dgemma_draft", None) if isinstance(kv, dict) else None
                if isinstance(kv, dict) and not kv:
                    res.kv_transfer_params = None
                if res.finished or any(o.token_ids or o.text or o.finish_reason for o in res.outputs):
                    yield item
                if draft is not None and not res.finished:
                    index = 0 if chat else item[0]
                    queue.put_nowait(draft_chunk(index, draft))

        bound.arguments["result_generator"] = source(bound.arguments["result_generator"])

        async def run():
            try:
                async for chunk in orig(*bound.args, **bound.kwargs):
                    await queue.put(chunk)
            except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
                await queue.put(e)
            finally:
                await queue.put(done)

        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()  # a client disconnect cancels the original, which aborts the request

    return generator


def install() -> None:
    """Wrap the two OpenAI streaming generators (API server process only)."""
    global _installed
    if _installed:
        return
    from . import vllm_api as V

    completion_cls, chat_cls = V.openai_serving_classes()
    completion_cls.completion_stream_generator = _wrap(
        completion_cls.completion_stream_generator, chat=False)
    chat_cls.chat_completion_stream_generator = _wrap(
        chat_cls.chat_completion_stream_generator, chat=True)
    _installed = True
