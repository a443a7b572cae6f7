"""`tunewise serve` on a tiny model: the official openai client, streaming and not, adapters per request
from the registry, RAG with citations, embeddings, and every bad request answered with the right 4xx
while the server keeps serving."""

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses
import pytest
import uvicorn
import yaml

from tunewise.config import load_config
from tunewise.engine import Engine
from tunewise.registry import Registry, registry_path
from tunewise.serve.app import create_app
from tunewise.serve.batcher import Call

KB = """# Card delivery

New cards arrive within 5 to 7 working days after the order.

# Fees

Top-ups by bank transfer are free; card top-ups cost 0.5 percent.
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(tiny_model: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) B, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunewise.models import load_model

    torch.manual_seed(0)
    m = load_model(str(tiny_model)).model
    peft = get_peft_model(m, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "kb").mkdir()
    (tmp / "kb" / "help.md").write_text(KB)
    (tmp / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg_path = tmp / "tunewise.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "project": "bot", "output_dir": str(tmp / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "openai", "train": "train.jsonl"}, "rag": {"knowledge_base": ["kb"], "top_k": 2},
        "serve": {"api_keys": ["sk-test"], "max_body_bytes": 20_000, "default_max_tokens": 8, "max_tokens_cap": 16, "batch_wait_ms": 20,
                  "aliases": {"ft:gpt-4.1-mini-2025-04-14:acme::abc123": "bot:1"}},
    }))
    cfg = load_config(cfg_path)
    from tunewise.rag.retrieve import build_index

    build_index(cfg)
    reg = Registry(registry_path(cfg))
    entry = reg.register("bot", _adapter(tiny_model, tmp / "adapter"), str(tiny_model), adapter=True)
    reg.promote(entry.id, {"passed": True})
    reg.close()
    app = create_app(cfg)
    with _serving(app) as url:
        yield {"url": url, "cfg": cfg, "app": app, "tiny": tiny_model, "adapter": entry}


@contextlib.contextmanager
def _serving(app):
    """The app under uvicorn on a free loopback port, in a thread, until the block ends."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def _client(server, key="sk-test"):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0)


