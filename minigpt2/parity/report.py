"""Two captures in, one verdict out: the parity table, where it first fails, and why.

Measure (CONVENTIONS.md, "Tolerances"): for each named tensor,
``ratio = max |ours - reference| / max |reference|``, computed in float64, and the row
passes when ``ratio <= rtol``. Taking the largest reference value as the scale makes the
test independent of units and immune to near-zero entries, and it is the measure the
project's own tests hold minigpt2 to.

- float32: rtol 1e-4 everywhere (activations, logits, gradients, loss).
- bfloat16 / float16 weights against the float32 reference: no float32 tolerance can
  hold, so the logits are judged by top-1 agreement and the worst margin (how far the
  reference's own top token is ahead of ours where the two differ, as a fraction of
  max |reference logit|). The other rows are held to what half precision itself costs:
  when transformers can run, its own model in the same dtype measures that cost per row
  (the *noise* capture), and ours may be at most :data:`HALF_NOISE_FACTOR` times as far
  from float32 (and always one unit in the last place of the largest value, 2^-8 for
  bfloat16, 2^-11 for float16); against a file, a fixed :data:`HALF_RTOL`.
- generation: greedy tokens must be identical, except at a near-tie: where the
  reference's margin between the two tokens is within what the logit tolerance allows.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .capture import Capture

#: float32 parity: max |ours - reference| <= FP32_RTOL x max |reference| (CONVENTIONS.md).
FP32_RTOL = 1e-4
#: Half precision against a float32 reference file (no half-precision transformers run to
#: measure the noise): random gpt2 / gpt2-medium-shaped checkpoints put a correct bf16
#: model's worst activation near 2e-2 / 3e-2 and an fp16 one's near 2e-3 / 3e-3
#: (docs/parity.md); a fault gives 0.1 to 1. Deeper models may need ``--rtol``.
HALF_RTOL: dict[torch.dtype, float] = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
#: Half precision against transformers: each row may be this many times further from the
#: float32 reference than transformers' own model in the same dtype is ...
HALF_NOISE_FACTOR = 4.0
#: ... and at least one unit in the last place of the largest value (2^-8 bf16, 2^-11 fp16).
HALF_FLOOR: dict[torch.dtype, float] = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: Half precision: at least this share of positions must pick the reference's top-1 ...
TOP1_MIN_AGREEMENT = 0.9
#: ... and where they differ, the reference's margin must be <= this x max |reference logit|.
TOP1_MAX_MARGIN = 0.02


def default_rtol(dtype: torch.dtype | None) -> float:
    """The tolerance for a model computing in ``dtype`` (None / float32: 1e-4)."""
    return HALF_RTOL.get(dtype, FP32_RTOL) if dtype is not None else FP32_RTOL


def is_half(dtype: torch.dtype | None) -> bool:
    return dtype in HALF_RTOL


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One named tensor held against the reference.

    max_abs_diff: max |ours - reference| (None when they could not be compared).
    max_abs_ref: max |reference|.
    ratio: max_abs_diff / max_abs_ref (0 when both are all zeros, inf when only ours is not).
    limit: the ratio this row may reach (rtol; per row in half precision, see the module).
    worst_index: where the largest difference is, e.g. [batch, position, channel].
    shown: part of the table (the default rows, or every row with ``--all``).
    note: why a row failed without numbers (shape, NaN, absent), or "near-tie"-like remarks.
    """

    name: str
    kind: str  # "activation", "logits" or "grad"
    max_abs_diff: float | None
    max_abs_ref: float | None
    ratio: float | None
    passed: bool
    limit: float | None = None
    shown: bool = True
    worst_index: list[int] | None = None
    note: str = ""


