"""The explorer page in a real browser: headless Chromium driven by Playwright.

The page is served by routes(engine) on uvicorn (as ``minigpt2 explore`` does) on a random
checkpoint with the full GPT-2 vocabulary, and held against the library: the token list
against the Tokenizer, the kept counts and probabilities of the next-token panel against
``minigpt2.sampling`` on the same logits, a heatmap cell against ``run_with_cache``, the
logit lens against ``logit_lens``, the sweep's greedy and sampled columns against
``model.generate``. Chromium is Debian's package (``apt-get install chromium``; .ci/run
installs it), launched by path: Playwright downloads no browser. Without one these tests skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")


from minigpt2 import GPT2, Tokenizer, logit_lens, sampling  # noqa: E402
from minigpt2.explore import data  # noqa: E402
from minigpt2.explore.engine import LocalEngine  # noqa: E402
from minigpt2.cli.explore import build_app  # noqa: E402
from minigpt2.explore.routes import routes  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "The Eiffel Tower is in the city of"  # the page's default prompt
SWEEP_TOKENS = 8


def on_engine(engine, fn):
    """Run ``fn(model)`` on the engine thread, as the server does: the page may be generating
    (the sweep) at the same time, and hooks (run_with_cache) belong to one forward at a time."""
    return engine.call(lambda m, t: fn(m)).result()


def find_chromium() -> str | None:
    for candidate in (os.environ.get("MINIGPT2_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.fixture(scope="module")
def engine(gpt2_tiny_vocab_checkpoint):
    path, _ = gpt2_tiny_vocab_checkpoint
    e = LocalEngine(GPT2.from_pretrained(path), Tokenizer.from_pretrained(path), name="random-tiny")
    yield e
    e.close()


@pytest.fixture(scope="module")
def base_url(engine):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))  # what `minigpt2 explore` serves
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (CI installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Page:
    """A loaded explorer page and everything its console said."""

    def __init__(self, browser, base_url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(f"{base_url}/explore?tokens={SWEEP_TOKENS}")  # a short sweep keeps the tests quick
        self.page.wait_for_function("window.explore && window.explore.ready", timeout=60_000)

    def set_prompt(self, text: str) -> None:
        before = self.page.evaluate("window.explore.loaded")
        self.page.fill("#prompt", text)
        self.page.wait_for_function(f"window.explore.loaded > {before}", timeout=60_000)

    def set_control(self, name: str, value: str) -> None:
        self.page.fill(f"#{name}", value)  # fill fires the input event, as typing does

    def js_errors(self) -> list[str]:
        return [c for c in self.console if "Failed to load resource" not in c]


@pytest.fixture
def page(browser, base_url):
    p = Page(browser, base_url)
    yield p
    p.page.close()


def test_page_loads_with_every_panel_and_no_console_error(page, engine):
    pg = page.page
    pg.wait_for_selector("#sweep[data-done=true]", timeout=120_000)
    cfg = engine.model.config
    ids = engine.tokenizer.encode(PROMPT)
    assert pg.locator("#tokens .tok").count() == len(ids)
    assert pg.locator("#bars .bar-label").count() == 20
    assert pg.locator("#heads .head").count() == cfg.n_head
    assert pg.locator("#lens td").count() == (cfg.n_layer + 1) * len(ids)
    assert pg.locator("#tree .line").count() > 20
    assert pg.locator("#comparison tr").count() == len(data.COMPARISON_ROWS) + 1
    assert pg.locator("#sweep .column").count() == len(data.strategies())
    assert pg.locator("#sweep .column[data-done=true]").count() == len(data.strategies())
    assert "random-tiny" in pg.inner_text("#model-line")
    for panel in ("tokens", "next", "attention", "lens", "sweep", "architecture"):
        assert pg.locator(f"#{panel}-error").is_hidden(), panel
    assert page.console == []


def test_token_list_equals_the_tokenizer(page, engine):
    tok = engine.tokenizer
    text = "Hello  world\n\tcaf\u00e9 \U0001F600 <|endoftext|> 12345 don't"
    page.set_prompt(text)
    chips = page.page.locator("#tokens .tok")
    ids = [int(x) for x in chips.evaluate_all("els => els.map(e => e.dataset.id)")]
    pieces = chips.evaluate_all("els => els.map(e => e.dataset.piece)")
    assert ids == tok.encode(text)
    assert pieces == [data.piece(tok, i) for i in ids]
    shown = page.page.inner_text("#tokens")
    assert "\u2423world" in shown and "\u21b5" in shown  # a leading space and a newline, visible
    assert page.page.get_attribute("#token-count", "data-count") == str(len(ids))
    assert page.js_errors() == []


def _library(engine, ids, **settings):
    """Kept count and probabilities that minigpt2.sampling gives on the page's logits."""
    logits = on_engine(engine, lambda m: data.last_logits(m, ids))
    p = data.ProcessorSettings.parse(settings).processors(do_sample=True)
    scores = sampling.process(p, torch.tensor([ids]), logits[None], n_new=0, eos_ids=None)[0]
    return int((scores > float("-inf")).sum()), torch.softmax(scores, -1)


