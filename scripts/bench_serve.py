"""minigpt2 serve against transformers serve: the same OpenAI load on the same random 124M checkpoint.

    python scripts/bench_serve.py                     # levels 1, 4, 16; both servers (~10 min on 2 cores)
    python scripts/bench_serve.py --only minigpt2     # without transformers serve
    python scripts/bench_serve.py --quick             # a tiny model and short streams (a smoke run)
    python scripts/bench_serve.py --json out.json

The load: at each level C, C clients stream completions back to back (3 requests each at
C = 1, 2 each above), every prompt 32 tokens (a different one per request), 128 new tokens,
greedy, EOS ignored (minigpt2: ``ignore_eos``; transformers serve: a ``generation_config``
without an EOS id, which it runs with EOS disabled). The clients are plain ``http.client``
threads in this process, reading the server-sent events as they come. Both servers get the
same KV capacity: minigpt2 16 slots of 1024 positions, transformers serve 64 pages of 256
tokens (left alone, its continuous batching takes 80-90 % of the free memory on CPU).

Per level: aggregate output tokens/s (every request's ``usage.completion_tokens`` over the
level's wall time), time to first token (send -> first chunk) and inter-token latency (the
gaps between consecutive chunks of a stream; both servers send a chunk per token here),
p50 / p99. Both servers are up together and take the load level by level in turn (one under
load at a time, the other idle), so that a drift of the host hits both alike; at one client
each round is ``model.generate`` of one such prompt alone in this process (batch 1, the same
tokens; the single-stream figure the server is held against), then one request to each
server, three rounds. transformers serve runs
with ``--continuous-batching`` when that works on this device (its log says "CB: True"),
else without; the JSON and the table say which ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import minigpt2  # noqa: E402

SHAPES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=50257, n_positions=1024),
}
PROMPT_TOKENS, NEW_TOKENS = 32, 128
START_TIMEOUT = 600.0


# --------------------------------------------------------------------------- setup
def make_checkpoint(directory: Path, shape: str) -> Path:
    """A random-weight checkpoint saved by transformers, with GPT-2's tokenizer files beside it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[shape])).save_pretrained(directory)
    minigpt2.Tokenizer().save_pretrained(directory)
    return directory


def prompts(n: int) -> list[str]:
    """n different texts of exactly PROMPT_TOKENS GPT-2 tokens each."""
    tok = minigpt2.Tokenizer()
    words = ("the river ran past an old mill where children played after school and the miller "
             "told stories about storms ships harvests and kings long gone while bread baked").split()  # fmt: skip
    out, i = [], 0
    while len(out) < n:
        ids = tok.encode(" ".join(f"{words[(i * 7 + j) % len(words)]}" for j in range(40)) + f" {i}")
        text = tok.decode(ids[:PROMPT_TOKENS])
        if len(tok.encode(text)) == PROMPT_TOKENS:
            out.append(text)
        i += 1
    return out


class Generate:
    """``model.generate`` of one prompt alone (batch 1), timed: the single-stream reference."""

    def __init__(self, ckpt: Path, prompt: str, new_tokens: int) -> None:
        self.model = minigpt2.GPT2.from_pretrained(ckpt, device="cpu")
        self.ids = torch.tensor([minigpt2.Tokenizer().encode(prompt)])
        self.new_tokens = new_tokens
        self.rates: list[float] = []
        self.run()  # warm-up (kernel choice, first-use costs)
        self.rates.clear()

    def run(self) -> float:
        t = time.perf_counter()
        self.model.generate(self.ids, max_new_tokens=self.new_tokens, eos_token_id=None)
        self.rates.append(self.new_tokens / (time.perf_counter() - t))
        return self.rates[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess whose output is kept (and read for its URL or mode)."""

    def __init__(self, name: str, cmd: list[str], url: str | None = None) -> None:
        self.name = name
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        self.url = url
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url is None:
                m = next((re.search(r"at (http://\S+)/v1", line) for line in self.lines if " at http://" in line), None)
                self.url = m.group(1) if m else None
            elif _get(f"{self.url}/health") == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{name} did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def _get(url: str) -> int:
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=5) as r:
            return r.status
    except (URLError, OSError):
        return 0


# --------------------------------------------------------------------------- load
def stream(url: str, body: dict) -> dict[str, Any]:
    """One streamed completion: send time, chunk times, tokens from the final usage."""
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    chunks, tokens = [], 0
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        if any(c.get("text") for c in event.get("choices") or []):
            chunks.append(time.perf_counter())
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    return {"start": t0, "chunks": chunks, "tokens": tokens}


def run_level(url: str, bodies: list[dict], clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` threads, each streaming ``per_client`` requests back to back."""
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            try:
                r = stream(url, bodies[(c * per_client + k) % len(bodies)])
            except BaseException as e:  # noqa: BLE001 - reported after the level
                errors.append(e)
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    return summarize(clients, results, wall)


def summarize(clients: int, results: list[dict], wall: float) -> dict[str, Any]:
    ttft = [r["chunks"][0] - r["start"] for r in results if r["chunks"]]
    itl = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99), "raw": results,
    }  # fmt: skip


