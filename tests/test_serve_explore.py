"""The explorer page on ``minigpt2 serve``'s app: routes(engine) on the real serve Engine.

Every explorer model call goes through ``Engine.run`` / ``Engine.call`` (the engine thread,
between two decode steps), so the page's numbers must equal the library's while completions
run alongside; with an API key the explorer's API is guarded like /v1 and the page stays open.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_util import ServerThread, http  # noqa: E402

from minigpt2 import GPT2, Tokenizer  # noqa: E402
from minigpt2.explore.routes import routes  # noqa: E402
from minigpt2.serve import Engine, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model(gpt2_tiny_vocab_checkpoint: tuple[Path, Any]) -> GPT2:
    return GPT2.from_pretrained(gpt2_tiny_vocab_checkpoint[0], device="cpu")


@pytest.fixture(scope="module")
def engine(model: GPT2) -> Any:
    with Engine(model, Tokenizer(), max_batch_size=2, name="tiny-served") as e:
        yield e


def events(body: bytes) -> list[tuple[str, dict]]:
    out = []
    for frame in body.decode().strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_the_explorer_runs_on_the_serve_engine(engine: Engine, model: GPT2) -> None:
    tok = engine.tokenizer
    with ServerThread(create_app(engine, model_name="tiny-served", extra_routes=routes(engine))) as s:
        status, _, page = http("GET", f"{s.url}/explore")
        assert status == 200 and b"minigpt2 explore" in page
        assert http("GET", f"{s.url}/explore/static/app.js")[0] == 200
        status, _, body = http("GET", f"{s.url}/api/explore/model")
        assert status == 200 and json.loads(body)["name"] == "tiny-served"

        # A completion streams on the engine while the explorer asks for its numbers.
        done: list[int] = []
        long = threading.Thread(target=lambda: done.append(http(
            "POST", f"{s.url}/v1/completions",
            {"model": "tiny-served", "prompt": "Once", "max_tokens": 200, "temperature": 0, "ignore_eos": True})[0]))
        long.start()
        ids = tok.encode("The Eiffel Tower is in")
        status, _, body = http("POST", f"{s.url}/api/explore/step", {"input_ids": ids, "mode": "greedy"})
        assert status == 200 and json.loads(body)["token_id"] == model.generate([ids], max_new_tokens=1)[0, -1].item()
        status, _, body = http("POST", f"{s.url}/api/explore/next", {"input_ids": ids})
        assert status == 200 and json.loads(body)["logits"]["shape"] == [model.config.vocab_size]
        sweep = {"input_ids": ids, "max_new_tokens": 5, "seed": 3, "strategies": ["greedy", "top_k-50"]}
        status, _, body = http("POST", f"{s.url}/api/explore/strategies", sweep)
        assert status == 200
        made: dict[str, list[int]] = {}
        for name, d in events(body)[1:-1]:
            made.setdefault(d["key"], []).extend(t["id"] for t in d["tokens"])
        assert made["greedy"] == model.generate([ids], max_new_tokens=5)[0, len(ids):].tolist()
        g = torch.Generator().manual_seed(3)
        assert made["top_k-50"] == model.generate([ids], max_new_tokens=5, do_sample=True, temperature=1.0, top_k=50,
                                                  top_p=1.0, generator=g)[0, len(ids):].tolist()  # fmt: skip
        long.join(120)
        assert done == [200]
        status, _, body = http("POST", f"{s.url}/api/explore/attention", {"input_ids": ids, "layer": 9})
        assert status == 400 and json.loads(body)["error"]["param"] == "layer"


def test_an_api_key_guards_the_explorer_api_not_its_page(engine: Engine) -> None:
    app = create_app(engine, model_name="tiny-served", api_key="sekret", extra_routes=routes(engine))
    with ServerThread(app) as s:
        assert http("GET", f"{s.url}/explore")[0] == 200  # the page and its files hold no model output
        status, _, js = http("GET", f"{s.url}/explore/static/app.js")
        assert status == 200 and b"Authorization" in js and b"#key=" in js  # its calls send the key
        status, _, body = http("GET", f"{s.url}/api/explore/model")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer wrong"}
        assert http("POST", f"{s.url}/api/explore/next", {"input_ids": [1]}, headers=bad)[0] == 401
        assert http("POST", f"{s.url}/api/explore/next", raw=b"{not json")[0] == 401  # the key before the body
        good = {"Authorization": "Bearer sekret"}
        status, _, body = http("GET", f"{s.url}/api/explore/model", headers=good)
        assert status == 200 and json.loads(body)["name"] == "tiny-served"
        assert http("POST", f"{s.url}/api/explore/next", {"input_ids": [1, 2]}, headers=good)[0] == 200