def test_moving_top_p_keeps_what_sampling_keeps(page, engine):
    pg = page.page
    ids = engine.tokenizer.encode(PROMPT)
    page.set_control("top_k", "0")
    page.set_control("temperature", "0.3")  # sharper than the random model's near-uniform logits
    seen = set()
    for top_p in ("0.9", "0.5", "0.2", "0.03"):
        page.set_control("top_p", top_p)
        kept = int(pg.get_attribute("#kept-count", "data-kept"))
        expect, probs = _library(engine, ids, top_k=0, temperature=0.3, top_p=float(top_p))
        assert kept == expect, top_p
        seen.add(kept)
        bars = pg.locator("#bars .bar-val").evaluate_all(
            "els => els.map(e => [Number(e.dataset.id), Number(e.dataset.prob), e.dataset.removedBy])")
        for token, prob, removed in bars:
            assert prob == pytest.approx(float(probs[token]), rel=1e-4, abs=1e-9), (top_p, token)
            assert (removed == "top-p") == (float(probs[token]) == 0.0)
    assert len(seen) == 4  # the control really moved the count
    assert page.js_errors() == []


def test_page_processors_equal_sampling_on_the_same_logits(page, engine):
    """processors.js against minigpt2.sampling for many settings: kept counts and probabilities."""
    pg = page.page
    ids = engine.tokenizer.encode(PROMPT)
    logits = on_engine(engine, lambda m: data.last_logits(m, ids))
    page_logits = pg.evaluate("Array.from(window.explore.state.logits)")
    assert torch.equal(torch.tensor(page_logits, dtype=torch.float32), logits)  # the same logits, bit for bit
    grid = [
        dict(temperature=1.0, top_k=50, top_p=1.0),
        dict(temperature=0.5, top_k=0, top_p=0.9),
        dict(temperature=0.2, top_k=0, top_p=0.5),
        dict(temperature=0.25, top_k=500, top_p=0.8, repetition_penalty=1.3),
        dict(temperature=1.7, top_k=3, top_p=1.0, repetition_penalty=0.7),
        dict(temperature=0.1, top_k=0, top_p=0.999),
        dict(temperature=0.05, top_k=0, top_p=0.3, repetition_penalty=2.0),
    ]
    for s in grid:
        full = {"min_p": None, "typical_p": None, "repetition_penalty": 1.0, **s}
        got = pg.evaluate("""([s, ids]) => {
            const r = window.explore.processors.process(window.explore.state.logits, ids, s);
            const top = window.explore.processors.topIndices(r.probs, 40);
            return [r.kept, top.map(i => [i, r.probs[i]]), r.entropy];
        }""", [full, ids])
        kept, probs = _library(engine, ids, **s)
        assert got[0] == kept, s
        for token, p in got[1]:
            assert p == pytest.approx(float(probs[token]), rel=1e-4, abs=1e-9), (s, token)
        ent = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
        assert got[2] == pytest.approx(ent, rel=1e-4), s


