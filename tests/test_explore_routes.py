"""The explorer's HTTP side: routes(engine) on an app, the JSON errors, the SSE sweep, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from minigpt2 import GPT2, Tokenizer  # noqa: E402
from minigpt2.explore.engine import LocalEngine  # noqa: E402
from minigpt2.cli.explore import build_app  # noqa: E402
from minigpt2.explore.routes import MAX_BODY  # noqa: E402


@pytest.fixture(scope="module")
def client(gpt2_tiny_vocab_checkpoint):
    path, _ = gpt2_tiny_vocab_checkpoint
    engine = LocalEngine(GPT2.from_pretrained(path), Tokenizer.from_pretrained(path), name="tiny")
    with TestClient(build_app(engine)) as c:  # what `minigpt2 explore` serves
        c.engine = engine
        yield c
    engine.close()


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_page_and_static_files(client):
    r = client.get("/explore")
    assert r.status_code == 200 and "minigpt2 explore" in r.text
    for name in ("app.js", "processors.js", "style.css"):
        r = client.get(f"/explore/static/{name}")
        assert r.status_code == 200 and len(r.text) > 100, name
    # Offline: nothing the page loads comes from another host.
    for name in ("index.html", "app.js", "style.css"):
        text = client.get(f"/explore/static/{name}").text
        assert "http://" not in text and "https://" not in text, name


def test_model_vocab_and_architecture(client):
    m = client.get("/api/explore/model").json()
    assert (m["name"], m["n_layer"], m["vocab_size"], m["eos_token_id"]) == ("tiny", 2, 50257, 50256)
    assert m["processors"][:4] == ["repetition_penalty", "temperature", "top_k", "top_p"]
    assert m["strategies"][0]["key"] == "greedy" and m["defaults"]["top_k"] == 50
    v = client.get("/api/explore/vocab").json()["pieces"]
    assert len(v) == 50257 and v[464] == "The"
    a = client.get("/api/explore/architecture").json()
    assert a["tree"][0]["line"] == "GPT2(" and a["comparison"]["columns"][1]["model"].startswith("BERT")


def test_endpoints_answer_with_the_library(client):
    tok, model = client.engine.tokenizer, client.engine.model
    t = client.post("/api/explore/tokens", json={"prompt": "Hello world"}).json()
    assert t["input_ids"] == tok.encode("Hello world")
    ids = t["input_ids"]
    assert client.post("/api/explore/next", json={"input_ids": ids}).json()["logits"]["shape"] == [50257]
    s = client.post("/api/explore/step", json={"input_ids": ids, "mode": "greedy"}).json()
    assert s["token_id"] == model.generate([ids], max_new_tokens=1)[0, -1].item()
    a = client.post("/api/explore/attention", json={"input_ids": ids, "layer": 1}).json()
    assert a["pattern"]["shape"] == [4, 2, 2]
    lens = client.post("/api/explore/lens", json={"input_ids": ids}).json()
    assert len(lens["token_ids"]) == 3 and len(lens["token_ids"][0][0]) == 5


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/api/explore/next", {"input_ids": [1] * 300}, 400, "input_ids", "prompt of 300 tokens exceeds n_positions=256"),
    ("/api/explore/next", {"input_ids": "hello"}, 400, "input_ids", "list of token ids"),
    ("/api/explore/next", {"input_ids": []}, 400, "input_ids", "empty"),
    ("/api/explore/attention", {"input_ids": [1, 2], "layer": 9}, 400, "layer", "[0, 1]"),
    ("/api/explore/step", {"input_ids": [1], "mode": "sample", "settings": {"top_p": 3}}, 400, "top_p", "(0, 1]"),
    ("/api/explore/step", {"input_ids": [1], "mode": "sample", "settings": {"temperature": -1}}, 400, "temperature", "> 0"),
    ("/api/explore/tokens", {"prompt": None}, 400, "prompt", "string"),
    ("/api/explore/strategies", {"input_ids": [1], "max_new_tokens": 9999}, 400, "max_new_tokens", "[1, 256]"),
    ("/api/explore/strategies", {"input_ids": [1], "strategies": ["nope"]}, 400, "strategies", "greedy"),
])
def test_bad_values_are_400_with_the_field(client, path, body, status, param, words):
    r = client.post(path, json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


def test_bad_bodies(client):
    r = client.post("/api/explore/next", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/api/explore/next", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = client.post("/api/explore/next", content=b" " * (MAX_BODY + 1))
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    assert client.get("/api/explore/next").status_code == 405
    assert client.get("/api/explore/nothing").status_code == 404


def test_strategy_sweep_streams_generate(client):
    model, tok = client.engine.model, client.engine.tokenizer
    ids = tok.encode("Once upon a time")
    body = {"input_ids": ids, "max_new_tokens": 5, "seed": 11, "strategies": ["greedy", "top_k-50", "beam-5"]}
    with client.stream("POST", "/api/explore/strategies", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r.read().decode())
    assert got[0][0] == "columns" and [c["key"] for c in got[0][1]["columns"]] == body["strategies"]
    assert got[-1][0] == "end"
    made: dict[str, list[int]] = {}
    for name, d in got[1:-1]:
        assert name == "tokens"
        made.setdefault(d["key"], []).extend(t["id"] for t in d["tokens"])
    assert made["greedy"] == model.generate([ids], max_new_tokens=5)[0, len(ids):].tolist()
    g = torch.Generator().manual_seed(11)
    assert made["top_k-50"] == model.generate([ids], max_new_tokens=5, do_sample=True, temperature=1.0, top_k=50,
                                              top_p=1.0, generator=g)[0, len(ids):].tolist()
    beam = model.generate([ids], max_new_tokens=5, num_beams=5, early_stopping=True)[0, len(ids):].tolist()
    assert made["beam-5"] == beam[: len(made["beam-5"])]


def test_importing_minigpt2_imports_no_server():
    code = "import sys, minigpt2; import minigpt2.explore, minigpt2.explore.data; " \
           "print(sorted(m for m in ('starlette', 'uvicorn', 'playwright') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_without_starlette_says_what_to_install(tmp_path):
    code = "import sys; sys.modules['starlette'] = None; from minigpt2.cli import main; " \
           "sys.exit(main(['explore', '--model', 'x', '--no-browser']))"
    # find_spec sees a None entry in sys.modules as not importable, as a missing package
    r = subprocess.run([sys.executable, "-c", code.replace("sys.modules['starlette'] = None", "import importlib.util as u; "
                        "f = u.find_spec; u.find_spec = lambda n, *a: None if n == 'starlette' else f(n, *a)")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "minigpt2: error: minigpt2 explore needs starlette and uvicorn: pip install 'minigpt2[serve]'"


def test_cli_serves_the_page_and_stops_on_ctrl_c(gpt2_tiny_vocab_checkpoint):
    path, _ = gpt2_tiny_vocab_checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "minigpt2", "explore", "--model", str(path), "--port", "0",
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "minigpt2 explore:" in line and "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        assert url.endswith("/explore")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"minigpt2 explore" in r.read()
        with urllib.request.urlopen(url.replace("/explore", "/api/explore/model"), timeout=10) as r:
            assert json.load(r)["n_layer"] == 2
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_busy_port_is_one_line(gpt2_tiny_vocab_checkpoint):
    import socket

    path, _ = gpt2_tiny_vocab_checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "minigpt2", "explore", "--model", str(path), "--port", str(port),
                            "--no-browser"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"minigpt2: error: port {port} on 127.0.0.1 is already in use: pick another with --port (0 = any free port)"


def test_no_text_mode_browser_without_a_display(monkeypatch):
    import webbrowser

    from minigpt2.cli import explore

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    monkeypatch.setattr(sys, "platform", "linux")
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(var, raising=False)
    assert explore._open_browser("http://127.0.0.1:1/explore") is False and opened == []
    monkeypatch.setenv("DISPLAY", ":0")
    assert explore._open_browser("http://127.0.0.1:1/explore") is True and opened == ["http://127.0.0.1:1/explore"]


def test_unknown_routes_and_methods_under_api_are_json_errors(client):
    for method, path, status in (("GET", "/api/explore/nope", 404), ("GET", "/api/explore/tokens", 405),
                                 ("POST", "/api/explore/model", 405), ("GET", "/api/", 404)):
        r = client.request(method, path)
        assert r.status_code == status, path
        err = r.json()["error"]
        assert path in err["message"] and err["type"] == "invalid_request_error"
    assert "POST" in client.get("/api/explore/tokens").json()["error"]["message"]  # the method to use
    # Pages and static files stay plain; / opens the page.
    missing = client.get("/explore/static/nope.js")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/plain")
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/explore"
    assert client.get("/").status_code == 200