def compare_tensors(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float, kind: str = "activation") -> Row:
    """Hold one tensor against the reference (see the module docstring for the measure).

    A missing leading batch dimension of 1 in ``ours`` is accepted (a dump of one row may
    leave it out); any other shape difference fails the row with both shapes in the note.
    """
    if ours.shape != ref.shape and ref.dim() == ours.dim() + 1 and ref.shape[0] == 1 and ref.shape[1:] == ours.shape:
        ours = ours[None]
    if ours.shape != ref.shape:
        note = f"shape {list(ours.shape)}, reference {list(ref.shape)}"
        if sorted(ours.shape) == sorted(ref.shape):
            note += " (the same sizes in another order: check the layout, docs/parity.md)"
        return Row(name, kind, None, None, None, False, rtol, note=note)
    a, b = ours.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    max_ref = b.abs().max().item() if b.numel() else 0.0
    if not torch.isfinite(a).all():
        bad = int((~torch.isfinite(a)).sum())
        return Row(name, kind, math.inf, max_ref, math.inf, False, rtol, note=f"{bad} non-finite values (NaN/inf) in ours")
    if b.numel() == 0:
        return Row(name, kind, 0.0, 0.0, 0.0, True, rtol)
    diff = (a - b).abs()
    flat = int(diff.argmax())
    worst = [int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)]
    max_diff = diff.reshape(-1)[flat].item()
    ratio = max_diff / max_ref if max_ref > 0 else (0.0 if max_diff == 0 else math.inf)
    return Row(name, kind, max_diff, max_ref, ratio, ratio <= rtol, rtol, worst_index=worst)


def noise_limit(noise: torch.Tensor | None, ref: torch.Tensor, dtype: torch.dtype, fallback: float) -> float:
    """The tolerance of one row in half precision: HALF_NOISE_FACTOR x how far transformers'
    own half-precision ``noise`` is from the float32 ``ref``, at least HALF_FLOOR[dtype];
    ``fallback`` when there is no noise tensor to measure."""
    if noise is None:
        return fallback
    r = compare_tensors("noise", noise, ref, math.inf).ratio
    if r is None or not math.isfinite(r):
        return fallback
    return max(HALF_FLOOR[dtype], HALF_NOISE_FACTOR * r)


# -------------------------------------------------------------------------- the checks
@dataclass
class Top1Check:
    """Next-token agreement of the logits: does ours pick the reference's top token?

    positions: how many (batch, position) pairs were compared.
    agreement: the share of them where the argmax is the same.
    worst_margin: the largest ref[ref's top] - ref[our top], in logits (0 when all agree).
    worst_margin_rel: worst_margin / max |reference logit|.
    worst_position: [batch, position] of that worst disagreement (None when all agree).
    ours_token / ref_token: the two tokens there.
    judged: whether this check decides the logits row (half precision) or only informs.
    """

    positions: int
    agreement: float
    worst_margin: float
    worst_margin_rel: float
    worst_position: list[int] | None
    ours_token: int | None
    ref_token: int | None
    min_agreement: float = TOP1_MIN_AGREEMENT
    max_margin_rel: float = TOP1_MAX_MARGIN
    judged: bool = False

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.worst_margin_rel <= self.max_margin_rel


def top1_check(ours: torch.Tensor, ref: torch.Tensor, judged: bool) -> Top1Check:
    """Top-1 agreement and worst margin of logits [B, T, V] (see :class:`Top1Check`)."""
    a, b = ours.to(torch.float64), ref.to(torch.float64)
    our_top, ref_top = a.argmax(-1), b.argmax(-1)  # (B, T)
    margin = b.gather(-1, ref_top[..., None])[..., 0] - b.gather(-1, our_top[..., None])[..., 0]  # >= 0
    scale = b.abs().max().item() or 1.0
    flat = int(margin.argmax())
    worst = margin.reshape(-1)[flat].item()
    pos = [int(i) for i in torch.unravel_index(torch.tensor(flat), margin.shape)] if worst > 0 else None
    agree = (our_top == ref_top).double().mean().item()
    return Top1Check(
        positions=int(our_top.numel()), agreement=agree, worst_margin=worst, worst_margin_rel=worst / scale,
        worst_position=pos,
        ours_token=int(our_top.reshape(-1)[flat]) if pos else None,
        ref_token=int(ref_top.reshape(-1)[flat]) if pos else None,
        judged=judged,
    )