def test_page_min_p_and_typical_p_equal_the_reference(page, engine):
    """min-p and typical-p in the page against minigpt2.sampling.

    Both compare each probability with a threshold (min-p: min_p x the top probability;
    typical-p: a distance from the entropy), and PyTorch's vectorised exp is not the browser's
    in the last bit, so on a random model's near-uniform distribution a token sitting within
    float32 rounding of the threshold can fall either way. Every other token must agree.
    """
    pg = page.page
    ids = engine.tokenizer.encode(PROMPT)
    logits = on_engine(engine, lambda m: data.last_logits(m, ids))
    tolerance = {"min_p": 1e-5, "typical_p": 1e-4}  # relative to the threshold; nats
    for name, value in (("min_p", 0.05), ("min_p", 0.5), ("min_p", 0.9), ("typical_p", 0.9), ("typical_p", 0.5),
                        ("typical_p", 0.2)):
        s = {"temperature": 0.2, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "min_p": None, "typical_p": None}
        s[name] = value
        kept_ids, top = pg.evaluate("""([s]) => {
            const r = window.explore.processors.process(window.explore.state.logits, [], s);
            const kept = [];
            r.removed.forEach((why, i) => { if (!why) kept.push(i); });
            return [kept, window.explore.processors.topIndices(r.probs, 20).map(i => [i, r.probs[i]])];
        }""", [s])
        scaled = logits / 0.2
        _, probs = _library(engine, ids, **{k: v for k, v in s.items() if v is not None})
        scores = torch.where(probs > 0, scaled, float("-inf"))
        expect = set(torch.nonzero(scores > float("-inf"))[:, 0].tolist())
        differ = expect.symmetric_difference(kept_ids)
        p = torch.softmax(scaled, -1).double()
        if name == "min_p":  # distance of each disagreeing token from the threshold, relative
            threshold = value * float(p.max())
            off = [abs(float(p[i]) - threshold) / threshold for i in differ]
        else:
            logp = p.log()
            ent = float(-(p * logp).sum())
            shifted = (-logp - ent).abs()
            bound = max(float(shifted[i]) for i in expect)  # the last typical token kept
            # |surprisal - entropy| cancels digits: float32 log-probs near -10 nats carry ~1e-6
            # of rounding each and the entropy sums 50257 of them, so the band is in nats
            off = [abs(float(shifted[i]) - bound) for i in differ]
        assert all(d < tolerance[name] for d in off), (name, value, len(differ), max(off, default=0))
        assert len(differ) <= 5, (name, value, len(differ))
        if not differ:
            for token, q in top:
                assert q == pytest.approx(float(probs[token]), rel=1e-4, abs=1e-9), (name, value, token)


def test_heatmap_cell_weight_equals_run_with_cache(page, engine):
    pg = page.page
    ids = engine.tokenizer.encode(PROMPT)
    T = len(ids)
    pg.select_option("#layer", "1")
    pg.wait_for_function("window.explore.state.attn && window.explore.state.attn.layer === 1")
    pg.click("#heads .head[data-head='2']")
    _, acts = on_engine(engine, lambda m: m.run_with_cache(torch.tensor([ids]), names=["h.1.attn.pattern"]))
    pattern = acts["h.1.attn.pattern"][0]
    box = pg.locator("#attn-big").bounding_box()
    for q, k in ((5, 2), (T - 1, 0), (3, 3), (2, 6)):
        pg.mouse.move(box["x"] + (k + 0.5) * box["width"] / T, box["y"] + (q + 0.5) * box["height"] / T)
        readout = pg.locator("#attn-readout")
        assert readout.get_attribute("data-head") == "2"
        assert (int(readout.get_attribute("data-query")), int(readout.get_attribute("data-key"))) == (q, k)
        weight = float(readout.get_attribute("data-weight"))
        assert weight == float(pattern[2, q, k]), (q, k)  # the float32 itself, not a rounding
        assert (readout.get_attribute("data-masked") == "true") == (k > q)
        assert pg.locator("#tip").is_visible()
    assert page.js_errors() == []


