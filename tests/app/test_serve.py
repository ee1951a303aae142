"""`crofter serve` with the real `openai` client against a real server on loopback (uvicorn in a
background thread; `crofter serve` as a subprocess where the process boundary matters), on the
bundled SmolLM2-135M. No assertion reads the words of an unconstrained generation: outputs are
constrained by a grammar (json_schema, tool calls) or compared like with like on this machine."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from openai import OpenAI

from .serve_server import LiveServer, options

MODEL = "smollm2-135m"
EMBEDDER = "all-MiniLM-L6-v2"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
# A string of at least 1,500 characters: the grammar cannot end before, so the generation runs
# to max_tokens unless it is stopped (what the disconnect and queue tests need).
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 1500}}, "required": ["text"]}}}


@pytest.fixture(scope="module")
def server():
    with LiveServer(options(models=[MODEL], queue=16)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def chat(client, content="Say hello.", **kw):
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# -- models ---------------------------------------------------------------------------------------
def test_models_lists_the_offered_gguf_and_the_embedder(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, EMBEDDER]
    assert client.models.retrieve(MODEL).id == MODEL


def test_models_without_a_filter_lists_the_store(crofter_home, bundled_path):
    from models.registry import Registry

    Registry().add(bundled_path, name="smol-copy")
    with LiveServer(options()) as s:
        ids = [m.id for m in OpenAI(base_url=s.url, api_key="x", max_retries=0).models.list().data]
    assert set(ids) == {MODEL, "smol-copy", EMBEDDER}


# -- chat -----------------------------------------------------------------------------------------
def test_streamed_deltas_join_to_the_non_streamed_text(client):
    kw = dict(content="Name three colours.", max_tokens=24, temperature=0, seed=7)
    chat(client, **kw)  # warm-up: B and C below then start from the same KV-cache state
    stream = chat(client, stream=True, stream_options={"include_usage": True}, **kw)
    pieces, finish, usage, roles = [], None, None, []
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    whole = chat(client, **kw)
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1, "the reply came in one piece: not streamed"
    assert roles == ["assistant"]
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    r = chat(client, "Pick a colour and a number.", max_tokens=40, temperature=0,
             response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_output_is_an_object(client):
    r = chat(client, "Describe a cat as JSON.", max_tokens=48, temperature=0, response_format={"type": "json_object"},
             stop=["}"])  # stop early: the grammar's object then needs only to start right
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_required_tool_choice_returns_a_well_formed_tool_call(client):
    r = chat(client, "What is the weather in Paris?", tools=[WEATHER, TIME], tool_choice="required", max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def test_named_tool_choice_calls_that_tool_streamed(client):
    stream = chat(client, "Hello", tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
                  max_tokens=48, temperature=0, stream=True)
    calls, finish = [], None
    for ch in stream:
        for c in ch.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls
    assert call.index == 0 and call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_a_tool_result_from_the_client_is_answered(client):
    """The round trip: the client ran the call and sends the result back; the server answers it."""
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")  # tool_choice none: never a call
    assert r.usage.prompt_tokens > 0 and r.choices[0].message.tool_calls is None


def test_translate_renders_tool_results_as_the_tool_loop_does():
    from app.serve.chat import translate
    from app.serve.requests import ChatRequest
    from app.tools.calling import ToolCall, result_message

    req = ChatRequest.model_validate({"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})
    history, text = translate(req.messages, tool_role=False)
    assert text is None  # the last message is a tool result: the turn answers the history
    assert history == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"tool": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "user", "content": result_message(ToolCall("get_weather", {}, "ok", "sunny"))}]
    assert translate(req.messages, tool_role=True)[0][-1] == {"role": "tool", "name": "get_weather", "content": "ok: sunny"}


def test_reasoning_and_sources_are_translated():
    from app.serve.chat import Chunks
    from app.turn import ThinkingDelta

    (chunk,) = Chunks(MODEL, "chatcmpl-x", False).for_event(ThinkingDelta("hmm"))
    assert json.loads(chunk)["choices"][0]["delta"] == {"reasoning_content": "hmm"}


def test_a_prompt_over_the_window_is_a_400_naming_the_sizes(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "word " * 3000)
    err = info.value.body
    assert err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and "tokens" in err["message"]
    # Answered by the route, not the catch-all: the keep-alive connection is still good.
    assert client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices[0].finish_reason


# -- completions ------------------------------------------------------------------------------------
def _raw_logprobs(bundled_path, tokens):
    """The same tokens scored by plain llama-cpp-python (logits_all), no crofter code."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(bundled_path), n_ctx=1024, logits_all=True, n_threads=1, verbose=False)
    try:
        llm.eval(tokens)
        rows = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    m = rows.max(axis=1, keepdims=True)
    logp = rows - m - np.log(np.exp(rows - m).sum(axis=1, keepdims=True))
    return [float(logp[i - 1, tokens[i]]) for i in range(1, len(tokens))]


