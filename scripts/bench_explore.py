"""How fast the explorer answers: each panel's endpoint, and a control move in the browser.

    python scripts/bench_explore.py                        # random-weight 124M gpt2, 64-token prompt
    python scripts/bench_explore.py --model runs/ft --prompt-tokens 128 --json out.json
    python scripts/bench_explore.py --screenshot docs/explore.png --model runs/ft --prompt "..."

Serves routes(engine) with uvicorn on 127.0.0.1 in this process, as ``minigpt2 explore`` does,
and measures:

- each endpoint's round trip over HTTP (median and max of --repeats, each on a prompt the
  server has not cached: the first token changes every time), what the page waits for;
- the strategy sweep: time to its first tokens and to the end;
- in headless Chromium (when Playwright and Debian's chromium are installed): a prompt load as
  the page does it (all panel requests at once, from request to drawn), and a control move
  (the processors over the whole vocabulary, then the bars redrawn, then two animation frames:
  what the user waits for), median and max over many moves.

The issue's targets: a control answers within 150 ms, each panel's data within 1 s, for a
64-token prompt on the 124M model on the 2-core host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
import urllib.request
from typing import Any

import torch

from minigpt2 import GPT2, GPT2Config, Tokenizer

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "\"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece of the 1889 World's Fair, "
    "and to crown the centennial anniversary of the French Revolution. Although initially criticised by some of "
    "France's leading artists and intellectuals for its design, it has since become a global cultural icon of France "
    "and one of the most recognisable structures in the world."
)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def post(url: str, body: dict[str, Any]) -> tuple[float, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        data = r.read()
    return time.perf_counter() - t, data


def get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as r:
        r.read()
    return time.perf_counter() - t


def serve(engine: Any) -> tuple[str, Any]:
    import uvicorn
    from starlette.applications import Starlette

    from minigpt2.explore.routes import routes

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes(engine)), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1), "n": len(ms)}


def bench_endpoints(base: str, ids: list[int], layer: int, repeats: int, vocab: int) -> dict[str, Any]:
    out: dict[str, Any] = {"vocab (once per page)": summary([get(f"{base}/api/explore/vocab")]),
                           "architecture (once per page)": summary([get(f"{base}/api/explore/architecture")])}
    text = Tokenizer().decode(ids)
    times: dict[str, list[float]] = {k: [] for k in ("tokens", "next token", "attention (one layer)", "logit lens",
                                                      "step (greedy)")}
    for r in range(repeats):
        fresh = [(ids[0] + 1 + r) % vocab] + ids[1:]  # a prompt the server has not cached
        times["tokens"].append(post(f"{base}/api/explore/tokens", {"prompt": text})[0])
        times["next token"].append(post(f"{base}/api/explore/next", {"input_ids": fresh})[0])
        times["attention (one layer)"].append(post(f"{base}/api/explore/attention", {"input_ids": fresh, "layer": layer})[0])
        times["logit lens"].append(post(f"{base}/api/explore/lens", {"input_ids": fresh, "k": 5})[0])
        times["step (greedy)"].append(post(f"{base}/api/explore/step", {"input_ids": fresh, "mode": "greedy"})[0])
    out.update({k: summary(v) for k, v in times.items()})
    return out


def bench_cpu(model: Any, tok: Any, ids: list[int], layer: int, repeats: int) -> dict[str, Any]:
    """Each data function called directly: wall time and the CPU time the process spent on it.

    On a shared machine wall time measures the neighbours as much as the code; CPU time does not
    (with --threads 1 nothing spins waiting for a second thread either), so it is the figure to
    carry to a quiet host: there a request takes about its CPU time on one core, and between
    half of it and all of it on two.
    """
    from minigpt2.explore import data

    calls = {
        "next token": lambda i: data.next_token(model, i),
        "attention (one layer)": lambda i: data.attention(model, i, layer),
        "logit lens": lambda i: data.lens(model, i, 5),
        "step (greedy)": lambda i: data.step(model, tok, i, mode="greedy"),
        "sweep: greedy column, first 4 tokens": lambda i: data.SweepColumn(model, tok, i, data.strategies()[0], 30, 0).advance(4),
    }
    out: dict[str, Any] = {}
    for name, fn in calls.items():
        wall, cpu = [], []
        for r in range(repeats):
            fresh = [(ids[0] + 1 + r) % model.config.vocab_size] + ids[1:]
            w, c = time.perf_counter(), time.process_time()
            fn(fresh)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        out[name] = {"wall": summary(wall), "cpu": summary(cpu)}
    return out


def bench_sweep(base: str, ids: list[int], n: int) -> dict[str, Any]:
    body = json.dumps({"input_ids": ids, "max_new_tokens": n, "seed": 0}).encode()
    req = urllib.request.Request(f"{base}/api/explore/strategies", data=body, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=1200) as r:
        for raw in r:
            line = raw.decode()
            if line.startswith("data:") and '"tokens"' in line:
                tokens += len(json.loads(line[5:])["tokens"])
                first = first or time.perf_counter() - t
    total = time.perf_counter() - t
    return {"first tokens (s)": round(first or 0, 3), "all columns (s)": round(total, 2), "tokens": tokens,
            "max_new_tokens": n}


def find_chromium() -> str | None:
    for c in (os.environ.get("MINIGPT2_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if c and os.path.exists(c):
            return c
    return None


def bench_browser(base: str, prompt: str, moves: int, screenshot: str | None, sweep_tokens: int) -> dict[str, Any]:
    exe = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        return {"skipped": "no Playwright or no chromium (apt-get install chromium)"}
    from urllib.parse import quote

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/explore?tokens={sweep_tokens}&prompt={quote(prompt)}")
        page.wait_for_function("window.explore && window.explore.ready", timeout=600_000)
        load = dict(page.evaluate("window.explore.timings"))
        count = int(page.get_attribute("#token-count", "data-count"))
        # A control move: set the value, fire the input event (the page re-runs every processor
        # over the whole vocabulary and redraws), then wait two animation frames (painted).
        ms = page.evaluate("""async (moves) => {
            const out = [];
            const box = document.getElementById("top_p");
            for (let i = 0; i < moves; i++) {
                const t0 = performance.now();
                box.value = String(0.05 + 0.9 * ((i * 37) % 100) / 100);
                box.dispatchEvent(new Event("input"));
                await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
                out.push(performance.now() - t0);
            }
            box.value = "1"; box.dispatchEvent(new Event("input"));
            return out;
        }""", moves)
        result = {"prompt tokens": count, "panel load, request to drawn (ms)": {k: round(v, 1) for k, v in load.items()},
                  "control move to painted": summary([m / 1000 for m in ms]), "page errors": errors}
        if screenshot:
            page.wait_for_selector("#sweep[data-done=true]", timeout=1_200_000)
            page.fill("#top_p", "0.8")
            page.fill("#temperature", "0.8")
            box = page.locator("#attn-big").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.32, box["y"] + box["height"] * 0.8)
            # The page down to the logit lens: the architecture panel below it is long.
            bottom = page.locator("#lens-panel").bounding_box()
            page.screenshot(path=screenshot, full_page=True,
                            clip={"x": 0, "y": 0, "width": 1400, "height": bottom["y"] + bottom["height"] + 12})
            result["screenshot"] = screenshot
        browser.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: a random-weight 124M gpt2 built here)")
    ap.add_argument("--prompt", default=None, help="prompt text (default: a paragraph cut to --prompt-tokens)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--layer", type=int, default=None, help="attention layer (default: the middle one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--moves", type=int, default=30, help="control moves measured in the browser")
    ap.add_argument("--sweep-tokens", type=int, default=30)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--no-server", action="store_true", help="only the in-process CPU-time figures")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--screenshot", default=None, metavar="FILE.png")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    from minigpt2.explore.engine import LocalEngine

    if args.model:
        model, tok, name = GPT2.from_pretrained(args.model), Tokenizer.from_pretrained(args.model), args.model
    else:
        torch.manual_seed(0)
        model, tok, name = GPT2(GPT2Config()).eval(), Tokenizer(), "random-weight gpt2 (124M)"
    if args.prompt is not None:
        ids = tok.encode(args.prompt)
    else:
        ids = tok.encode(TEXT * (1 + args.prompt_tokens // 100))[: args.prompt_tokens]
    prompt = args.prompt if args.prompt is not None else tok.decode(ids)
    layer = model.config.n_layer // 2 if args.layer is None else args.layer
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_server:
        bench_cpu(model, tok, ids, layer, 1)  # warm up
        result = {"model": name, "prompt tokens": len(ids), "torch threads": torch.get_num_threads(),
                  "load average before": os.getloadavg(),
                  "in-process (data functions)": bench_cpu(model, tok, ids, layer, args.repeats),
                  "load average after": os.getloadavg()}
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(json.dumps(result, indent=2) + "\n")
        return 0
    engine = LocalEngine(model, tok, name=name)
    base, server = serve(engine)
    result: dict[str, Any] = {
        "model": name, "parameters": model.num_parameters(), "prompt tokens": len(ids),
        "torch threads": torch.get_num_threads(), "cpu count": os.cpu_count(),
        "load average before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    post(f"{base}/api/explore/next", {"input_ids": ids})  # warm up: first-call costs are not per request
    result["endpoints (HTTP round trip)"] = bench_endpoints(base, ids, layer, args.repeats, model.config.vocab_size)
    result["strategy sweep"] = bench_sweep(base, ids, args.sweep_tokens)
    if not args.no_browser:
        result["browser"] = bench_browser(base, prompt, args.moves, args.screenshot, args.sweep_tokens)
    result["load average after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    server.should_exit = True
    engine.close()
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
