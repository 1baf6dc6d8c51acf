"""``minigpt2 serve`` through the official ``openai`` client, and the HTTP edges.

One server runs in a subprocess (as a user starts it) for the API's behaviour: every
completion is held against ``model.generate`` of the same prompt in this process. The app
is also served on a thread of this process where a test needs to reach inside (an engine
step that fails, an API key, CORS, the explorer hook). Localhost only; every server stops.
"""

from __future__ import annotations

import json
import socket
import sys
import types
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

from minigpt2 import GPT2, Tokenizer
from minigpt2.serve import Engine, create_app

from serve_util import ServerProcess, ServerThread, http, metric

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(gpt2_tiny_vocab_checkpoint: tuple[Path, Any]) -> Path:
    return gpt2_tiny_vocab_checkpoint[0]


@pytest.fixture(scope="module")
def model(ckpt: Path) -> GPT2:
    m = GPT2.from_pretrained(ckpt, device="cpu")
    m.generate(torch.tensor([[1, 2]]), max_new_tokens=2)  # the kernel choice, cached before the server reads it
    return m


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def server(ckpt: Path, model: GPT2) -> Any:
    with ServerProcess(ckpt, "--max-batch-size", "4") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def generated(model: GPT2, tok: Tokenizer, prompt: str | list[int], max_tokens: int, seed: int | None = None,
              **kw: Any) -> tuple[list[int], str]:  # fmt: skip
    """generate's new tokens for the prompt alone, and their text (EOS adds none)."""
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    if seed is not None:
        kw.update(do_sample=True, top_k=0, generator=torch.Generator().manual_seed(seed))
    new = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, **kw)[0, len(ids) :].tolist()
    return new, tok.decode([t for t in new if t != tok.eos_token_id])