def test_echo_logprobs_with_no_tokens_score_every_prompt_token(client, bundled_path):
    from llama_cpp import Llama

    text = "The capital of France is Paris, and the capital of Italy is Rome."
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    vocab = Llama(model_path=str(bundled_path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert choice.text == text
    assert len(lp.token_logprobs) == len(tokens) == len(lp.tokens) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rest = lp.token_logprobs[1:]
    assert all(math.isfinite(x) and x <= 0 for x in rest)
    assert all(len(t) == 3 and max(t.values()) >= x - 1e-9 for t, x in zip(lp.top_logprobs[1:], rest))
    assert "".join(lp.tokens) == text and lp.text_offset[1] == len(lp.tokens[0])
    assert np.allclose(rest, _raw_logprobs(bundled_path, tokens), atol=1e-3)


def test_lm_eval_loglikelihood_request_with_token_ids(client):
    """lm-evaluation-harness local-completions: token ids, echo, logprobs 1, max_tokens 1."""
    ids = [504, 3575, 282, 4649, 314]
    r = httpx.post(str(client.base_url.join("completions")), timeout=60, json={
        "model": MODEL, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's tokens, then the generated one
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])


def test_completion_streams_the_same_text(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, seed=3)
    client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == client.completions.create(**kw).choices[0].text


def test_frequency_and_presence_penalties_reach_the_sampler(client):
    """Like with like on this machine: greedy, the same prompt and seed, so the reply is the same
    every time unless the penalty reaches llama.cpp's sampler (2 logits per earlier occurrence of
    a token moves a greedy pick within 24 tokens; an ignored field would change nothing)."""
    from app.config import Settings
    from app.serve.chat import sampling_for
    from app.serve.requests import ChatRequest

    req = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], frequency_penalty=0.5, presence_penalty=-1)
    s = sampling_for(req, Settings())
    assert (s.frequency_penalty, s.presence_penalty) == (0.5, -1)
    kw = dict(model=MODEL, prompt="the " * 10, max_tokens=24, temperature=0, seed=1)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == plain
    penalized = client.completions.create(frequency_penalty=2.0, **kw).choices[0].text
    assert penalized != plain and client.completions.create(frequency_penalty=2.0, **kw).choices[0].text == penalized
    present = client.completions.create(presence_penalty=2.0, **kw).choices[0].text
    assert present != plain


# -- embeddings -----------------------------------------------------------------------------------
def test_embeddings_have_the_embedders_dimension_and_vectors(client):
    from app import documents

    texts = ["a cat on a mat", "GGUF files"]
    e = client.embeddings.create(model=EMBEDDER, input=texts)  # base64 by default
    own = documents.embedder(EMBEDDER)
    assert [d.index for d in e.data] == [0, 1]
    assert all(len(d.embedding) == own.dimension == 384 for d in e.data)
    # The same texts in the same batch (a bf16 embedder's numbers move by ~1e-3 with the batch's padding).
    assert np.allclose([d.embedding for d in e.data], own.encode(texts), atol=1e-5)
    floats = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    assert np.allclose([d.embedding for d in floats.data], [d.embedding for d in e.data], atol=1e-6)