def test_logit_lens_cells_are_logit_lens(page, engine):
    pg = page.page
    ids = engine.tokenizer.encode(PROMPT)
    lens = on_engine(engine, lambda m: logit_lens(m, torch.tensor([ids]), k=5))
    cells = pg.locator("#lens td").evaluate_all(
        "els => els.map(e => [Number(e.dataset.row), Number(e.dataset.pos), Number(e.dataset.id), Number(e.dataset.prob)])")
    assert len(cells) == len(lens.names) * len(ids)
    for row, pos, token, prob in cells:
        assert token == int(lens.token_ids[0, row, pos, 0])
        assert prob == pytest.approx(float(lens.probs[0, row, pos, 0]), rel=1e-6)
    pg.hover("#lens td[data-row='1'][data-pos='3']")
    tip = pg.inner_text("#tip")
    assert tip.count("\n") == 5 and "top 5" in tip


def test_sweep_greedy_and_sampled_columns_equal_generate(page, engine):
    pg = page.page
    pg.wait_for_selector("#sweep[data-done=true]", timeout=120_000)
    ids = engine.tokenizer.encode(PROMPT)
    n = int(pg.input_value("#sweep-tokens"))
    assert n == SWEEP_TOKENS
    seed = int(pg.input_value("#sweep-seed"))

    def column(key: str) -> list[int]:
        return [int(x) for x in pg.locator(f"#sweep .column[data-key='{key}'] .gtok").evaluate_all(
            "els => els.map(e => e.dataset.id)")]

    greedy = on_engine(engine, lambda m: m.generate([ids], max_new_tokens=n))[0, len(ids):].tolist()
    assert column("greedy") == greedy
    g = torch.Generator().manual_seed(seed)
    expect = on_engine(engine, lambda m: m.generate([ids], max_new_tokens=n, do_sample=True, temperature=1.5, top_k=0,
                                                    top_p=1.0, generator=g))[0, len(ids):].tolist()
    assert column("temperature-1.5") == expect
    pg.hover("#sweep .column[data-key='greedy'] .gtok >> nth=2")
    assert "alternatives at this step" in pg.inner_text("#tip")
    assert page.js_errors() == []


def test_step_through_appends_the_librarys_token(page, engine):
    pg = page.page
    ids = engine.tokenizer.encode(PROMPT)
    before = pg.evaluate("window.explore.loaded")
    pg.click("#pick-greedy")
    pg.wait_for_function(f"window.explore.loaded > {before}", timeout=60_000)
    greedy = on_engine(engine, lambda m: m.generate([ids], max_new_tokens=1))[0, -1].item()
    chips = [int(x) for x in pg.locator("#tokens .tok").evaluate_all("els => els.map(e => e.dataset.id)")]
    assert chips == ids + [greedy]
    assert pg.locator("#step-history li").last.get_attribute("data-id") == str(greedy)
    assert pg.input_value("#prompt") == engine.tokenizer.decode(ids + [greedy])
    before = pg.evaluate("window.explore.loaded")
    pg.fill("#step-seed", "5")
    pg.click("#pick-sample")
    pg.wait_for_function(f"window.explore.loaded > {before}", timeout=60_000)
    g = torch.Generator().manual_seed(5 + 1)  # the second step of this page: seed + steps so far
    expect = on_engine(engine, lambda m: m.generate([ids + [greedy]], max_new_tokens=1, do_sample=True,
                                                    generator=g))[0, -1].item()
    chips = [int(x) for x in pg.locator("#tokens .tok").evaluate_all("els => els.map(e => e.dataset.id)")]
    assert chips == ids + [greedy, expect]
    assert page.js_errors() == []