# --------------------------------------------------------------------------- the API
def test_models_and_health(server: ServerProcess, client: Any, ckpt: Path) -> None:
    assert [m.id for m in client.models.list()] == [str(ckpt)]
    status, _, body = http("GET", f"{server.url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert "127.0.0.1" in server.url


def test_completion_equals_generate(client: Any, model: GPT2, tok: Tokenizer, ckpt: Path) -> None:
    prompt = "The meaning of life is"
    r = client.completions.create(model=str(ckpt), prompt=prompt, max_tokens=12, temperature=0)
    new, text = generated(model, tok, prompt, 12)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == str(ckpt)
    assert r.choices[0].text == text and r.choices[0].index == 0
    assert r.choices[0].finish_reason == ("stop" if tok.eos_token_id in new else "length")
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(new) and r.usage.total_tokens == len(new) + r.usage.prompt_tokens


def test_stream_equals_the_whole_response(client: Any, ckpt: Path) -> None:
    kw = dict(model=str(ckpt), prompt="Once upon a time", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_n_choices_with_a_seed_reproduce(client: Any, model: GPT2, tok: Tokenizer, ckpt: Path) -> None:
    kw = dict(model=str(ckpt), prompt="In a hole in the ground", max_tokens=10, n=3, temperature=0.9, seed=42)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, c in enumerate(r.choices):
        assert c.text == generated(model, tok, kw["prompt"], 10, seed=42 + j, temperature=0.9)[1]
    assert [c.text for c in client.completions.create(**kw).choices] == [c.text for c in r.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]


def test_prompt_forms(client: Any, model: GPT2, tok: Tokenizer, ckpt: Path) -> None:
    prompts = ["Hello there", "A second prompt, longer than the first one"]
    r = client.completions.create(model=str(ckpt), prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        text = generated(model, tok, p, 6)[1]
        assert r.choices[2 * i].text == text and r.choices[2 * i + 1].text == text
    ids = [tok.encode(p) for p in prompts]
    by_ids = client.completions.create(model=str(ckpt), prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [r.choices[0].text, r.choices[2].text]
    one = client.completions.create(model=str(ckpt), prompt=ids[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens == sum(len(x) for x in ids)


def test_logprobs_fields(client: Any, model: GPT2, tok: Tokenizer, ckpt: Path) -> None:
    prompt = "Paris is the capital of"
    r = client.completions.create(model=str(ckpt), prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    for tok_s, off in zip(lp.tokens, lp.text_offset):
        assert c.text[off:].startswith(tok_s)
    ids = tok.encode(prompt) + generated(model, tok, prompt, 8, eos_token_id=None)[0]
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    P = len(tok.encode(prompt))
    for i, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        assert value == pytest.approx(float(want[P - 1 + i, ids[P + i]]), abs=1e-4)
        assert lp.tokens[i] in top and 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(float(want[P - 1 + i].max()), abs=1e-4)


def test_echo_returns_the_prompt_and_its_logprobs(client: Any, model: GPT2, tok: Tokenizer, ckpt: Path) -> None:
    prompt = "The cat sat on the mat"
    ids = tok.encode(prompt)
    r = client.completions.create(model=str(ckpt), prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    for i in range(1, len(ids)):
        assert c.logprobs.token_logprobs[i] == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4)
    assert c.logprobs.tokens == [tok.decode([t]) for t in ids]
    more = client.completions.create(model=str(ckpt), prompt=prompt, max_tokens=5, echo=True, temperature=0)
    assert more.choices[0].text == prompt + generated(model, tok, prompt, 5)[1]


def test_stop_string_cuts_the_text(client: Any, ckpt: Path) -> None:
    kw = dict(model=str(ckpt), prompt="It was a dark and stormy night", max_tokens=30, temperature=0,
              extra_body={"ignore_eos": True})  # fmt: skip
    free = client.completions.create(**kw).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 4]
    r = client.completions.create(stop=["@@@@", stop], **kw)
    assert r.choices[0].text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == r.choices[0].text


def test_best_of_returns_the_most_likely_per_token(client: Any, model: GPT2, tok: Tokenizer, ckpt: Path) -> None:
    prompt, seed = "To be or not to be", 5
    r = client.completions.create(model=str(ckpt), prompt=prompt, max_tokens=6, temperature=1.0, seed=seed,
                                  best_of=3, extra_body={"ignore_eos": True})  # fmt: skip
    ids = tok.encode(prompt)
    scored = []
    for j in range(3):
        new, text = generated(model, tok, prompt, 6, seed=seed + j, eos_token_id=None)
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids + new]))[0], dim=-1)
        scored.append((sum(float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(new)) / len(new), text))
    assert len(r.choices) == 1 and r.choices[0].text == max(scored)[1]
    assert r.usage.completion_tokens == 18  # every candidate was generated


def test_logit_bias_and_penalties(client: Any, ckpt: Path, tok: Tokenizer) -> None:
    hi = tok.encode(" hello")[0]
    r = client.completions.create(model=str(ckpt), prompt="Say", max_tokens=4, temperature=0, logit_bias={str(hi): 100})
    assert r.choices[0].text == " hello" * 4
    r = client.completions.create(model=str(ckpt), prompt="Say", max_tokens=4, temperature=0,
                                  logit_bias={str(hi): 100}, frequency_penalty=2.0, presence_penalty=2.0)  # fmt: skip
    assert r.choices[0].text.startswith(" hello")  # penalties of at most 4 cannot beat a +100 bias
    first = client.completions.create(model=str(ckpt), prompt="Say", max_tokens=1, temperature=0).choices[0].text
    banned = tok.encode(first)[0]
    r = client.completions.create(model=str(ckpt), prompt="Say", max_tokens=1, temperature=0, logit_bias={str(banned): -100})
    assert r.choices[0].text != first


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        (dict(max_tokens=300), "max_tokens", ["300", "n_positions=256"]),
        (dict(logprobs=6), "logprobs", ["5"]),
        (dict(temperature=2.5), "temperature", ["2"]),
        (dict(n=0), "n", ["1"]),
        (dict(suffix="x"), "suffix", ["not supported"]),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop", ["4"]),
        (dict(logit_bias={"50300": 1}), "logit_bias", ["50300", "50257"]),
        (dict(logit_bias={"5": 101}), "logit_bias", ["100"]),
        (dict(best_of=1, n=2), "best_of", ["n=2"]),
        (dict(prompt=[1, 2, 99999]), "prompt", ["99999", "50257"]),
        (dict(prompt=[]), "prompt", ["empty"]),
        (dict(prompt=True), "prompt", ["string"]),
        (dict(seed=2**63), "seed", ["9223372036854775807"]),
        (dict(max_tokens=5, extra_body={"min_tokens": 20}), "min_tokens", ["max_tokens=5"]),
        (dict(extra_body={"foo": 1}), "foo", ["Unrecognized", "foo"]),
        (dict(extra_body={"stream_options": {"include_usage": True}}), "stream_options", ["stream"]),
    ],
)
def test_bad_fields_are_400s_naming_the_field(client: Any, ckpt: Path, kw: dict, param: str, words: list[str]) -> None:
    args = {"model": str(ckpt), "prompt": "Hello", "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    for w in words:
        assert w in err["message"], err["message"]


def test_unknown_model_is_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hello")
    assert "gpt-4" in e.value.body["message"] and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_raw_http_errors_have_openai_bodies(server: ServerProcess, ckpt: Path) -> None:
    url = f"{server.url}/v1/completions"
    body = {"model": str(ckpt), "prompt": "Hi", "max_tokens": 2}
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):  # curl -d's default, and others
        assert http("POST", url, body, headers={"Content-Type": content_type})[0] == 200
    for raw, words in [(b'{"model": "x", "prompt": ', "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON object")]:
        status, _, body = http("POST", url, raw=raw)
        assert status == 400 and words in json.loads(body)["error"]["message"], body
    big = json.dumps({"model": str(ckpt), "prompt": "x" * (1 << 20)}).encode()
    for raw in (big, big * 8):  # the client gets to read the answer, however much it sends
        status, _, body = http("POST", url, raw=raw)
        assert status == 413 and "1048576" in json.loads(body)["error"]["message"]
    status, body = _chunked_post(url, big)  # no Content-Length: the bytes read are counted
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = http("GET", f"{server.url}/v2/anything")
    assert status == 404 and "Unknown route" in json.loads(body)["error"]["message"]
    status, _, body = http("GET", url)
    assert status == 405 and "error" in json.loads(body)
    status, headers, _ = http("OPTIONS", url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}  # CORS is off by default


