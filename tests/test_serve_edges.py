"""``minigpt2 serve`` at the edges a new user found (issue 15's fresh-clone findings).

The app is served on a thread of this process (localhost, a free port) on a tiny checkpoint;
each test sends what the tester sent and checks the answer a client should get.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt2 import GPT2, Tokenizer

pytest.importorskip("fastapi")
from minigpt2.explore.routes import routes  # noqa: E402
from minigpt2.serve import Engine, create_app  # noqa: E402

from serve_util import ServerThread, http, metric, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(gpt2_tiny_vocab_checkpoint: tuple[Path, Any]) -> Path:
    return gpt2_tiny_vocab_checkpoint[0]


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Any:
    model = GPT2.from_pretrained(ckpt, device="cpu")
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    with Engine(model, Tokenizer(), max_batch_size=2) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine: Engine) -> Any:
    with ServerThread(create_app(engine, model_name="tiny", extra_routes=routes(engine))) as s:
        yield s


def complete(server: ServerThread, **body: Any) -> tuple[int, dict]:
    status, _, raw = http("POST", f"{server.url}/v1/completions", {"model": "tiny", **body})
    return status, json.loads(raw)


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-300, 5e-324, 1e-6])
def test_a_tiny_temperature_is_greedy(server: ServerThread, temperature: float) -> None:
    kw = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "logprobs": 1}
    status, body = complete(server, temperature=temperature, **kw)
    assert status == 200, body
    assert body["choices"][0] == complete(server, temperature=0, **kw)[1]["choices"][0]


@pytest.mark.parametrize("where", ["body", "prompt", "unknown field"])
def test_deeply_nested_json_is_a_400(server: ServerThread, where: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    raw = {"body": deep, "prompt": '{"model": "tiny", "prompt": %s}' % deep,
           "unknown field": '{"model": "tiny", "prompt": "Hi", "extra": %s}' % deep}[where]  # fmt: skip
    for path in ("/v1/completions", "/api/explore/tokens"):
        status, _, body = http("POST", server.url + path, raw=raw.encode())
        assert status == 400, (path, body)
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"], (path, error)


def test_a_whole_response_stops_when_its_client_goes_away(server: ServerThread, engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    real = engine.runner.decode

    def slow(*a: Any, **kw: Any) -> Any:  # a token every 20 ms: the request would take 5 s
        time.sleep(0.02)
        return real(*a, **kw)

    monkeypatch.setattr(engine.runner, "decode", slow)
    n, max_tokens = 2, 250
    before = metric(server.url, "minigpt2_completion_tokens_total")
    body = json.dumps({"model": "tiny", "prompt": "Hi", "n": n, "max_tokens": max_tokens, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert wait_until(lambda: metric(server.url, "minigpt2_running_sequences") == n, 10)
        time.sleep(0.2)
    closed = time.monotonic()
    assert wait_until(lambda: metric(server.url, "minigpt2_running_sequences") == 0, 10)
    assert time.monotonic() - closed < 2.0  # the poll interval (0.5 s) and a step, not the 5 s left
    made = metric(server.url, "minigpt2_completion_tokens_total") - before
    assert 0 < made < n * max_tokens


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_a_port_out_of_range_is_one_line(ckpt: Path, port: str, capsys: pytest.CaptureFixture) -> None:
    from minigpt2.cli import main

    assert main(["serve", "--model", str(ckpt), "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minigpt2") and "--port" in err[-1] and "Traceback" not in "".join(err), err


@pytest.mark.parametrize("prompt, names", [
    (["a", 5], ["prompt[1]", "5 (an integer)"]),
    ([True, False], ["prompt[0]", "true (a boolean)"]),
    ([1.0, 2.0], ["prompt[0]", "1.0 (a number)"]),
    ([[[1]]], ["prompt[0][0]", "[1] (a list)"]),
    ([[1, 2], 3], ["prompt[1]", "3 (an integer)"]),
    ([], ["empty list"]),
])  # fmt: skip
def test_a_bad_prompt_names_its_bad_element(server: ServerThread, prompt: Any, names: list[str]) -> None:
    status, body = complete(server, prompt=prompt, max_tokens=1)
    assert status == 400 and body["error"]["param"] == "prompt", body
    message = body["error"]["message"]
    assert all(name in message for name in names), message
    if names != ["empty list"]:
        assert "empty" not in message, message
    if len(names) > 1 and "[0][0]" not in names[0]:
        assert "a string, a list of strings, a list of token ids" in message, message


@pytest.mark.parametrize("kw, param, words, absent", [
    (dict(stop=5), "stop", ["stop is 5 (an integer)"], ["stop.str"]),
    (dict(stop=["a", 5]), "stop", ["stop[1] is 5"], ["stop.list"]),
    (dict(prompt=[7] * 300), "prompt", ["300 tokens", "n_positions=256"], ["max_tokens"]),
    (dict(prompt=[7] * 250), "max_tokens", ["250 tokens", "max_tokens=16"], []),
    (dict(prompt=["a"] * 1000), "prompt", ["1000 prompts", "queue of 256"], ["best_of", "n="]),
    (dict(prompt=["a"] * 60, n=5), "n", ["n=5", "300 sequences"], ["best_of"]),
    (dict(prompt=["a"] * 60, best_of=5), "best_of", ["best_of=5"], ["n="]),
])  # fmt: skip
def test_an_error_names_the_field_the_client_sent(server: ServerThread, kw: dict, param: str, words: list[str],
                                                  absent: list[str]) -> None:  # fmt: skip
    status, body = complete(server, **{"prompt": "Hi", **kw})
    assert status == 400 and body["error"]["param"] == param, body
    message = body["error"]["message"]
    assert all(w in message for w in words) and not any(w in message for w in absent), message


def test_cors_headers_reach_every_answer_a_401_too(engine: Engine) -> None:
    origin = "http://example.com"
    app = create_app(engine, model_name="tiny", api_key="K", cors_origin=origin)
    with ServerThread(app) as s:
        for headers, want in [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Bearer K"}, 200)]:
            status, got, _ = http("GET", f"{s.url}/v1/models", headers={"Origin": origin, **headers})
            assert status == want and {k.lower(): v for k, v in got.items()}.get("access-control-allow-origin") == origin
        pre = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        status, got, body = http("OPTIONS", f"{s.url}/v1/completions", headers=pre)
        assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in got}
        error = json.loads(body)["error"]
        assert "origin" in error["message"] and error["type"] == "invalid_request_error"


def _stream(server: ServerThread, **body: Any) -> tuple[str, dict]:
    """The text and the log-prob fields of a streamed one-choice completion, joined."""
    _, _, raw = http("POST", f"{server.url}/v1/completions", {"model": "tiny", "stream": True, **body})
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            for key, values in (choice["logprobs"] or {}).items():
                lp[key] += values
    return text, lp


@pytest.mark.parametrize("span", [1, 3])  # the stop string ends in the next token / three tokens on
@pytest.mark.parametrize("echo", [False, True])
def test_logprobs_end_with_the_token_that_holds_a_stop_string_cut(server: ServerThread, span: int, echo: bool) -> None:
    kw = {"prompt": "The meaning of life is", "temperature": 0, "logprobs": 1, "ignore_eos": True, "echo": echo}
    _, full = complete(server, max_tokens=24, **kw)
    text, lp = full["choices"][0]["text"], full["choices"][0]["logprobs"]
    offsets = lp["text_offset"]
    start = len(lp["tokens"]) - 24  # the first generated token's index (after the prompt's with echo)
    # A stop string that begins inside generated token k (after its first character) and ends
    # inside token k + span: the text is cut inside token k.
    for k in range(start, len(offsets) - span - 1):
        cut = offsets[k] + 1
        if offsets[k + 1] - offsets[k] >= 2 and offsets[k + span] + 1 > cut:
            stop = text[cut : offsets[k + span] + 1]
            if text.find(stop, offsets[start]) == cut:
                break
    else:
        pytest.skip("no token of two characters or more in this output")
    for got_text, got in [(c["text"], c["logprobs"]) for c in complete(server, max_tokens=24, stop=[stop], **kw)[1]["choices"]] + [
        _stream(server, max_tokens=24, stop=[stop], **kw)
    ]:  # fmt: skip
        assert got_text == text[:cut]
        assert got["tokens"] == lp["tokens"][: k + 1]  # the token holding the cut is the last one
        assert got["text_offset"] == offsets[: k + 1] and max(got["text_offset"]) < len(got_text)
        assert got["token_logprobs"] == lp["token_logprobs"][: k + 1]


def test_a_sweep_cut_by_shutdown_logs_one_line(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    from http.client import HTTPConnection

    model = GPT2.from_pretrained(ckpt, device="cpu")
    with Engine(model, Tokenizer(), max_batch_size=2) as own:
        with ServerThread(create_app(own, model_name="tiny", extra_routes=routes(own))) as s:
            host, port = s.url.removeprefix("http://").split(":")
            conn = HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/api/explore/strategies", json.dumps({"input_ids": [464, 3616], "max_new_tokens": 200}),
                         {"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            assert response.status == 200 and response.readline().startswith(b"event: columns")
            with caplog.at_level("WARNING"):
                own.shutdown(timeout=5)  # what SIGTERM does first
                rest = response.read().decode()
            conn.close()
    assert "event: error" in rest and "shutting_down" in rest
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert any("shut" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("args, words", [
    ([], ["--model"]),
    (["--api-key", ""], ["--api-key", "empty"]),
    (["--api-key", "  "], ["--api-key", "empty"]),
    (["--host", "999.1.1.1"], ["cannot listen on 999.1.1.1"]),
    (["--max-batch-size", "10000000"], ["--max-batch-size 10000000", "bytes"]),
])  # fmt: skip
def test_startup_mistakes_are_one_line(ckpt: Path, args: list[str], words: list[str],
                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from minigpt2.cli import main

    model = [] if args == [] else ["--model", str(ckpt)]
    assert main(["serve", *model, *args]) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minigpt2") and "error" in err[0], err  # no warning first
    assert all(w in err[0] for w in words), err


def test_the_kv_cache_size_is_in_mib_below_a_gib(ckpt: Path) -> None:
    from minigpt2.cli.serve import kv_cache_bytes, memory_text

    model = GPT2.from_pretrained(ckpt, device="cpu")
    with Engine(model, Tokenizer(), max_batch_size=3) as e:
        assert kv_cache_bytes(model.config, 3, 4) == e.runner.memory_bytes  # the formula the check uses
    assert memory_text(e.runner.memory_bytes) == f"{e.runner.memory_bytes / 2**20:.1f} MiB" != "0.0 MiB"
    assert memory_text(3 * 2**30) == "3.00 GiB"


def test_no_api_docs_and_the_step_count_is_a_counter(engine: Engine) -> None:
    with ServerThread(create_app(engine, model_name="tiny", api_key="K")) as s:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert http("GET", s.url + path)[0] == 404, path
        _, _, text = http("GET", f"{s.url}/metrics")
        assert re.search(r"^# TYPE minigpt2_engine_steps(_total)? counter$", text.decode(), re.M)
        before = metric(s.url, "minigpt2_engine_steps_total")
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
        assert http("POST", f"{s.url}/v1/completions", body, headers={"Authorization": "Bearer K"})[0] == 200
        assert metric(s.url, "minigpt2_engine_steps_total") >= before + 3  # the prefill makes the first token


@pytest.mark.parametrize("path, body, unknown", [
    ("/api/explore/strategies", {"input_ids": [464], "tokens": 100000}, "tokens"),
    ("/api/explore/next", {"input_ids": [464], "temprature": 0.5}, "temprature"),
    ("/api/explore/tokens", {"prompt": "Hi", "input_id": [1]}, "input_id"),
    ("/api/explore/step", {"input_ids": [464], "mode": "greedy", "sed": 1}, "sed"),
    ("/api/explore/attention", {"input_ids": [464], "layer": 0, "head": 1}, "head"),
    ("/api/explore/lens", {"input_ids": [464], "top_k": 3}, "top_k"),
])  # fmt: skip
def test_the_explorer_api_refuses_unknown_fields(server: ServerThread, path: str, body: dict, unknown: str) -> None:
    status, _, raw = http("POST", server.url + path, body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == unknown and unknown in error["message"], error
    known = {k: v for k, v in body.items() if k != unknown}
    assert http("POST", server.url + path, known)[0] == 200  # the same body without it works


@pytest.mark.parametrize("depth", [900, 990])  # under json's limit, deep enough for anything that recurses
def test_nesting_just_under_the_json_limit_is_a_400_everywhere(server: ServerThread, depth: int) -> None:
    deep = "[" * depth + "]" * depth
    for path, body in [("/v1/completions", '{"model": "tiny", "prompt": %s}'),
                       ("/v1/completions", '{"model": "tiny", "prompt": "Hi", "stop": %s}'),
                       ("/api/explore/next", '{"input_ids": %s}'), ("/api/explore/tokens", '{"input_ids": %s}'),
                       ("/api/explore/attention", '{"input_ids": [464], "layer": %s}'),
                       ("/api/explore/step", '{"input_ids": [464], "mode": "sample", "settings": {"top_k": %s}}')]:  # fmt: skip
        status, _, raw = http("POST", server.url + path, raw=(body % deep).encode())
        assert status == 400, (path, raw[:300])