def test_errors_show_in_the_page(page, engine):
    pg = page.page
    n = engine.model.config.n_positions
    page.set_prompt(" a" * (n + 10))
    assert "too many" in pg.inner_text("#tokens-count")
    for panel in ("next", "attention", "lens"):
        assert pg.locator(f"#{panel}-error").is_visible(), panel
        assert f"prompt of {n + 10} tokens exceeds n_positions={n}" in pg.inner_text(f"#{panel}-error")
    pg.wait_for_selector("#sweep-error:not([hidden])")
    assert f"exceeds n_positions={n}" in pg.inner_text("#sweep-error")
    page.set_prompt(PROMPT)
    assert pg.locator("#next-error").is_hidden()
    page.set_control("temperature", "-1")
    assert "temperature=-1 must be > 0" in pg.inner_text("#next-error")
    page.set_control("temperature", "1")
    page.set_control("top_p", "")
    assert "top_p must be a number" in pg.inner_text("#next-error")
    # A prompt the server refuses outright (over 1 MiB): said in every panel, no stale numbers left.
    pg.evaluate("""() => { const p = document.getElementById("prompt");
                           p.value = "x".repeat((1 << 20) + 10); p.dispatchEvent(new Event("input")); }""")
    pg.wait_for_selector("#tokens-error:not([hidden])", timeout=60_000)
    assert "exceeds the limit" in pg.inner_text("#tokens-error")
    assert "no tokens" in pg.inner_text("#next-error") and pg.locator("#bars .bar").count() == 0
    assert page.js_errors() == []


def test_the_page_on_minigpt2_serve_with_an_api_key(browser, gpt2_tiny_vocab_checkpoint):
    """minigpt2 serve's app with --api-key: the page opened as /explore#key=KEY sends the key on
    every API call (all panels fill, the key leaves the address bar); without it the page says
    which URL to open."""
    pytest.importorskip("fastapi")
    from serve_util import ServerThread

    from minigpt2.serve import Engine, create_app

    path, _ = gpt2_tiny_vocab_checkpoint
    model = GPT2.from_pretrained(path)
    with Engine(model, Tokenizer.from_pretrained(path), max_batch_size=2, name="served-tiny") as engine, \
            ServerThread(create_app(engine, model_name="served-tiny", api_key="sekret", extra_routes=routes(engine))) as s:
        page = browser.new_page()
        try:
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{s.url}/explore?tokens=4#key=sekret")
            page.wait_for_function("window.explore && window.explore.ready", timeout=60_000)
            page.wait_for_selector("#sweep[data-done=true]", timeout=120_000)
            assert "served-tiny" in page.inner_text("#model-line")
            for panel in ("tokens", "next", "attention", "lens", "sweep", "architecture"):
                assert page.locator(f"#{panel}-error").is_hidden(), panel
            assert page.evaluate("location.hash") == "" and errors == []
            ids = engine.tokenizer.encode(PROMPT)
            assert page.locator("#tokens .tok").count() == len(ids)
        finally:
            page.close()
        page = browser.new_page()  # a new tab: no key kept
        try:
            page.goto(f"{s.url}/explore")
            page.wait_for_selector("#global-error:not([hidden])", timeout=60_000)
            assert "/explore#key=" in page.inner_text("#global-error")
        finally:
            page.close()


@pytest.mark.parametrize("seed", ["abc", "-1", "1.5"])
def test_a_bad_seed_in_the_link_is_an_error_not_seed_0(browser, base_url, seed):
    pg = browser.new_page()
    try:
        pg.goto(f"{base_url}/explore?tokens=2&seed={seed}")
        pg.wait_for_function("window.explore && window.explore.ready", timeout=60_000)
        pg.wait_for_selector("#sweep-error:not([hidden])", timeout=30_000)
        assert f'seed must be an integer >= 0, got "{seed}"' in pg.inner_text("#sweep-error")
        pg.click("#pick-sample")
        pg.wait_for_selector("#next-error:not([hidden])", timeout=30_000)
        assert f'got "{seed}"' in pg.inner_text("#next-error")
    finally:
        pg.close()