def _chunked_post(url: str, data: bytes) -> tuple[int, bytes]:
    u = urlparse(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", u.path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for i in range(0, len(data), 65536):
            piece = data[i : i + 65536]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may answer and close before the whole body is sent
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def test_metrics_count_what_happened(server: ServerProcess, client: Any, ckpt: Path) -> None:
    client.completions.create(model=str(ckpt), prompt="Count me", max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(ckpt), prompt="Count me", max_tokens=-1)
    assert metric(server.url, 'minigpt2_requests_total{status="200"}') >= 1
    assert metric(server.url, 'minigpt2_requests_total{status="400"}') >= 1
    assert metric(server.url, "minigpt2_time_to_first_token_seconds_count") >= 1
    assert metric(server.url, "minigpt2_inter_token_latency_seconds_count") >= 2
    assert metric(server.url, "minigpt2_completion_tokens_total") >= 3
    assert metric(server.url, "minigpt2_prompt_tokens_total") >= 2
    assert metric(server.url, "minigpt2_queue_depth") == 0 and metric(server.url, "minigpt2_running_sequences") == 0


# --------------------------------------------------------------------------- the app, in-process
@pytest.fixture(scope="module")
def engine(model: GPT2, tok: Tokenizer) -> Any:
    with Engine(model, tok, max_batch_size=2) as e:
        yield e


def test_api_key_and_cors(engine: Engine) -> None:
    app = create_app(engine, model_name="tiny", api_key="sekret", cors_origin="https://example.org")
    with ServerThread(app) as s:
        for key, ok in [("sekret", True), ("wrong", False), ("sekre", False)]:
            c = openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=60)
            if ok:
                assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].text is not None
            else:
                with pytest.raises(openai.AuthenticationError) as e:
                    c.completions.create(model="tiny", prompt="Hi", max_tokens=2)
                assert e.value.body["code"] == "invalid_api_key"
        status, _, body = http("GET", f"{s.url}/v1/models")
        assert status == 401 and "Authorization" in json.loads(body)["error"]["message"]
        assert http("POST", f"{s.url}/v1/completions", raw=b"{not json")[0] == 401  # the key first, then the body
        assert http("GET", f"{s.url}/health")[0] == 200 and http("GET", f"{s.url}/metrics")[0] == 200
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        _, headers, _ = http("OPTIONS", f"{s.url}/v1/completions", headers={"Origin": "https://example.org", **pre})
        assert {k.lower(): v for k, v in headers.items()}["access-control-allow-origin"] == "https://example.org"
        _, headers, _ = http("OPTIONS", f"{s.url}/v1/completions", headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_a_failing_engine_step_is_a_500_and_the_server_goes_on(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.runner.decode

    def broken(*a: Any) -> Any:
        raise RuntimeError("injected fault")

    with ServerThread(create_app(engine, model_name="tiny")) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)
        monkeypatch.setattr(engine.runner, "decode", broken)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny", prompt="Hi", max_tokens=5)
        assert e.value.body["type"] == "server_error" and "injected fault" in e.value.body["message"]
        assert "Traceback" not in json.dumps(e.value.body)
        with pytest.raises(openai.APIError):
            list(c.completions.create(model="tiny", prompt="Hi", max_tokens=5, stream=True))
        monkeypatch.setattr(engine.runner, "decode", real)
        r = c.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5


def test_explorer_hook_adds_its_routes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from minigpt2.cli.serve import explorer_routes

    fake = types.ModuleType("minigpt2.explore.routes")
    seen = []

    def routes(e: Engine) -> list:
        seen.append(e)
        return [Route("/explore/ping", lambda request: PlainTextResponse("pong"))]

    fake.routes = routes  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "minigpt2.explore.routes", fake)
    extra = explorer_routes(engine)
    assert seen == [engine]
    with ServerThread(create_app(engine, model_name="tiny", api_key="k", extra_routes=extra)) as s:
        status, _, body = http("GET", f"{s.url}/explore/ping")
        assert status == 200 and body == b"pong"
        assert http("GET", f"{s.url}/v1/models")[0] == 401  # the API keeps its key
    monkeypatch.setitem(sys.modules, "minigpt2.explore.routes", None)  # as if the package were absent
    assert explorer_routes(engine) == []


# --------------------------------------------------------------------------- the command
def test_serve_without_the_extra_says_what_to_install(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from minigpt2.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["serve", "--model", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minigpt2: error:") and 'pip install "minigpt2[serve]"' in err[0]


def test_public_host_warns_and_a_taken_port_is_one_line(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    from minigpt2.cli import main

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(ckpt), "--host", "0.0.0.0", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # bound first: a failed bind is the only line
    assert err[0].startswith("minigpt2: error: cannot listen on 0.0.0.0:") and len(err) == 1
    # Once bound, the warning comes (before the model loads; here a batch too large then stops it).
    assert main(["serve", "--model", str(ckpt), "--host", "0.0.0.0", "--port", "0", "--max-batch-size", "10000000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "without --api-key" in err[0] and "warning" in err[0]
    assert err[1].startswith("minigpt2: error: --max-batch-size") and len(err) == 2


def test_importing_minigpt2_or_its_engine_loads_no_web_stack() -> None:
    import subprocess

    from serve_util import REPO_ROOT

    code = ("import sys, minigpt2, minigpt2.serve; from minigpt2.serve import Engine, SamplingParams; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'pydantic') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
