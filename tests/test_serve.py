"""d2f-serve through the real ``openai`` client on 127.0.0.1: completions and chat, streamed and
not, equal to ``model.generate`` on each prompt alone also when 32 clients decode together; every
bad input answered with OpenAI's error shape while the server stays up; a full queue; a client
that disconnects mid-stream freeing its row."""

import asyncio
import copy
import json
import random
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from d2f_ext import AutoD2FModel, D2FConfig
from d2f_ext.cli import DEFAULT_MODEL
from d2f_ext.serve.server import BackgroundServer, build_app

NAME = "d2f-math"
TIMEOUT = 60  # seconds, for every call: a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def model():
    return AutoD2FModel.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def server(model):
    with BackgroundServer(build_app(model, name=NAME, max_batch=8, max_queue=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
        yield c


def _question(rng: random.Random) -> str:
    name = rng.choice(["Mia", "Tom", "Ava", "Leo", "Zoe", "Max"])
    a, b, c = rng.randint(2, 30), rng.randint(2, 20), rng.randint(1, 9)
    return (f"{name} has {a} apples. {name} buys {b} more apples and then gives {c} of them. "
            f"How many apples does {name} have now?")


def _chat_ids(model, question: str) -> list[int]:
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _alone(model, ids: list[int], stop=(), **kwargs):
    """(text, completion tokens, forwards) of ``model.generate`` on this prompt alone; the text
    cut before the first stop string, as OpenAI's API returns it."""
    tok = model.tokenizer
    out = model.generate(torch.tensor([ids]), return_dict_in_generate=True,
                         stop_strings=list(stop) or None, **kwargs)
    n = int(out.new_tokens[0])
    text = tok.decode(out.sequences[0, len(ids): len(ids) + n], skip_special_tokens=True)
    for s in stop:
        if s in text:
            text = text[: text.find(s)]
    return text, n, int(out.forwards[0])


def _post(server, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get_health(server) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    client.completions.create(model=NAME, prompt="Tom has", max_tokens=16)
    status, h = _get_health(server)
    assert status == 200 and h["status"] == "ok" and h["active"] == h["outstanding"] == 0
    assert h["steps"] > 0 and h["step_seconds"] > 0  # the benchmark's profile of engine time


def test_chat_equals_generate_alone(model, client):
    question = _question(random.Random(0))
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}])
    text, n, forwards = _alone(model, _chat_ids(model, question))
    assert "The answer is" in text  # a realistic completion, not an empty one
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(_chat_ids(model, question)), n,
                                                                      u.prompt_tokens + n)
    assert u.model_extra["forwards"] == forwards
    assert u.model_extra["tokens_per_forward"] == pytest.approx(n / forwards, abs=1e-3)


def _cut_at_first_equals(model, question: str) -> tuple[int, str, int]:
    """(the id of " =", the completion's text before its first one, that many tokens)."""
    ids = _chat_ids(model, question)
    full = model.generate(torch.tensor([ids]))[0, len(ids):].tolist()
    stop_id = model.tokenizer.convert_tokens_to_ids("▁=")
    k = full.index(stop_id)
    return stop_id, model.tokenizer.decode(full[:k], skip_special_tokens=True), k


def test_stop_token_ids_end_the_completion(model, client):
    question = _question(random.Random(0))
    stop_id, text, k = _cut_at_first_equals(model, question)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                       extra_body={"stop_token_ids": [stop_id]})
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, "stop", k)


def test_a_list_of_eos_ids_in_the_generation_config_ends_at_any(model, monkeypatch):
    question = _question(random.Random(0))
    stop_id, text, k = _cut_at_first_equals(model, question)
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = [model.config.eos_token_id, stop_id]
    monkeypatch.setattr(model, "generation_config", gc)
    with BackgroundServer(build_app(model, name=NAME, max_batch=1, max_queue=0)) as s:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
            r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}])
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, "stop", k)


def test_streams_add_up_to_the_whole_completion(model, client):
    question = _question(random.Random(1))
    whole = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}])
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(bool(t) for t in content) >= 2  # sent as it became final, not in one piece
    assert "".join(content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=48)
    streamed = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=48, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    text, _, _ = _alone(model, _chat_ids(model, question), max_new_tokens=48)
    assert plain.choices[0].text == text