def merge(levels: list[dict]) -> dict[str, Any]:
    """One level's figures from several runs of it (their requests and wall times added up)."""
    return summarize(levels[0]["clients"], [r for x in levels for r in x["raw"]], sum(x["wall_s"] for x in levels))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def warm_up(server: Server, bodies: list[dict], top: int) -> None:
    """One whole stream, then one short round at the top level (first-use costs stay out)."""
    stream(server.url, bodies[0])
    run_level(server.url, [{**b, "max_tokens": 4} for b in bodies], top, 1)


def report_line(name: str, c: int, r: dict) -> None:
    print(f"  {name:<20} {c:>3} clients: {r['tokens_per_s']:8.1f} tok/s   TTFT p50 {r['ttft_p50_s'] * 1e3:7.0f} ms"
          f"  p99 {r['ttft_p99_s'] * 1e3:7.0f} ms   ITL p50 {r['itl_p50_s'] * 1e3:6.1f} ms  p99 {r['itl_p99_s'] * 1e3:6.1f} ms",
          flush=True)  # fmt: skip


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 16 new tokens, levels 1 and 4")
    ap.add_argument("--only", choices=["minigpt2", "transformers"], default=None)
    ap.add_argument("--levels", default=None, help="comma-separated client counts (default: 1,4,16)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="minigpt2 serve --max-batch-size (default: 16)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()

    shape = "tiny" if args.quick else "gpt2"
    new_tokens = 16 if args.quick else NEW_TOKENS
    levels = [int(x) for x in (args.levels or ("1,4" if args.quick else "1,4,16")).split(",")]
    import transformers

    report: dict[str, Any] = {
        "host": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "transformers": transformers.__version__},
        "load": {"shape": shape, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens, "levels": levels,
                 "greedy": True, "ignore_eos": True, "max_batch_size": args.max_batch_size},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="minigpt2-bench-serve-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", shape)
        texts = prompts(64)
        gen = Generate(ckpt, texts[0], new_tokens)
        body = {"model": str(ckpt), "max_tokens": new_tokens, "temperature": 0, "stream": True}
        servers: dict[str, tuple[Server, list[dict]]] = {}
        try:
            if args.only != "transformers":
                s = Server("minigpt2 serve", [sys.executable, "-m", "minigpt2", "serve", "--model", str(ckpt), "--port",
                                              "0", "--max-batch-size", str(args.max_batch_size)])  # fmt: skip
                mg_body = {**body, "ignore_eos": True, "stream_options": {"include_usage": True}}
                servers["minigpt2"] = (s, [{**mg_body, "prompt": t} for t in texts])
            if args.only != "minigpt2":
                s, report["transformers_mode"], tf_body = start_transformers(ckpt, body, texts, new_tokens)
                servers["transformers"] = (s, [{**tf_body, "prompt": t} for t in texts])
            for s, bodies in servers.values():
                warm_up(s, bodies, max(levels))
            # Level by level, the servers in turn (both are up, one under load at a time), so
            # that a slow drift of the host hits both alike.
            for c in levels:
                if c == 1:  # three rounds: a generate run, then one request to each server
                    rounds = []
                    for k in range(3):
                        gen.run()
                        rounds.append({name: run_level(s.url, bodies[k:], 1, 1) for name, (s, bodies) in servers.items()})
                    results = {name: merge([r[name] for r in rounds]) for name in servers}
                else:
                    results = {name: run_level(s.url, bodies, c, 2) for name, (s, bodies) in servers.items()}
                for name, r in results.items():
                    report.setdefault(name, {})[c] = r
                    report_line(servers[name][0].name, c, r)
            report["generate_tokens_per_s"] = statistics.median(gen.rates)
            report["generate_runs"] = gen.rates
            print(f"model.generate alone (batch 1), median of {len(gen.rates)}: {report['generate_tokens_per_s']:.1f} tok/s")
        except BaseException:
            for s, _ in servers.values():
                print(f"--- {s.name} (exit code {s.proc.poll()}), its last lines:\n" + "\n".join(s.lines[-15:]))
            raise
        finally:
            for s, _ in servers.values():
                s.stop()
    _summary(report, levels)
    for name in ("minigpt2", "transformers"):
        for r in report.get(name, {}).values():
            r.pop("raw", None)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def start_transformers(ckpt: Path, body: dict, texts: list[str], new_tokens: int) -> tuple[Server, str, dict]:
    """transformers serve, with --continuous-batching if that works here, else without."""
    gen_config = json.dumps({"max_new_tokens": new_tokens, "do_sample": False})  # no EOS id: EOS disabled
    tf_body = {**body, "generation_config": gen_config}
    for mode in ("continuous batching", "sequential"):
        port = free_port()
        # Its continuous batching sizes a paged KV cache from the free memory (80-90 % of it on
        # CPU: over 12 GB on a 24 GB host); give it minigpt2's capacity instead, 16 x 1024 tokens.
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(ckpt), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
               "--cb-block-size", "256", "--cb-num-blocks", "64"]  # fmt: skip
        if mode == "continuous batching":
            cmd.append("--continuous-batching")
        s = Server("transformers serve", cmd, url=f"http://127.0.0.1:{port}")
        try:
            stream(s.url, {**tf_body, "prompt": texts[0], "max_tokens": 2})
        except RuntimeError as e:
            s.stop()
            if mode == "sequential":
                raise
            print(f"transformers serve --continuous-batching failed ({e}); running without", flush=True)
            continue
        if mode == "continuous batching" and not any("CB: True" in line for line in s.lines):
            s.stop()
            print("transformers serve: continuous batching did not run on this device; running without", flush=True)
            continue
        print(f"transformers serve: {mode}", flush=True)
        return s, mode, tf_body
    raise RuntimeError("transformers serve did not start")


