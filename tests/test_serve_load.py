"""``minigpt2 serve`` under load, on a random-weight checkpoint, each test bounded in time:
32 concurrent streaming clients (every completion equal to ``model.generate`` alone),
clients that disconnect mid-stream, a burst past the queue, and SIGINT while streaming.
Servers run in subprocesses on 127.0.0.1 and are always stopped."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

from minigpt2 import GPT2, Tokenizer

from serve_util import ServerProcess, http, metric, wait_until

openai = pytest.importorskip("openai")

CLIENT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def ckpt(make_checkpoint: Any) -> Path:
    """Full vocabulary (text prompts), a 1024-position context (long streams), tiny width."""
    return make_checkpoint(seed=3, vocab_size=50257, n_positions=1024, n_embd=64, n_layer=2, n_head=4)[0]


@pytest.fixture(scope="module")
def model(ckpt: Path) -> GPT2:
    m = GPT2.from_pretrained(ckpt, device="cpu")
    m.generate(torch.tensor([[1, 2]]), max_new_tokens=2)  # the kernel choice, cached before the server reads it
    return m


@pytest.fixture(scope="module")
def server(ckpt: Path, model: GPT2) -> Any:
    with ServerProcess(ckpt, "--max-batch-size", "8", "--max-queue", "64") as s:
        yield s


class SSE:
    """One raw streaming request: read events until [DONE] or stop early by closing the socket."""

    def __init__(self, url: str, body: dict) -> None:
        u = urlparse(url)
        self.conn = HTTPConnection(u.hostname, u.port, timeout=CLIENT_TIMEOUT)
        self.conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                          {"Content-Type": "application/json"})  # fmt: skip
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        self.events: list[Any] = []

    def next(self) -> Any:
        """The next event's data (a dict, or the string "[DONE]"); None at the end of the stream."""
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().strip()
            if line.startswith("data: "):
                data = line[len("data: ") :]
                event = data if data == "[DONE]" else json.loads(data)
                self.events.append(event)
                return event

    def rest(self) -> None:
        while self.next() is not None:
            pass

    def close(self) -> None:
        """Hang up mid-stream, as a client that goes away."""
        self.conn.sock.shutdown(2)
        self.conn.close()


def test_32_streaming_clients_each_get_what_generate_makes_alone(server: ServerProcess, model: GPT2, ckpt: Path) -> None:
    tok = Tokenizer()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=CLIENT_TIMEOUT)
    n = 32
    jobs = []
    for i in range(n):
        prompt = f"Client number {i} opens with a prompt of {'some ' * (i % 9)}words:"
        kw: dict[str, Any] = dict(max_tokens=4 + (5 * i) % 13)
        kw.update(dict(temperature=0.8, seed=1000 + i, top_p=0.95 if i % 2 else 1.0) if i % 3 == 0 else dict(temperature=0))
        jobs.append((prompt, kw))
    results: dict[int, tuple[str, str | None]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        prompt, kw = jobs[i]
        try:
            start.wait(CLIENT_TIMEOUT)
            text, finish = "", None
            for chunk in client.completions.create(model=str(ckpt), prompt=prompt, stream=True, **kw):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            results[i] = (text, finish)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    steps_before = metric(server.url, "minigpt2_engine_steps_total")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLIENT_TIMEOUT + 30)
    assert not errors, errors
    assert sorted(results) == list(range(n))
    tokens = 0
    for i, (prompt, kw) in enumerate(jobs):
        ids = tok.encode(prompt)
        gen_kw: dict[str, Any] = dict(max_new_tokens=kw["max_tokens"])
        if kw["temperature"] > 0:
            gen_kw.update(do_sample=True, temperature=0.8, top_p=kw["top_p"], top_k=0,
                          generator=torch.Generator().manual_seed(kw["seed"]))  # fmt: skip
        new = model.generate(torch.tensor([ids]), **gen_kw)[0, len(ids) :].tolist()
        tokens += len(new)
        want = tok.decode([t for t in new if t != tok.eos_token_id])
        assert results[i] == (want, "stop" if tok.eos_token_id in new else "length"), (i, kw)
    # Continuous batching: far fewer model steps than tokens made.
    assert metric(server.url, "minigpt2_engine_steps_total") - steps_before < tokens / 2
    assert metric(server.url, "minigpt2_running_sequences") == 0