@dataclass
class LossCheck:
    """The mean cross-entropy of both, and whether |ours - ref| <= rtol x |ref|."""

    ours: float
    reference: float
    abs_diff: float
    rel_diff: float
    rtol: float  # the limit of rel_diff

    @property
    def passed(self) -> bool:
        return math.isfinite(self.ours) and self.rel_diff <= self.rtol


def loss_check(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> LossCheck:
    a, b = float(ours), float(ref)
    diff = abs(a - b) if math.isfinite(a) else math.inf
    return LossCheck(a, b, diff, diff / abs(b) if b != 0 else (0.0 if diff == 0 else math.inf), rtol)


@dataclass
class GenerationCheck:
    """Greedy decoding in both, token by token.

    steps: the tokens asked for; ours / reference: the new tokens each produced (fewer when
    one stopped at EOS). first_diff_step: the first step where they differ (None: identical).
    At that step, with the common prefix as input: ours_token and ref_token, ref_margin =
    ref[ref_token] - ref[ours_token] in the reference's logits, ours_margin the same in ours,
    logits_diff = max |ours - ref| over that step's logits, and tie_bound the margin up to
    which a flip is a near-tie: 2 x the logit tolerance (each logit may be off by rtol x
    max |ref|; or the half-precision margin). A near-tie passes; any other difference fails.
    """

    steps: int
    ours: list[int]
    reference: list[int]
    first_diff_step: int | None = None
    ours_token: int | None = None
    ref_token: int | None = None
    ref_margin: float | None = None
    ours_margin: float | None = None
    logits_diff: float | None = None
    tie_bound: float | None = None
    near_tie: bool = False

    @property
    def passed(self) -> bool:
        return self.first_diff_step is None or self.near_tie


# --------------------------------------------------------------------------- hints
_HINTS: list[tuple[str, str]] = [
    (r"embed", "the embeddings: wte rows, wpe rows or the position ids (wte[ids] + wpe[0..T-1])"),
    (r"h\.(\d+)\.resid_pre", "the residual stream entering block {0} (the previous block's output)"),
    (r"h\.(\d+)\.ln_1", "LayerNorm ln_1 of block {0}: its weight, bias or epsilon"),
    (r"h\.(\d+)\.attn\.[qkv]", "c_attn of block {0}: its weight (Conv1D, stored [in, out] = [C, 3C]; an "
     "nn.Linear port needs it transposed), its bias, or the split of the 3C outputs into q, k, v (in that "
     "order), each into heads [B, nh, T, hs]"),
    (r"h\.(\d+)\.attn\.pattern", "the attention scores of block {0}: the scale 1/sqrt(head_dim) (and "
     "1/(layer+1) with scale_attn_by_inverse_layer_idx), the causal mask, or the softmax over keys"),
    (r"h\.(\d+)\.attn\.out", "the attention output of block {0}: pattern @ v, the merge of the heads back "
     "to [B, T, C], or attn.c_proj's weight and bias"),
    (r"h\.(\d+)\.resid_mid", "the residual add after attention in block {0}: resid_pre + attn.out"),
    (r"h\.(\d+)\.ln_2", "LayerNorm ln_2 of block {0}: its weight, bias or epsilon"),
    (r"h\.(\d+)\.mlp\.act", "the MLP expansion of block {0}: mlp.c_fc's weight and bias, or the activation "
     "(GPT-2's gelu_new is the tanh approximation)"),
    (r"h\.(\d+)\.mlp\.out", "the MLP projection of block {0}: mlp.c_proj's weight and bias"),
    (r"h\.(\d+)\.resid_post", "the residual add after the MLP in block {0}: resid_mid + mlp.out"),
    (r"ln_f", "the final LayerNorm ln_f: its weight, bias or epsilon"),
    (r"logits", "the unembedding: the head must be wte itself (tied); an untied or stale copy of it, or "
     "a missing ln_f before it, shows first here"),
]


def hint(name: str) -> str:
    """What usually breaks first at activation ``name`` (when everything before it passed)."""
    for pattern, text in _HINTS:
        m = re.fullmatch(pattern, name)
        if m:
            return text.format(*m.groups())
    return ""


# --------------------------------------------------------------------------- the report
@dataclass
class ParityReport:
    """The outcome of holding one implementation against a reference.

    rows: every compared activation then ``logits``, in forward order (``shown`` marks the
        table's rows: the default set, or all of them with ``--all``).
    grads: one row per parameter (``--grad``), in parameter order.
    top1, loss, generation: the other checks (None when not run).
    missing: reference names the other side did not provide (a dump may hold any subset).
    extra: names the other side provided that the reference lacks (not compared).
    """

    ours: str
    reference: str
    dtype: str
    rtol: float
    input_shape: list[int]
    rows: list[Row]
    tolerance: str = ""
    top1: Top1Check | None = None
    loss: LossCheck | None = None
    grads: list[Row] = field(default_factory=list)
    generation: GenerationCheck | None = None
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- verdicts
    @property
    def passed(self) -> bool:
        """Every row, gradient and check passed (and something was compared)."""
        checks = [self.loss, self.generation] + ([self.top1] if self.top1 is not None and self.top1.judged else [])
        return (
            bool(self.rows or self.grads or self.loss or self.generation)
            and all(r.passed for r in self.rows)
            and all(r.passed for r in self.grads)
            and all(c.passed for c in checks if c is not None)
        )

    @property
    def first_failure(self) -> str | None:
        """The first row of the table (forward order) past the tolerance."""
        return next((r.name for r in self.rows if r.shown and not r.passed), None)

    @property
    def first_failure_any(self) -> str | None:
        """The first of every compared activation past the tolerance: where it breaks."""
        return next((r.name for r in self.rows if not r.passed), None)

    @property
    def last_pass_before_failure(self) -> str | None:
        """The last compared activation that passed before :attr:`first_failure_any`."""
        last = None
        for r in self.rows:
            if not r.passed:
                return last
            last = r.name
        return None

    @property
    def hint(self) -> str:
        """What usually breaks at :attr:`first_failure_any`."""
        name = self.first_failure_any
        return hint(name) if name else ""

    def worst_grads(self, n: int = 5) -> list[Row]:
        """The ``n`` parameters with the largest relative gradient difference."""
        def badness(r: Row) -> float:  # a row that could not be compared counts as the worst
            return r.ratio if r.ratio is not None else (-math.inf if r.passed else math.inf)

        return sorted(self.grads, key=badness, reverse=True)[:n]

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``minigpt2 parity --json``): every row, check and verdict."""
        rows = [asdict(r) for r in self.rows]
        out: dict[str, Any] = {
            "passed": self.passed,
            "first_failure": self.first_failure,
            "first_failure_any": self.first_failure_any,
            "last_pass_before_failure": self.last_pass_before_failure if self.first_failure_any else None,
            "hint": self.hint or None,
            "ours": self.ours,
            "reference": self.reference,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "tolerance": self.tolerance,
            "input_shape": self.input_shape,
            "rows": rows,
            "top1": dict(asdict(self.top1), passed=self.top1.passed) if self.top1 else None,
            "loss": dict(asdict(self.loss), passed=self.loss.passed) if self.loss else None,
            "grads": [asdict(r) for r in self.grads] or None,
            "worst_grads": [r.name for r in self.worst_grads()] or None,
            "generation": dict(asdict(self.generation), passed=self.generation.passed) if self.generation else None,
            "missing": self.missing,
            "extra": self.extra,
            "notes": self.notes,
        }
        return _finite(out)

    def table(self, decode: Any = None) -> str:
        """The report as text: the activation table, the checks, the verdict last.

        decode: optional ``fn(token_id) -> str`` to show tokens as text as well as ids.
        """
        tok = (lambda t: f"{t} {decode(t)!r}") if decode else str
        lines = [
            f"ours:      {self.ours}",
            f"reference: {self.reference}",
            f"input:     {' x '.join(map(str, self.input_shape))} tokens",
            f"tolerance: {self.tolerance or f'max|ours - ref| <= {self.rtol:.0e} x max|ref|'}",
            "",
        ]
        per_row = self._limits_vary()
        shown = [r for r in self.rows if r.shown]
        if shown:
            w = max(len("activation"), *(len(r.name) for r in shown))
            limit = f"  {'limit':>9}" if per_row else ""
            lines.append(f"{'activation':<{w}}  {'max|ours-ref|':>13}  {'max|ref|':>10}  {'ratio':>9}{limit}  result")
            for r in shown:
                lines.append(_row_line(r, w, per_row))
        if self.missing:
            lines.append(f"not provided (not compared): {_names(self.missing)}")
        if self.extra:
            lines.append(f"not in the reference (not compared): {_names(self.extra)}")
        if self.top1:
            t = self.top1
            where = ""
            if t.worst_position is not None:
                where = (f", worst at [batch {t.worst_position[0]}, position {t.worst_position[1]}]: ours "
                         f"{tok(t.ours_token)}, reference {tok(t.ref_token)}")
            verdict = ("pass" if t.passed else "FAIL") if t.judged else "(information)"
            lines.append(
                f"top-1 agreement: {t.agreement:.1%} of {t.positions} positions; worst margin "
                f"{t.worst_margin:.4g} logits ({t.worst_margin_rel:.2%} of max|ref logit|){where}  {verdict}"
            )
            if t.judged:
                lines.append(f"  (half precision passes with >= {t.min_agreement:.0%} agreement and every "
                             f"disagreement within {t.max_margin_rel:.0%} of max|ref logit|)")
        if self.loss:
            L = self.loss
            lines.append(f"loss: ours {L.ours:.6f}, reference {L.reference:.6f}, |diff| {L.abs_diff:.3e} "
                         f"(relative {L.rel_diff:.2e})  {'pass' if L.passed else 'FAIL'}")
        if self.grads:
            worst = self.worst_grads()
            failed = sum(not r.passed for r in self.grads)
            lines.append(f"gradients: {len(self.grads)} parameters, {failed} past the tolerance; the "
                         f"{len(worst)} with the largest max|ours-ref| / max|ref|:")
            w = max(len(r.name) for r in worst)
            for r in worst:
                lines.append("  " + _row_line(r, w, per_row))
        if self.generation:
            lines.append(_generation_lines(self.generation, tok))
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append("")
        lines += self.verdict_lines()
        return "\n".join(lines)

    def verdict_lines(self) -> list[str]:
        """The closing lines: PASS, or FAIL with the first failure, where it narrows down, and why."""
        if self.passed:
            tie = " (generation parted at a near-tie)" if self.generation and self.generation.near_tie else ""
            return [f"PASS: everything within tolerance{tie}"]
        first, first_any = self.first_failure, self.first_failure_any
        out = []
        if first is not None:
            out.append(f"FAIL: first past tolerance: {first}{_ratio_text(self._row(first))}")
        elif first_any is not None:
            out.append(f"FAIL: every row of the table passes, but {first_any} does not (--all shows it)")
        if first_any is not None:
            if first_any != first and first is not None:
                out.append(f"  narrowed down over every compared activation: {first_any}{_ratio_text(self._row(first_any))}")
            before = self.last_pass_before_failure or "(none: the very first one fails)"
            out.append(f"  last activation still within tolerance: {before}")
            out.append(f"  look at {self.hint}")
        others = []
        if self.top1 is not None and self.top1.judged and not self.top1.passed and first_any != "logits":
            others.append("top-1 agreement")
        if self.loss is not None and not self.loss.passed:
            others.append("loss")
        bad_grads = [r.name for r in self.grads if not r.passed]
        if bad_grads:
            others.append(f"gradients of {len(bad_grads)} parameters (worst: {self.worst_grads(1)[0].name})")
        if self.generation is not None and not self.generation.passed:
            others.append(f"generation (from step {self.generation.first_diff_step})")
        if not (self.rows or self.grads or self.loss or self.generation):
            others.append("nothing was compared")
        if others:
            out.append(("  also failing: " if out else "FAIL: ") + "; ".join(others))
        return out

    def _limits_vary(self) -> bool:
        return len({r.limit for r in self.rows + self.grads if r.limit is not None}) > 1

    def _row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)


def _ratio_text(r: Row | None) -> str:
    if r is None:
        return ""
    if r.ratio is None:
        return f" ({r.note})"
    limit = f" > limit {r.limit:.2e}" if r.limit is not None and not r.passed and r.ratio > r.limit else ""
    where = f", worst at index {r.worst_index}" if r.worst_index is not None else ""
    return f" (ratio {r.ratio:.2e}{limit}{where}{'; ' + r.note if r.note else ''})"


def _row_line(r: Row, w: int, per_row: bool = False) -> str:
    result = "pass" if r.passed else "FAIL"
    limit = (f"  {r.limit:>9.2e}" if r.limit is not None else f"  {'-':>9}") if per_row else ""
    if r.ratio is None:
        return f"{r.name:<{w}}  {'-':>13}  {'-':>10}  {'-':>9}{limit}  {result}  {r.note}".rstrip()
    ref = f"{r.max_abs_ref:.3e}" if r.max_abs_ref is not None else "-"
    return f"{r.name:<{w}}  {r.max_abs_diff:>13.3e}  {ref:>10}  {r.ratio:>9.2e}{limit}  {result}  {r.note}".rstrip()


def _generation_lines(g: GenerationCheck, tok: Any) -> str:
    if g.first_diff_step is None:
        n = len(g.ours)
        stop = f" (both stopped at EOS after {n})" if n < g.steps else ""
        return f"generation (greedy, {g.steps} tokens): identical{stop}  pass"
    s = g.first_diff_step
    ours = tok(g.ours_token) if g.ours_token is not None else "(stopped)"
    ref = tok(g.ref_token) if g.ref_token is not None else "(stopped)"
    head = f"generation (greedy, {g.steps} tokens): first difference at step {s}: ours {ours}, reference {ref}"
    if g.ref_margin is None:
        return head + "  FAIL"
    detail = (f"\n  at that step the reference prefers its token by {g.ref_margin:.4g} logits (ours prefers its "
              f"own by {g.ours_margin:.4g}); the logits there differ by up to {g.logits_diff:.3g}")
    bound = f"{g.tie_bound:.3g} (how far the logit tolerance lets two logits swap)"
    if g.near_tie:
        return head + detail + f"\n  near-tie: the margin is within {bound}, not a bug  pass"
    return head + detail + f"\n  not a near-tie: the margin exceeds {bound}  FAIL"


def _names(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _finite(x: Any) -> Any:
    """inf / NaN as strings, so the JSON is standard (json.dumps writes Infinity otherwise)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ------------------------------------------------------------------------- comparing