def _summary(report: dict, levels: list[int]) -> None:
    mg, tf = report.get("minigpt2"), report.get("transformers")

    def cell(r: dict | None, c: int) -> str:
        x = (r or {}).get(c)
        if x is None:
            return f"{'-':>41}"
        ttft = f"{x['ttft_p50_s'] * 1e3:.0f}/{x['ttft_p99_s'] * 1e3:.0f}"
        itl = f"{x['itl_p50_s'] * 1e3:.1f}/{x['itl_p99_s'] * 1e3:.1f}"
        return f"{x['tokens_per_s']:9.1f} {ttft:>15} {itl:>15}"

    head = f"{'tok/s':>9} {'TTFT p50/p99 ms':>15} {'ITL p50/p99 ms':>15}"
    print(f"\n{'':>7} | {'minigpt2 serve':^41} | {'transformers serve':^41} |")
    print(f"{'clients':>7} | {head} | {head} | ratio")
    for c in levels:
        ratio = f"{mg[c]['tokens_per_s'] / tf[c]['tokens_per_s']:.2f}x" if mg and tf and c in mg and c in tf else ""
        print(f"{c:>7} | {cell(mg, c)} | {cell(tf, c)} | {ratio}")
    if tf:
        print(f"transformers serve ran with: {report['transformers_mode']}")
    if mg:
        top, one = max(levels), min(levels)
        checks = {
            f"minigpt2 {top} clients / 1 client (target >= 4x)": mg[top]["tokens_per_s"] / mg[one]["tokens_per_s"],
            "minigpt2 1 client / model.generate alone (target >= 0.90)": mg[one]["tokens_per_s"] / report["generate_tokens_per_s"],
        }  # fmt: skip
        if tf:
            checks[f"minigpt2 / transformers serve at {top} clients (target >= 2x)"] = mg[top]["tokens_per_s"] / tf[top]["tokens_per_s"]
        report["ratios"] = checks
        for k, v in checks.items():
            print(f"{k}: {v:.2f}")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