# -- the HTTP edge ----------------------------------------------------------------------------------
def test_a_wrong_key_gets_401_in_openai_shape():
    with LiveServer(options(models=[MODEL], api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError) as info:
            OpenAI(base_url=s.url, api_key="wrong", max_retries=0).models.list()
        assert info.value.status_code == 401
        assert set(info.value.body) == {"message", "type", "param", "code"}
        assert info.value.body["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/models").status_code == 401  # no key at all
        assert [m.id for m in OpenAI(base_url=s.url, api_key="s3cret").models.list().data][0] == MODEL


@pytest.mark.parametrize("body,status,needle", [
    (b'{"model": "smollm2-135m", "messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "must be a JSON object"),
    (b'{"model": "smollm2-135m"}', 400, "messages: Field required"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400, "temperature"),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "no-such-model"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "' + b"x" * (10 * 1024 * 1024) + b'"}]}', 413, "bytes"),
], ids=["malformed-json", "not-an-object", "missing-field", "bad-role", "temperature-range", "unknown-model", "10MB-body"])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, needle):
    r = httpx.post(server.url + "/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]


def test_paths_tolerate_doubled_and_trailing_slashes_and_unknown_routes_are_shaped(server):
    base = server.url[: -len("/v1")]
    assert httpx.get(base + "//v1//models/").json()["data"][0]["id"] == MODEL
    r = httpx.get(base + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_cors_is_off_unless_asked(server):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(server.url + "/chat/completions", headers=preflight).headers
    with LiveServer(options(models=[MODEL], cors=["http://ui.example"], api_key="k")) as s:
        r = httpx.options(s.url + "/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://ui.example"


# -- the command ----------------------------------------------------------------------------------------
def test_crofter_serve_binds_loopback_and_serves(crofter_home):
    env = dict(os.environ, CROFTER_HOME=str(crofter_home), CROFTER_API_KEY="envkey")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", "0", "--models", MODEL],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.startswith("crofter: serving smollm2-135m on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        ok = OpenAI(base_url=url, api_key="envkey", max_retries=0).models.list()
        assert ok.data[0].id == MODEL
        assert httpx.get(url + "/models").status_code == 401  # the key from CROFTER_API_KEY is required
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_crofter_serve_refuses_an_unknown_model_in_one_line(crofter_home):
    r = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--models", "nope"], capture_output=True, text=True,
                       env=dict(os.environ, CROFTER_HOME=str(crofter_home)), timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crofter: error: no model named 'nope'"), lines


# -- documents -------------------------------------------------------------------------------------------
def test_crofter_collections_ground_the_answer_and_return_the_sources(crofter_home, tmp_path):
    from app import documents
    from app.config import Settings

    doc = tmp_path / "lighthouse.md"
    doc.write_text("# Keepers\n\nThe Skerry lighthouse keeper in 1901 was Morag Lindqvist; she kept the lamp for 30 years.\n")
    settings = Settings(temperature=0.0, seed=1, max_tokens=24)
    with documents.open_store(settings) as store:
        documents.ingestor(store, settings, "notes").run([str(doc)], "notes")
    with LiveServer(options(models=[MODEL], settings=settings)) as s:
        r = httpx.post(s.url + "/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Who kept the Skerry lighthouse in 1901?"}],
            "max_tokens": 24, "temperature": 0, "crofter": {"collections": ["notes"]}})
        assert r.status_code == 200, r.text
        ext = r.json()["crofter"]
        assert [src["source"] for src in ext["retrieved"]] == [str(doc)]
        assert {src["n"] for src in ext["sources"]} <= {1}  # what the answer cites is among the retrieved
        r = httpx.post(s.url + "/chat/completions", timeout=120, json={  # with crofter's tools on, it searches itself
            "model": MODEL, "messages": [{"role": "user", "content": "Who kept the Skerry lighthouse in 1901?"}],
            "max_tokens": 48, "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "search_documents"}},
            "crofter": {"collections": ["notes"], "tools": ["calculator"]}})
        assert r.status_code == 200, r.text
        call = r.json()["crofter"]["calls"][0]
        assert call["name"] == "search_documents" and call["status"] == "ok" and "Morag Lindqvist" in call["result"]
        bad = httpx.post(s.url + "/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "crofter": {"collections": ["nope"]}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "crofter.collections"