def compare(
    ours: Capture,
    ref: Capture,
    *,
    rtol: float | None = None,
    shown: list[str] | None = None,
    grad: bool = False,
    dtype: torch.dtype | None = None,
    noise: Capture | None = None,
    ours_label: str | None = None,
    reference_label: str | None = None,
) -> ParityReport:
    """Hold ``ours`` against ``ref``, name by name, in the reference's forward order.

    rtol: the tolerance of every row (default: 1e-4; in half precision see ``noise``).
    shown: the activation names the table shows (``logits`` always is); None shows all.
    grad: also compare the loss and every parameter's gradient (both must hold them).
    dtype: the precision ``ours`` computed in (default ``ours.dtype``); half precision
        judges the logits by top-1 agreement instead of a tolerance.
    noise: in half precision without ``rtol``, the reference implementation run in the
        same dtype: each row's limit is HALF_NOISE_FACTOR x its distance from ``ref`` (at
        least HALF_FLOOR); without it, :data:`HALF_RTOL`.
    Raises ValueError when the two were run on different input ids.
    """
    dtype = dtype if dtype is not None else ours.dtype
    half = is_half(dtype)
    adaptive = half and rtol is None and noise is not None
    rtol = default_rtol(dtype) if rtol is None else rtol
    noise_values = noise.values() if adaptive else {}

    def limit(r: torch.Tensor, noise_t: torch.Tensor | None) -> float:
        return noise_limit(noise_t, r, dtype, rtol) if adaptive else rtol

    if ours.input_ids is not None and ref.input_ids is not None:
        a, b = ours.input_ids, ref.input_ids
        if a.dim() == 1:
            a = a[None]
        if a.shape != b.shape or not torch.equal(a.long(), b.long()):
            raise ValueError(
                f"the two were run on different input ids (shape {list(a.shape)} vs reference {list(b.shape)}"
                + (")" if a.shape != b.shape else f", first difference at {_first_diff(a.long(), b.long())})")
            )
    ref_values, our_values = ref.values(), ours.values()
    show = None if shown is None else set(shown) | {"logits"}
    rows: list[Row] = []
    missing: list[str] = []
    for name, r in ref_values.items():
        if name not in our_values:
            missing.append(name)
            continue
        kind = "logits" if name == "logits" else "activation"
        row = compare_tensors(name, our_values[name], r, limit(r, noise_values.get(name)), kind)
        row.shown = show is None or name in show
        rows.append(row)
    extra = [n for n in our_values if n not in ref_values]

    top1 = None
    if ours.logits is not None and ref.logits is not None:
        logits_row = next(r for r in rows if r.name == "logits")
        if logits_row.ratio is not None:
            top1 = top1_check(_with_batch(ours.logits, ref.logits), ref.logits, judged=half)
            if half:  # the float32 tolerance cannot hold: the top-1 check decides this row
                logits_row.passed = top1.passed and math.isfinite(logits_row.ratio)
                logits_row.note = "judged by top-1 agreement"

    loss, grads = None, []
    if grad:
        if ours.loss is not None and ref.loss is not None:
            noise_loss = noise.loss.reshape(1) if adaptive and noise.loss is not None else None
            loss = loss_check(ours.loss, ref.loss, limit(ref.loss.reshape(1), noise_loss))
        noise_grads = noise.grads if adaptive else {}
        for name, g in ref.grads.items():
            if name in ours.grads:
                grads.append(compare_tensors(name, ours.grads[name], g, limit(g, noise_grads.get(name)), "grad"))
            else:
                grads.append(Row(name, "grad", None, None, None, False, rtol, note="no gradient from ours"))
        for name in ours.grads:
            if name not in ref.grads:
                extra.append(f"grad of {name}")

    dtype_name = str(dtype).removeprefix("torch.")
    if adaptive:
        tolerance = (f"per row, {HALF_NOISE_FACTOR:g} x the distance of transformers' own {dtype_name} model from "
                     f"float32 (at least {HALF_FLOOR[dtype]:.1e}); logits judged by top-1 agreement")
    elif half:
        tolerance = f"max|ours - ref| <= {rtol:.0e} x max|ref| ({dtype_name}); logits judged by top-1 agreement"
    else:
        tolerance = f"max|ours - ref| <= {rtol:.0e} x max|ref|"
    return ParityReport(
        ours=ours_label or ours.source,
        reference=reference_label or ref.source,
        dtype=dtype_name if dtype is not None else "unknown",
        rtol=rtol,
        tolerance=tolerance,
        input_shape=list(ref.input_ids.shape) if ref.input_ids is not None else [],
        rows=rows,
        top1=top1,
        loss=loss,
        grads=grads,
        missing=missing,
        extra=extra,
    )


def _with_batch(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ours[None] if ours.dim() == ref.dim() - 1 else ours


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    idx = (a != b).nonzero()
    return idx[0].tolist() if len(idx) else []