def test_openai_client_chat_stream_and_not(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "Where is my new card?"}]
    r = c.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same text the engine gives directly (greedy)
    eng = Engine.load(str(server["tiny"]))
    assert text == eng.generate([msgs], max_new_tokens=8)[0].text
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="base", messages=msgs, max_tokens=8,
                                                                                   temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == text and len([p for p in parts if p]) >= 2, parts
    n2 = c.chat.completions.create(model="base", messages=msgs, max_tokens=4, temperature=0.8, n=2)
    assert len(n2.choices) == 2
    comp = c.completions.create(model="base", prompt="The card arrives in", max_tokens=5, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 5
    models = {m.id for m in c.models.list().data}
    assert {"base", "production", "bot:1", "bot:1+kb", "base+kb"} <= models


def test_adapter_per_request_without_reloading(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "Top up fees?"}]
    base = c.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    ada = c.chat.completions.create(model="bot:1", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    prod = c.chat.completions.create(model="production", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    assert ada == prod and ada != base
    eng = Engine.load(str(server["tiny"]))
    eng.add_adapter("a", server["adapter"].path)
    assert ada == eng.generate([msgs], max_new_tokens=8, adapter="a")[0].text
    assert base == c.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    assert server["app"].state.models.base.adapters == ["bot:1"]  # one base model, the adapter attached once


def test_a_hosted_fine_tunes_name_is_served_by_its_alias(server):
    """serve.aliases: a client of an OpenAI fine-tune changes only its base URL; the name it sends reaches registry version bot:1."""
    c = _client(server)
    msgs = [{"role": "user", "content": "Top up fees?"}]
    alias = "ft:gpt-4.1-mini-2025-04-14:acme::abc123"
    via_alias = c.chat.completions.create(model=alias, messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    assert via_alias == c.chat.completions.create(model="bot:1", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    listed = {m.id: m for m in c.models.list()}
    assert alias in listed and listed[alias].model_extra["tunewise_alias_of"] == "bot:1"
    with pytest.raises(Exception, match="invalid model name"):  # a name that is neither an alias nor a model is refused
        c.chat.completions.create(model="ft:gpt-4.1-mini:other::x", messages=msgs, max_tokens=8)


def test_rag_returns_citations_and_retrieved_chunks(server):
    r = httpx.post(server["url"] + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                   json={"model": "base+kb", "messages": [{"role": "user", "content": "How long does card delivery take?"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["retrieved"][0]["source"].endswith("help.md:1") or any("help.md" in x["source"] for x in body["retrieved"])
    assert isinstance(body["citations"], list) and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 40  # the context is in the prompt


def test_embeddings(server):
    e = _client(server).embeddings.create(model="all-minilm-l6-v2", input=["card delivery", "fees"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384 and e.usage.prompt_tokens > 0


def _post(server, path, body=None, key="sk-test", raw=None, headers=None):
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server["url"] + path, headers=h, content=raw if raw is not None else json.dumps(body), timeout=30)


@pytest.mark.parametrize("case,status,code", [
    ("malformed json", 400, "invalid_json"),
    ("unknown model", 404, "model_not_found"),
    ("traversal", 400, "invalid_model"),
    ("traversal encoded", 400, "invalid_model"),
    ("oversized", 413, "body_too_large"),
    ("bad key", 401, "invalid_api_key"),
    ("no key", 401, "invalid_api_key"),
    ("missing messages", 400, "invalid_request"),
    ("bad temperature", 400, "invalid_request"),
])
def test_bad_requests_get_the_right_4xx_and_the_server_goes_on(server, case, status, code):
    msgs = [{"role": "user", "content": "hi"}]
    r = {
        "malformed json": lambda: _post(server, "/v1/chat/completions", raw=b'{"model": "base", "messages": [}'),
        "unknown model": lambda: _post(server, "/v1/chat/completions", {"model": "bot:7", "messages": msgs}),
        "traversal": lambda: _post(server, "/v1/chat/completions", {"model": "../../etc/passwd", "messages": msgs}),
        "traversal encoded": lambda: _post(server, "/v1/chat/completions", {"model": "bot:1/../../x", "messages": msgs}),
        "oversized": lambda: _post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x" * 30_000}]}),
        "bad key": lambda: _post(server, "/v1/chat/completions", {"model": "base", "messages": msgs}, key="sk-wrong"),
        "no key": lambda: httpx.post(server["url"] + "/v1/chat/completions", json={"model": "base", "messages": msgs}),
        "missing messages": lambda: _post(server, "/v1/chat/completions", {"model": "base"}),
        "bad temperature": lambda: _post(server, "/v1/chat/completions", {"model": "base", "messages": msgs, "temperature": 9}),
    }[case]()
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and "Traceback" not in r.text and "File \"" not in r.text
    ok = _post(server, "/v1/chat/completions", {"model": "base", "messages": msgs, "max_tokens": 2})
    assert ok.status_code == 200


def test_client_disconnect_mid_stream_then_serving_goes_on(server):
    body = {"model": "base", "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 16, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"}, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # leave after the first chunk: the connection closes mid-stream
    time.sleep(0.5)
    ok = _post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200 and httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_full_queue_gets_429_with_retry_after(server):
    batcher = server["app"].state.batcher
    gate = threading.Event()
    batcher.submit(Call(lambda: gate.wait(10)))  # occupy the worker
    time.sleep(0.1)
    filled = 0
    try:
        while True:
            batcher.submit(Call(lambda: None))
            filled += 1
    except Exception:
        pass
    r = _post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    gate.set()
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    time.sleep(0.5)
    assert _post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


def test_export_for_vllm_merged_equals_adapter(server, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    cfg_path = server["cfg"].base_dir / "tunewise.yaml"
    res = CliRunner().invoke(app, ["export", str(cfg_path), "bot:1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    done = json.loads((tmp_path / "x" / "export.json").read_text())
    assert "--enable-lora" in done["commands"]["adapter"] and "bot-1=" in done["commands"]["adapter"]
    assert json.loads((tmp_path / "x" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(server["tiny"])
    msgs = [{"role": "user", "content": "Top up fees?"}]
    merged = Engine.load(str(tmp_path / "x" / "merged")).generate([msgs], max_new_tokens=8)[0].text
    eng = Engine.load(str(server["tiny"]))
    eng.add_adapter("a", server["adapter"].path)
    assert merged == eng.generate([msgs], max_new_tokens=8, adapter="a")[0].text


INTENTS = ["card_arrival", "card_linking", "exchange_rate", "cancel_transfer"]


@pytest.mark.parametrize("shape", ["structured_outputs", "guided_choice", "json_schema_enum", "json_schema_object"])
def test_answers_restricted_to_a_choice_list_in_the_shapes_clients_send(server, shape):
    msgs = [{"role": "user", "content": "When will my card arrive?"}]
    body = {"model": "base", "messages": msgs, "max_tokens": 3, "temperature": 0}
    expect = INTENTS
    if shape == "structured_outputs":
        body["structured_outputs"] = {"choice": INTENTS}
    elif shape == "guided_choice":
        body["guided_choice"] = INTENTS
    elif shape == "json_schema_enum":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "intent", "schema": {"type": "string", "enum": INTENTS}}}
        expect = [json.dumps(x) for x in INTENTS]
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "routing", "strict": True, "schema": {
            "type": "object", "properties": {"intent": {"type": "string", "enum": INTENTS}, "urgent": {"type": "boolean"}},
            "required": ["intent", "urgent"], "additionalProperties": False}}}
        expect = None
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    if expect is None:
        value = json.loads(text)
        assert value["intent"] in INTENTS and isinstance(value["urgent"], bool)
    else:
        assert text in expect, text
    free = _post(server, "/v1/chat/completions", {"model": "base", "messages": msgs, "max_tokens": 8, "temperature": 0})
    assert free.json()["choices"][0]["message"]["content"] not in INTENTS  # the tiny model does not answer a label by itself
    # streamed: the same answer
    parts = []
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                      json=body | {"stream": True}, timeout=30) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    parts.append(ch["delta"].get("content") or "")
    assert "".join(parts) == text


@pytest.mark.parametrize("extra,field", [
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"guided_choice": [f"l{i}" for i in range(60)]}, "guided_choice"),  # over MAX_CHOICES (set to 50 here)
    ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs.regex"),  # does not compile
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    ({"guided_choice": INTENTS, "guided_regex": "[a-z]+"}, "guided_choice and guided_regex"),
])
def test_constraints_that_cannot_be_enforced_are_a_400_naming_the_field(server, extra, field, monkeypatch):
    monkeypatch.setattr("tunewise.engine.constraints.MAX_CHOICES", 50)  # the real limit (10,000) does not fit the test server's body limit
    msgs = [{"role": "user", "content": "hi"}]
    r = _post(server, "/v1/chat/completions", {"model": "base", "messages": msgs, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_structured_output" and err["message"].startswith(field), err
    assert _post(server, "/v1/chat/completions", {"model": "base", "messages": msgs, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("shape", ["regex", "json_schema", "json_object"])
def test_answers_follow_a_grammar(server, shape):
    """Free-form structured output through xgrammar: a regex, a JSON schema with free values, any JSON; streamed the same."""
    msgs = [{"role": "user", "content": "Ticket number and whether it is urgent?"}]
    body = {"model": "base", "messages": msgs, "max_tokens": 24, "temperature": 0}
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}  # short enough for the test server's 16-token cap (the engine test has a longer one)
    if shape == "regex":
        body["structured_outputs"] = {"regex": r"T-[0-9]{3} (yes|no)"}
    elif shape == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema}}
        body["max_tokens"] = 16
    else:
        body["response_format"] = {"type": "json_object"}
        body["max_tokens"] = 12
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    if shape == "regex":
        assert re.fullmatch(r"T-[0-9]{3} (yes|no)", text) and finish == "stop", text
    elif shape == "json_schema":
        value = json.loads(text)
        assert set(value) == {"n"} and 0 <= value["n"] <= 9 and finish == "stop"
    else:  # a random tiny model may run out of tokens inside the JSON: what it wrote is valid so far
        assert text.lstrip().startswith(("{", "[", '"')) or text.strip()[:1].isdigit() or text.strip() in ("true", "false", "null"), text
        if finish == "stop":
            json.loads(text)
    parts = []
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                      json=body | {"stream": True}, timeout=30) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                parts += [ch["delta"].get("content") or "" for ch in json.loads(line[6:])["choices"]]
    assert "".join(parts) == text


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_every_answer_is_logged_redacted_and_feedback_is_checked(server):
    """The production log: one line per answered request (streamed too), PII redacted before it is written, with the
    model version; POST /v1/feedback takes that id and refuses bad ids, ratings and corrections with a clear 4xx."""
    cfg, h = server["cfg"], {"Authorization": "Bearer sk-test"}
    log_dir = cfg.serve_log_dir
    secret = "alice.smith@example.com"
    msgs = [{"role": "user", "content": f"My email is {secret}, where is my card?"}]
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=h, json={"model": "production", "messages": msgs, "max_tokens": 6}).json()
    c = _client(server)
    streamed = [ch for ch in c.chat.completions.create(model="base", messages=msgs, max_tokens=4, stream=True)]
    rows = {x["id"]: x for x in _rows(log_dir / "requests.jsonl")}
    got = rows[r["id"]]
    assert got["input"][0]["content"] == "My email is <EMAIL>, where is my card?" and got["model_version"] == "bot:1"
    assert got["outputs"] == [r["choices"][0]["message"]["content"]] and got["completion_tokens"] == r["usage"]["completion_tokens"]
    assert streamed[0].id in rows and rows[streamed[0].id]["model_version"] == str(server["tiny"])
    assert secret not in (log_dir / "requests.jsonl").read_text()

    def fb(**body):
        return httpx.post(server["url"] + "/v1/feedback", headers=h, json=body)

    ok = fb(id=r["id"], rating=-1, correction=f"Card arrives in 3 days; we wrote to {secret}")
    assert ok.status_code == 200 and ok.json()["status"] == "recorded"
    assert _rows(log_dir / "feedback.jsonl")[-1] == {**_rows(log_dir / "feedback.jsonl")[-1], "id": r["id"], "rating": -1,
                                                     "correction": "Card arrives in 3 days; we wrote to <EMAIL>"}
    assert secret not in (log_dir / "feedback.jsonl").read_text()
    bad = {"unknown id": (fb(id="chatcmpl-nope", rating=1), 404, "no logged response has this id"),
           "rating": (fb(id=r["id"], rating=5), 400, "rating: 5 is not -1 (bad), 0 (neutral) or 1 (good)"),
           "too long": (fb(id=r["id"], rating=1, correction="x" * 9000), 400, "correction: 9,000 characters; at most 8,000"),
           "empty": (fb(id=r["id"], rating=1, correction="  "), 400, "correction: empty"),
           "missing": (fb(rating=1), 400, "id: Field required"),
           "extra field": (fb(id=r["id"], rating=1, stars=3), 400, "stars")}
    for name, (resp, status, text) in bad.items():
        assert resp.status_code == status and text in resp.json()["error"]["message"], (name, resp.text)


def test_log_rotates_by_size_and_readers_skip_a_torn_line(tmp_path):
    from types import SimpleNamespace

    from tunewise.data.prodlog import RequestLog

    plog = RequestLog(tmp_path, max_bytes=600, fsync=False)
    out = [SimpleNamespace(text="answer", finish_reason="stop", prompt_tokens=5, completion_tokens=1)]
    for i in range(10):
        plog.log_request(f"id-{i}", "base", "m", "chat.completion", [{"role": "user", "content": f"question {i}"}], out, 0.01)
    files = plog.requests.files()
    assert len(files) > 2 and files[-1].name == "requests.jsonl" and files[0].name == "requests.1.jsonl"
    assert all(f.stat().st_size <= 600 for f in files)
    with open(files[-1], "ab") as f:
        f.write(b'{"id": "torn", "inp')  # a crash mid-write
    assert [r["id"] for r in plog.requests.rows()] == [f"id-{i}" for i in range(10)]
    again = RequestLog(tmp_path, max_bytes=10_000)
    assert again.known("id-3")  # a restarted server still knows the ids
    again.log_request("id-after", "base", "m", "chat.completion", "raw prompt", out, 0.01)  # the torn line does not swallow it
    assert [r["id"] for r in again.requests.rows()][-2:] == ["id-9", "id-after"]


def test_fields_the_server_does_not_honour_are_refused_and_seed_is_honoured(server):
    """A field that would be ignored is a 400 naming it (tools, tool_choice, logprobs...), never a 200 that ignored it;
    seed makes a sampled answer reproducible; fields without effect on the answer (user) are accepted."""
    import openai

    c = _client(server)
    msgs = [{"role": "user", "content": "Tell me about cards."}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra, field in [({"functions": [tool["function"]]}, "functions"), ({"logprobs": True}, "logprobs"),
                         ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"), ({"frequency_penalty": 0.5}, "frequency_penalty")]:
        with pytest.raises(openai.BadRequestError, match=f"{field}: .* not supported by this server"):
            c.chat.completions.create(model="base", messages=msgs, max_tokens=4, **extra)
    ok = c.chat.completions.create(model="base", messages=msgs, max_tokens=4, user="u-1", logprobs=False)
    assert ok.choices[0].message.content is not None
    a = [c.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=1.0, seed=s).choices[0].message.content
         for s in (7, 7, 8)]
    assert a[0] == a[1]  # the same seed, the same sampled answer
    with pytest.raises(openai.BadRequestError, match="tools: tool calls are a chat feature"):
        c.completions.create(model="base", prompt="hi", max_tokens=4, extra_body={"tools": [tool]})


# closed argument types: a random model's free strings could run past any token budget, an enum or a bounded integer cannot
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"]}}}
FREEZE = {"type": "function", "function": {"name": "freeze_card", "parameters": {
    "type": "object", "properties": {"card": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["card"]}}}


@pytest.fixture(scope="module")
def tool_server(server):
    """The same project served with room for a whole call (the module's server caps answers at 16 tokens)."""
    from tunewise.config import replace

    app = create_app(replace(server["cfg"], "serve", max_tokens_cap=128))
    with _serving(app) as url:
        yield {**server, "url": url, "app": app}


def _valid_calls(message, tools):
    import jsonschema

    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in by_name
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])  # parses, and fits the schema
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_tool_calls_for_every_tool_choice_parse_and_validate(tool_server):
    """On a random tiny model the constraint is what makes the calls valid: required and a named function always give a
    call of one of the tools whose arguments validate; auto gives text or valid calls; none never calls."""
    c = _client(tool_server)
    tools = [WEATHER, FREEZE]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed in range(3):
        r = c.chat.completions.create(model="base", messages=msgs, tools=tools, tool_choice="required", max_tokens=64, temperature=1.0, seed=seed,
                                      parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls" and len(_valid_calls(r.choices[0].message, tools)) == 1
    r = c.chat.completions.create(model="base", messages=msgs, tools=tools, tool_choice="required", max_tokens=128, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and len(_valid_calls(r.choices[0].message, tools)) >= 1
    named = c.chat.completions.create(model="base", messages=msgs, tools=tools, max_tokens=64, temperature=1.0, seed=5,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [n for n, _ in _valid_calls(named.choices[0].message, tools)] == ["get_weather"]
    auto = c.chat.completions.create(model="base", messages=msgs, tools=tools, tool_choice="auto", max_tokens=16, temperature=0)
    m = auto.choices[0].message
    assert (m.tool_calls and _valid_calls(m, tools)) or (m.content is not None and auto.choices[0].finish_reason in ("stop", "length"))
    none = c.chat.completions.create(model="base", messages=msgs, tools=tools, tool_choice="none", max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content is not None
    # a conversation that carries a call and its result goes on
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}]
    after = c.chat.completions.create(model="base", messages=history, tools=tools, max_tokens=8, temperature=0)
    assert after.choices[0].message is not None


def test_streamed_tool_calls_equal_non_streamed_and_bad_tool_requests_are_400s(tool_server):
    import openai

    c = _client(tool_server)
    tools = [WEATHER, FREEZE]
    msgs = [{"role": "user", "content": "Freeze my card 4"}]
    whole = c.chat.completions.create(model="base", messages=msgs, tools=tools, tool_choice="required", max_tokens=64, temperature=0)
    calls, pieces, finish = {}, 0, None
    for chunk in c.chat.completions.create(model="base", messages=msgs, tools=tools, tool_choice="required", max_tokens=64, temperature=0,
                                           stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:  # as OpenAI streams a call: id and name first, then pieces of the arguments
            if d.id is not None:
                assert d.index not in calls and d.function.name and d.function.arguments == ""
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.function.name is None
                calls[d.index][2] += d.function.arguments
                pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert [(n, a) for _, n, a in calls.values()] == [(x.function.name, x.function.arguments) for x in whole.choices[0].message.tool_calls]
    assert finish == whole.choices[0].finish_reason == "tool_calls" and pieces > len(calls)  # arguments arrive as they decode
    assert [(n, json.loads(a)) for _, n, a in calls.values()] == _valid_calls(whole.choices[0].message, tools)
    for kwargs, message in [({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice: function 'launch' is not one of tools"),
                            ({"tool_choice": "sometimes"}, "tool_choice: 'sometimes'"),
                            ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, r"tools\[0\]: expected a function with a name")]:
        with pytest.raises(openai.BadRequestError, match=message):
            c.chat.completions.create(model="base", messages=msgs, **({"tools": tools} | kwargs), max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="tool_choice: given without tools"):
        c.chat.completions.create(model="base", messages=msgs, tool_choice="required", max_tokens=8)
    orphan = msgs + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]: a tool message with no call before it"):
        c.chat.completions.create(model="base", messages=orphan, tools=tools, max_tokens=8)