def test_clients_that_disconnect_free_their_slots(server: ServerProcess, ckpt: Path) -> None:
    made_before = metric(server.url, "minigpt2_completion_tokens_total")
    body = {"model": str(ckpt), "prompt": "A story that goes on and on", "max_tokens": 1000, "ignore_eos": True}
    streams = [SSE(server.url, body) for _ in range(4)]
    for s in streams:
        assert s.next() is not None and s.next() is not None  # mid-stream
    for s in streams:
        s.close()
    assert wait_until(lambda: metric(server.url, "minigpt2_running_sequences") == 0, timeout=15)
    assert metric(server.url, "minigpt2_completion_tokens_total") - made_before < 4 * 1000 / 2
    status, _, reply = http("POST", f"{server.url}/v1/completions", {"model": str(ckpt), "prompt": "Still there?", "max_tokens": 3})
    assert status == 200 and json.loads(reply)["usage"]["completion_tokens"] >= 1


def test_a_burst_past_the_queue_gets_429_and_nothing_else_breaks(ckpt: Path, model: GPT2) -> None:
    with ServerProcess(ckpt, "--max-batch-size", "2", "--max-queue", "2") as server:
        body = {"model": str(ckpt), "prompt": "Burst", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
        answers: list[tuple[int, dict, bytes]] = []
        go = threading.Barrier(12)

        def fire() -> None:
            go.wait(CLIENT_TIMEOUT)
            answers.append(http("POST", f"{server.url}/v1/completions", body, timeout=CLIENT_TIMEOUT))

        threads = [threading.Thread(target=fire) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CLIENT_TIMEOUT + 30)
        statuses = sorted(a[0] for a in answers)
        assert len(answers) == 12 and set(statuses) <= {200, 429} and 429 in statuses and statuses.count(200) >= 2
        texts = set()
        for status, headers, reply in answers:
            data = json.loads(reply)
            if status == 429:
                assert {k.lower(): v for k, v in headers.items()}["retry-after"].isdigit()
                assert data["error"]["type"] == "rate_limit_error" and "queue" in data["error"]["message"]
            else:
                assert data["usage"]["completion_tokens"] == 300 and data["choices"][0]["finish_reason"] == "length"
                texts.add(data["choices"][0]["text"])
        assert len(texts) == 1  # the same greedy request, however it was batched
        assert metric(server.url, 'minigpt2_requests_total{status="429"}') == statuses.count(429)
        assert http("POST", f"{server.url}/v1/completions", {**body, "max_tokens": 2})[0] == 200
        assert http("GET", f"{server.url}/health")[0] == 200


def test_sigint_while_streaming_ends_streams_and_exits_within_seconds(ckpt: Path, model: GPT2) -> None:
    server = ServerProcess(ckpt, "--max-batch-size", "2")
    try:
        # 12 sequences of 1000 tokens on 2 slots: thousands of steps, still running at the signal
        # however fast the host (a client reading slowly does not slow the server down).
        body = {"model": str(ckpt), "prompt": "Interrupted", "max_tokens": 1000, "ignore_eos": True, "n": 4}
        streams = [SSE(server.url, body) for _ in range(3)]
        assert streams[0].next() is not None  # streaming (the others wait for slots)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        for s in streams:
            s.rest()
        server.proc.wait(timeout=15)
        elapsed = time.monotonic() - t0
        assert elapsed < 10, f"exit took {elapsed:.1f} s"
        with pytest.raises(ProcessLookupError):
            os.killpg(server.proc.pid, 0)  # nothing is left of the server's process group
        reasons = []
        for s in streams:
            assert s.events[-1] == "[DONE]"
            finals = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in s.events[:-1]
                      if e["choices"][0]["finish_reason"]}  # fmt: skip
            assert sorted(finals) == [0, 1, 2, 3]  # every choice got its final chunk
            reasons += finals.values()
        assert set(reasons) <= {"abort", "length"} and reasons.count("abort") >= 8
        assert "stopped" in server.output
    finally:
        server.stop()