def test_token_id_prompt_and_max_tokens(model, client):
    ids = _chat_ids(model, _question(random.Random(2)))
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=16)
    text, n, _ = _alone(model, ids, max_new_tokens=16)
    assert r.choices[0].text == text and r.usage.completion_tokens == n <= 16
    assert r.choices[0].finish_reason == "length"



@pytest.mark.parametrize("max_tokens", [5, 17, 21])
def test_max_tokens_between_blocks_is_exact(model, client, max_tokens):
    """D2F decodes whole blocks of 16: the server decodes the blocks that cover max_tokens and
    ends the completion there, with what the longer decode has in those positions."""
    ids = _chat_ids(model, _question(random.Random(2)))
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=max_tokens)
    _, n, _ = _alone(model, ids, max_new_tokens=48)
    assert n > max_tokens  # the question's answer runs past the bound
    assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
    cut = model.generate(torch.tensor([ids]), max_new_tokens=48)[0, len(ids):len(ids) + max_tokens]
    assert r.choices[0].text == model.tokenizer.decode(cut, skip_special_tokens=True)

def test_stop_cuts_before_the_stop_string(model, client):
    question = _question(random.Random(3))
    full = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}])
    full = full.choices[0].message.content
    stop = "The answer"
    assert stop in full
    for stream in (False, True):
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                           stop=[stop, "never appears"], stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[: full.find(stop)]
        assert reason == "stop"


def test_sampling_follows_the_seed(model, client):
    ids = _chat_ids(model, _question(random.Random(4)))
    # Hot enough that the shipped model, sure of most tokens, still samples differently per seed.
    kw = dict(model=NAME, prompt=ids, temperature=1.5, top_p=1.0, max_tokens=48)
    a = client.completions.create(seed=11, **kw).choices[0].text
    assert client.completions.create(seed=11, **kw).choices[0].text == a
    texts = {client.completions.create(seed=s, **kw).choices[0].text for s in range(12, 16)}
    assert len(texts | {a}) > 1  # the seed matters
    alone, _, _ = _alone(model, ids, do_sample=True, temperature=1.5, top_p=1.0, seed=11, max_new_tokens=48)
    assert a == alone


def test_32_concurrent_clients_each_as_alone(model, server):
    """32 clients at once over 8 rows (the rest queue): greedy chats and completions, sampled ones,
    stop strings and streams mixed; each equals model.generate on its prompt alone."""
    rng = random.Random(5)
    jobs = []
    for i in range(32):
        job = {"q": _question(rng), "chat": i % 2 == 0, "stream": i % 3 == 0,
               "max_tokens": rng.choice([None, 16, 32, 48]), "stop": ["answer is"] if i % 5 == 0 else None,
               "sample": i % 7 == 3}
        jobs.append(job)

    async def one(c: openai.AsyncOpenAI, job) -> str:
        kw = dict(model=NAME, max_tokens=job["max_tokens"], stop=job["stop"], stream=job["stream"])
        kw = {k: v for k, v in kw.items() if v is not None}
        if job["sample"]:
            kw.update(temperature=0.8, seed=99)
        if job["chat"]:
            r = await c.chat.completions.create(messages=[{"role": "user", "content": job["q"]}], **kw)
            if job["stream"]:
                return "".join([ch.choices[0].delta.content or "" async for ch in r if ch.choices])
            return r.choices[0].message.content
        r = await c.completions.create(prompt=_chat_ids(model, job["q"]), **kw)
        if job["stream"]:
            return "".join([ch.choices[0].text async for ch in r if ch.choices])
        return r.choices[0].text

    async def everyone():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT,
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, j) for j in jobs))

    served = asyncio.run(asyncio.wait_for(everyone(), 4 * TIMEOUT))
    for job, text in zip(jobs, served):
        kw = {"max_new_tokens": job["max_tokens"]}
        if job["sample"]:
            kw.update(do_sample=True, temperature=0.8, seed=99)
        alone, _, _ = _alone(model, _chat_ids(model, job["q"]), stop=job["stop"] or (), **kw)
        assert text == alone, job
    assert server.app.state.engine_loop.engine.num_active == 0


BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "d2f-math", "prompt": ', 400, None),
    ("wrong type", "/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("list of prompts", "/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ("no prompt", "/v1/completions", {"model": NAME}, 400, "prompt"),
    ("no messages", "/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("prompt over the context", "/v1/completions", {"model": NAME, "prompt": [5] * 600}, 400, "prompt"),
    ("mask token in the prompt", "/v1/completions", {"model": NAME, "prompt": [5, 1, 5]}, 400, "prompt"),
    ("mask token's text in the prompt", "/v1/completions", {"model": NAME, "prompt": "Tom <|mask|> has"}, 400,
     "prompt"),
    ("mask token's text in a message", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "Tom <|mask|> has"}]}, 400, "messages"),
    ("max_completion_tokens 0", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("echo", "/v1/completions", {"model": NAME, "prompt": "hi", "echo": True}, 400, "echo"),
    ("logprobs 0", "/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 0}, 400, "logprobs"),
    ("chat logprobs", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ("top_logprobs", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("best_of 2", "/v1/completions", {"model": NAME, "prompt": "hi", "best_of": 2}, 400, "best_of"),
    ("suffix", "/v1/completions", {"model": NAME, "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("presence_penalty", "/v1/completions", {"model": NAME, "prompt": "hi", "presence_penalty": 0.5}, 400,
     "presence_penalty"),
    ("frequency_penalty", "/v1/completions", {"model": NAME, "prompt": "hi", "frequency_penalty": 1}, 400,
     "frequency_penalty"),
    ("logit_bias", "/v1/completions", {"model": NAME, "prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("response_format json", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("tools", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tool_choice", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, 400, "tool_choice"),
    ("stream_options without stream", "/v1/completions",
     {"model": NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("max_tokens 0", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens past the context", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("temperature out of range", "/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 3}, 400,
     "temperature"),
    ("top_p 0", "/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("n 2", "/v1/completions", {"model": NAME, "prompt": "hi", "n": 2}, 400, "n"),
    ("empty stop", "/v1/completions", {"model": NAME, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("stop_token_ids past the vocabulary", "/v1/completions",
     {"model": NAME, "prompt": "hi", "stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
    ("negative stop_token_ids", "/v1/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": [-1]}, 400,
     "stop_token_ids"),
    ("stop_token_ids text", "/v1/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": ["7"]}, 400,
     "stop_token_ids"),
    ("unknown route", "/v1/embeddings", {"model": NAME, "input": "hi"}, 404, None),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_an_openai_error_and_the_server_stays_up(server, client, case):
    _, path, body, status, param = case
    code, reply = _post(server, path, body)
    assert code == status, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["message"] and reply["error"]["param"] == param
    assert client.completions.create(model=NAME, prompt="Tom has", max_tokens=16).choices[0].finish_reason


def test_nulls_and_defaults_of_unsupported_fields_are_accepted(server):
    """What the openai client, or a client that fills in every field, may send explicitly."""
    for path, body in [
        ("/v1/completions", {"prompt": "Tom has", "n": None, "stream": None, "echo": False, "logprobs": None,
                             "best_of": 1, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0.0,
                             "logit_bias": {}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": None, "stream": None,
                                  "logprobs": False, "top_logprobs": None, "response_format": {"type": "text"},
                                  "tools": [], "tool_choice": "none", "stream_options": None}),
    ]:
        code, reply = _post(server, path, {"model": NAME, "max_tokens": 16, **body})
        assert code == 200, reply
        assert len(reply["choices"]) == 1 and reply["choices"][0]["finish_reason"]


def test_top_p_or_seed_alone_samples_at_temperature_1(model, client):
    """As in OpenAI, where temperature defaults to 1."""
    ids = model.tokenizer("Tom has", add_special_tokens=False)["input_ids"]  # an uncertain continuation
    greedy, _, _ = _alone(model, ids, max_new_tokens=48)
    for top_p in (None, 0.99):
        kw = {} if top_p is None else {"top_p": top_p}
        seeded = [client.completions.create(model=NAME, prompt=ids, seed=s, max_tokens=48, **kw).choices[0].text
                  for s in range(4)]
        assert seeded == [_alone(model, ids, do_sample=True, temperature=1.0, seed=s, max_new_tokens=48, **kw)[0]
                          for s in range(4)]
        assert set(seeded) != {greedy}


def test_openai_client_raises_the_status(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)


@pytest.fixture
def one_row(model):
    """A server with one row and no queue."""
    with BackgroundServer(build_app(model, name=NAME, max_batch=1, max_queue=0)) as s:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
            yield s, c


def test_full_queue_is_429(one_row, model):
    server, client = one_row
    engine_loop = server.app.state.engine_loop
    loop = asyncio.new_event_loop()  # never run: the held request's events just wait there
    try:
        held = engine_loop.submit(_chat_ids(model, "Hi"), D2FConfig(block_size=16, max_new_tokens=16), loop=loop)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt="Tom has", max_tokens=16)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        engine_loop.release(held)
        assert client.completions.create(model=NAME, prompt="Tom has", max_tokens=16).usage.completion_tokens > 0
    finally:
        loop.close()


def _poll(condition, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _gate(engine, monkeypatch):
    """(a semaphore each engine step takes, the requests added): the test decides when the
    engine steps, so a request is still decoding when its client leaves."""
    allowed = threading.Semaphore(0)
    step, add = engine.step, engine.add_request
    added = []

    def gated_step():
        assert allowed.acquire(timeout=TIMEOUT)
        return step()

    def recorded_add(*args, **kwargs):
        added.append(add(*args, **kwargs))
        return added[-1]

    monkeypatch.setattr(engine, "step", gated_step)
    monkeypatch.setattr(engine, "add_request", recorded_add)
    return allowed, added

def test_disconnect_mid_stream_frees_the_row(one_row, model, monkeypatch):
    """The engine steps only when the test lets it, so the request is still decoding when its
    client leaves: it is aborted (not finished), and the row is free for the next request."""
    server, client = one_row
    engine_loop = server.app.state.engine_loop
    engine = engine_loop.engine
    allowed, added = _gate(engine, monkeypatch)
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": _question(random.Random(6))}],
                                            stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    allowed.release()  # one step: the request takes the row
    assert _poll(lambda: engine.num_active == 1)
    stream.close()
    assert _poll(lambda: engine_loop.outstanding == 0)  # the server saw the client leave
    allowed.release(1000)
    assert _poll(lambda: engine.num_active == 0 and not engine.has_work())
    assert [r.finish_reason for r in added] == ["abort"]
    monkeypatch.undo()
    assert client.completions.create(model=NAME, prompt="Tom has", max_tokens=16).choices[0].finish_reason


def test_disconnect_without_stream_frees_the_row(one_row, model, monkeypatch):
    """A non-streaming client that times out: its request is aborted and its row freed while the
    engine is still held back, not when the request would have finished."""
    server, client = one_row
    engine_loop = server.app.state.engine_loop
    engine = engine_loop.engine
    allowed, added = _gate(engine, monkeypatch)
    allowed.release()  # one step: the request takes the row, then decoding waits
    with pytest.raises(openai.APITimeoutError):  # its connection is closed
        client.with_options(timeout=1.0).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": _question(random.Random(6))}])
    assert _poll(lambda: engine_loop.outstanding == 0, timeout=5)  # the server saw the client leave
    allowed.release(1000)
    assert _poll(lambda: engine.num_active == 0 and not engine.has_work())
    assert [r.finish_reason for r in added] == ["abort"]
    monkeypatch.undo()
    assert client.completions.create(model=NAME, prompt="Tom has", max_tokens=16).choices[0].finish_reason


def _failing(engine, monkeypatch, *names):
    """Make each named engine method raise, as a device error would."""
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    for name in names:
        monkeypatch.setattr(engine, name, fail)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(one_row, model, monkeypatch):
    server, client = one_row
    engine = server.app.state.engine_loop.engine
    _failing(engine, monkeypatch, "step")
    with pytest.raises(openai.InternalServerError, match="the engine failed: RuntimeError: CUDA error"):
        client.completions.create(model=NAME, prompt="Tom has", max_tokens=16)
    monkeypatch.undo()
    assert _poll(lambda: not engine.has_work())  # the failed request gave its row back
    assert _get_health(server)[0] == 200
    assert client.completions.create(model=NAME, prompt="Tom has", max_tokens=16).choices[0].finish_reason


def test_an_engine_that_cannot_abort_is_down_and_says_so(one_row, model, monkeypatch):
    """A step fails and so does aborting its requests (a device error that sticks): the client
    hears the error, /health turns 503, and every later request is a 503, not a hang."""
    server, client = one_row
    _failing(server.app.state.engine_loop.engine, monkeypatch, "step", "abort")
    with pytest.raises(openai.InternalServerError, match="the engine failed"):
        client.completions.create(model=NAME, prompt="Tom has", max_tokens=16)
    status, body = _get_health(server)
    assert status == 503 and body["status"] == "error" and "aborting its requests then failed" in body["error"]
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 503 and e.value.body["code"] == "engine_down"


def test_a_request_the_engine_refuses_fails_alone(one_row, model, monkeypatch):
    server, client = one_row
    _failing(server.app.state.engine_loop.engine, monkeypatch, "add_request")
    with pytest.raises(openai.InternalServerError, match="the engine refused the request"):
        client.completions.create(model=NAME, prompt="Tom has", max_tokens=16)
    monkeypatch.undo()
    assert client.completions.create(model=NAME, prompt="Tom has", max_tokens=16).choices[0].finish_reason


class _Bytes:
    """A byte-level tokenizer: token t is the byte t, so one character may take several tokens."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_text_stream_holds_split_characters_and_stop_prefixes():
    from d2f_ext.serve.detokenize import TextStream

    e_acute = list("é".encode())
    s = TextStream(_Bytes())
    assert s.feed([ord("x"), e_acute[0]]) == "x"  # half of é waits
    assert s.feed(e_acute[1:]) == "é"
    s = TextStream(_Bytes(), stop=["STOP"])
    assert s.feed(list(b"12 ST")) == "12 "  # "ST" may begin the stop string
    assert s.feed(list(b"AR")) == "STAR"
    assert s.feed(list(b" STO")) == " "
    assert s.finish(list(b"P and more"), stopped=True) == ""
    assert s.text == "12 STAR "


def test_cli_rejects_bad_arguments_by_name(capsys):
    from d2f_ext.serve import cli

    assert cli.main(["--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli.main(["--model", "/nonexistent/folder"]) == 2
    assert cli.main(["--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err


def test_engine_thread_sets_its_thread_count(monkeypatch):
    # A new thread does not inherit the creating thread's OpenMP thread count: the engine thread
    # must set it itself, to what the server was given.
    from d2f_ext.serve import engine_loop

    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(engine_loop.torch, "set_num_threads",
                        lambda n: (calls.append((threading.current_thread().name, n)), real(n)))

    class Idle:
        config = type("Config", (), {"max_batch": 1})()

        def has_work(self):
            return False

    for threads, expected in ((None, torch.get_num_threads()), (3, 3)):
        loop = engine_loop.EngineLoop(Idle(), threads=threads)
        loop.start()
        loop.stop()
        assert calls.pop() == ("d2f-engine", expected)
    with pytest.raises(ValueError, match="threads"):
        engine_loop.EngineLoop(Idle(), threads=0)


def test_cli_leaves_the_computing_to_the_engine_thread(monkeypatch):
    # libgomp keeps a worker pool per thread that ran a parallel region; with the HTTP thread's
    # pool beside the engine's, idle workers sleep at once and every op of a step waits to wake
    # one. So the CLI loads the model with one thread and hands the process's count to the engine.
    import uvicorn

    from d2f_ext.serve import cli

    seen = {}
    monkeypatch.setattr(cli.AutoD2FModel, "from_pretrained",
                        lambda *a, **k: seen.setdefault("load", torch.get_num_threads()))
    monkeypatch.setattr(cli, "build_app", lambda model, **k: seen.setdefault("engine", k["threads"]))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    before = torch.get_num_threads()
    try:
        assert cli.main(["--model", "m"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == {"load": 1, "engine": before}
