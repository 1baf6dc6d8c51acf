"""One forward pass, every named activation: minigpt2's and transformers' onto the same names.

minigpt2 names its intermediates itself (``run_with_cache``). transformers'
``GPT2LMHeadModel`` does not, so :func:`capture_transformers` reads them with PyTorch forward
hooks on the modules that produce them, in minigpt2's layout:

============================  ==============================================================
minigpt2 name                 where it is read in transformers' GPT2LMHeadModel
============================  ==============================================================
``embed``                     output of ``transformer.drop`` (wte(ids) + wpe(positions))
``h.N.resid_pre``             input of ``transformer.h.N``
``h.N.ln_1``                  output of ``transformer.h.N.ln_1``
``h.N.attn.q`` / ``k`` / ``v``  output of ``transformer.h.N.attn.c_attn`` [B, T, 3C], split
                              into three [B, T, C] and each viewed [B, T, nh, hs] then
                              transposed to [B, nh, T, hs] (as GPT2Attention does)
``h.N.attn.pattern``          ``output_attentions=True`` under eager attention: the softmax
                              weights [B, nh, T, T]
``h.N.attn.out``              first output of ``transformer.h.N.attn`` (after c_proj)
``h.N.resid_mid``             input of ``transformer.h.N.ln_2`` (the stream after attention)
``h.N.ln_2``                  output of ``transformer.h.N.ln_2``
``h.N.mlp.act``               input of ``transformer.h.N.mlp.c_proj`` (after the activation)
``h.N.mlp.out``               output of ``transformer.h.N.mlp``
``h.N.resid_post``            output of ``transformer.h.N``
``ln_f``                      output of ``transformer.ln_f``
``logits``                    ``.logits``
============================  ==============================================================

Reading inputs and outputs of the modules (not ``output_hidden_states``, whose last entry
is ln_f's output in some versions and the last block's in others) keeps the mapping the
same across transformers 4.40 to 5.x.

Loss and gradients: each library's own loss (minigpt2's ``model.loss``, transformers'
``labels=``) on labels = input_ids, shifted inside, so position t is scored against token
t + 1 and the last position is not scored; the gradients are ``torch.autograd.grad`` of that
loss, so nobody's ``.grad`` is touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..model import GPT2

#: What to install when transformers is missing.
PARITY_EXTRA = 'pip install "minigpt2[parity]"'


def require_transformers(what: str = "the reference") -> Any:
    """The ``transformers`` module, or an ImportError that says what to install."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{what} needs transformers: {PARITY_EXTRA}") from None
    return transformers


@dataclass
class Capture:
    """The outputs of one forward (and optionally backward) pass, by minigpt2's names.

    input_ids: [B, T] int64, the tokens that were run.
    activations: name -> tensor [B, ...] in forward order (see ``model.activation_names()``),
        in the dtype the model computed them in; ``logits`` is not among them.
    logits: [B, T, V] (float32 from minigpt2 and transformers; a dump may hold any dtype).
    targets: [B, T] int64, the token each position is scored against, -100 = not scored.
    loss: 0-dim float32, the mean cross-entropy over positions whose target is not -100.
    grads: parameter name (transformers' names) -> d loss / d parameter, shaped as it.
    dtype: the dtype of the weights that computed it (None: unknown, e.g. a foreign dump).
    source: who computed it, for the report ("minigpt2 0.1.0", "transformers 5.24.0", a file).
    Every tensor is detached and on the CPU.
    """

    input_ids: torch.Tensor | None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    source: str = ""

    def values(self) -> dict[str, torch.Tensor]:
        """Activations then ``logits``: everything the activation table compares, in order."""
        out = dict(self.activations)
        if self.logits is not None:
            out["logits"] = self.logits
        return out


def shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = input_ids[:, t + 1]; the last position has none (-100).

    The targets transformers' ``labels=input_ids`` (and minigpt2's ``model.loss``) use.
    """
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T] (-100 ignored), float32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1), ignore_index=-100
    )


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _grads(loss: torch.Tensor, named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """d loss / d p for every parameter that takes part, by name, without touching ``.grad``."""
    named = [(n, p) for n, p in named if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: _cpu(g) if g is not None else torch.zeros(p.shape, dtype=p.dtype) for (n, p), g in zip(named, grads)}


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration, the caller's train/eval mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_ids(input_ids: Any, vocab_size: int | None = None, n_positions: int | None = None) -> torch.Tensor:
    """input_ids as int64 [B, T]; ValueError for anything a GPT-2 cannot run (a bare
    IndexError from the embedding is what transformers would raise)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {got}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be [batch, seq] and not empty, got shape {tuple(input_ids.shape)}")
    if vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    if n_positions is not None and input_ids.shape[1] > n_positions:
        raise ValueError(f"input of {input_ids.shape[1]} tokens exceeds n_positions={n_positions}")
    return input_ids.long()


# ------------------------------------------------------------------------------ minigpt2
def capture_minigpt2(
    model: GPT2,
    input_ids: torch.Tensor,
    *,
    patterns: bool = True,
    grad: bool = False,
    targets: torch.Tensor | None = None,
) -> Capture:
    """Run minigpt2 once and record every named activation, the logits and the loss.

    model: a ``minigpt2.GPT2`` in any dtype; it runs in eval mode (its mode is restored).
    input_ids: [B, T] token ids (a 1-D tensor is one row).
    patterns: also record ``h.N.attn.pattern`` [B, nh, T, T] (the explicit attention path;
        the others come from the usual SDPA path).
    grad: also run the backward pass: ``loss`` and ``grads`` for every parameter.
    targets: [B, T] tokens to score each position against (-100 = skip); default
        ``shifted_targets(input_ids)``, scored by ``model.loss`` itself.
    Raises ValueError for ids the model cannot run (outside the vocabulary, too long).
    """
    from .. import __version__

    input_ids = _check_ids(input_ids, model.config.vocab_size, model.config.n_positions)
    default_targets = targets is None
    targets = shifted_targets(input_ids) if default_targets else _check_ids(targets)
    if targets.shape != input_ids.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
    names = [n for n in model.activation_names() if patterns or not n.endswith(".attn.pattern")]
    ids = input_ids.to(model.device)
    with _eval_mode(model):
        logits, acts = model.run_with_cache(ids, names=names)
        grads: dict[str, torch.Tensor] = {}
        if grad:
            with torch.enable_grad():
                if default_targets:
                    loss = model.loss(ids)  # the library's own loss: labels shifted inside
                else:
                    loss = loss_from_logits(model(ids), targets)
                grads = _grads(loss, list(model.named_parameters()))
        else:
            loss = loss_from_logits(logits, targets)
    return Capture(
        input_ids=_cpu(input_ids),
        activations={n: _cpu(t) for n, t in acts.items()},
        logits=_cpu(logits),
        targets=_cpu(targets),
        loss=_cpu(loss).float(),
        grads=grads,
        dtype=model.dtype,
        source=f"minigpt2 {__version__}",
    )


# --------------------------------------------------------------------------- transformers
@contextlib.contextmanager
def _eager_attention(hf: Any) -> Iterator[None]:
    """Eager attention for the duration: the only implementation that returns the softmax
    weights (SDPA returns none). The model's own choice is restored after."""
    config = hf.config
    before = getattr(config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    setter = getattr(hf, "set_attn_implementation", None)
    try:
        if callable(setter):
            setter("eager")
        else:  # transformers 4.x reads the config at every forward
            config._attn_implementation = "eager"
        yield
    finally:
        if callable(setter) and before is not None:
            setter(before)
        else:
            config._attn_implementation = before


def _first(x: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first of a tuple (transformers 4.x)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def capture_transformers(
    hf: Any,
    input_ids: torch.Tensor,
    *,
    patterns: bool = True,
    grad: bool = False,
    targets: torch.Tensor | None = None,
) -> Capture:
    """Run transformers' GPT2LMHeadModel once and record its activations by minigpt2's names.

    hf: a ``transformers.GPT2LMHeadModel``; it runs in eval mode, with eager attention when
        ``patterns`` (its mode and attention implementation are restored after).
    input_ids, patterns, grad, targets: as :func:`capture_minigpt2`; the default targets are
        scored by transformers' own ``labels=input_ids`` loss.
    The module-to-name mapping is in this module's docstring.
    """
    transformers = require_transformers("capture_transformers")
    c = hf.config
    input_ids = _check_ids(input_ids, c.vocab_size, c.n_positions)
    default_targets = targets is None
    targets = shifted_targets(input_ids) if default_targets else _check_ids(targets)
    n_head, n_embd = c.n_head, c.n_embd
    hs = n_embd // n_head
    store: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, t: torch.Tensor) -> None:
        store[name] = t.detach().clone()

    def output_hook(name: str):  # noqa: ANN202 - a torch forward hook
        return lambda module, args, out: keep(name, _first(out))

    def input_hook(name: str):  # noqa: ANN202 - a torch forward pre-hook
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            keep(name, args[0] if args else kwargs["hidden_states"])

        return hook

    def qkv_hook(prefix: str):  # noqa: ANN202
        def hook(module: Any, args: tuple, out: torch.Tensor) -> None:
            B, T, _ = out.shape
            for part, t in zip("qkv", out.split(n_embd, dim=2)):  # 3 x (B, T, C)
                keep(f"{prefix}.attn.{part}", t.view(B, T, n_head, hs).transpose(1, 2))  # (B, nh, T, hs)

        return hook

    t = hf.transformer
    try:
        handles.append(t.drop.register_forward_hook(output_hook("embed")))
        for i, block in enumerate(t.h):
            p = f"h.{i}"
            handles.append(block.register_forward_pre_hook(input_hook(f"{p}.resid_pre"), with_kwargs=True))
            handles.append(block.ln_1.register_forward_hook(output_hook(f"{p}.ln_1")))
            handles.append(block.attn.c_attn.register_forward_hook(qkv_hook(p)))
            handles.append(block.attn.register_forward_hook(output_hook(f"{p}.attn.out")))
            handles.append(block.ln_2.register_forward_pre_hook(input_hook(f"{p}.resid_mid"), with_kwargs=True))
            handles.append(block.ln_2.register_forward_hook(output_hook(f"{p}.ln_2")))
            handles.append(block.mlp.c_proj.register_forward_pre_hook(input_hook(f"{p}.mlp.act"), with_kwargs=True))
            handles.append(block.mlp.register_forward_hook(output_hook(f"{p}.mlp.out")))
            handles.append(block.register_forward_hook(output_hook(f"{p}.resid_post")))
        handles.append(t.ln_f.register_forward_hook(output_hook("ln_f")))

        device = next(hf.parameters()).device
        ids = input_ids.to(device)
        kwargs: dict[str, Any] = {"output_attentions": True} if patterns else {}
        if grad and default_targets:
            kwargs["labels"] = ids
        attention = _eager_attention(hf) if patterns else contextlib.nullcontext()
        with _eval_mode(hf), attention, torch.set_grad_enabled(grad):
            out = hf(ids, use_cache=False, **kwargs)
            logits = out.logits
            loss = out.loss if grad and default_targets else loss_from_logits(logits, targets)
            grads = _grads(loss, list(hf.named_parameters())) if grad else {}
    finally:
        for h in handles:
            h.remove()

    if patterns:
        attentions = out.attentions
        if attentions is None or len(attentions) != len(t.h) or any(a is None for a in attentions):
            raise RuntimeError("transformers returned no attention weights under eager attention")
        for i, a in enumerate(attentions):
            store[f"h.{i}.attn.pattern"] = a.detach()
    order = _names(len(t.h), patterns)
    return Capture(
        input_ids=_cpu(input_ids),
        activations={n: _cpu(store[n]) for n in order if n in store},
        logits=_cpu(logits).float(),
        targets=_cpu(targets),
        loss=_cpu(loss).float(),
        grads=grads,
        dtype=next(hf.parameters()).dtype,
        source=f"transformers {transformers.__version__}",
    )


def _names(n_layer: int, patterns: bool = True) -> list[str]:
    """minigpt2's activation names for ``n_layer`` blocks, in forward order."""
    from ..config import GPT2Config
    from ..model import GPT2

    if n_layer == 0:
        return ["embed", "ln_f"]
    with torch.device("meta"):  # names only: no memory
        model = GPT2(GPT2Config(vocab_size=1, n_positions=1, n_embd=1, n_head=1, n_layer=n_layer))
    return [n for n in model.activation_names() if patterns or not n.endswith(".attn.pattern")]


def activation_names(n_layer: int) -> list[str]:
    """Every activation name of an ``n_layer``-block GPT-2, in forward order (patterns included)."""
    return _names(n_layer)


def default_names(n_layer: int) -> list[str]:
    """The rows ``minigpt2 parity`` shows without ``--all``: ``embed``, each block's
    ``resid_mid`` and ``resid_post``, ``ln_f`` (``logits`` follows them)."""
    out = ["embed"]
    for i in range(n_layer):
        out += [f"h.{i}.resid_mid", f"h.{i}.resid_post"]
    return out + ["ln_f"]


# ------------------------------------------------------------------------------ loading
def load_transformers(
    name_or_path: str | os.PathLike[str], *, device: torch.device | str | None = None, revision: str | None = None
) -> Any:
    """transformers' GPT2LMHeadModel of a checkpoint, float32, eval mode, eager attention.

    The files are found as minigpt2 finds them (a local directory, or a Hub repo id through
    minigpt2's Hub cache), so both libraries read the very same files and a Hub checkpoint is
    downloaded once. Raises ImportError without transformers, FileNotFoundError /
    ValueError for a checkpoint that is missing or that transformers cannot load.
    """
    transformers = require_transformers("the transformers reference")
    from ..loading import resolve_checkpoint, resolve_device

    config_file, _ = resolve_checkpoint(name_or_path, revision)
    directory = config_file.parent
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(
            directory, attn_implementation="eager", local_files_only=True, **dtype_kw
        )
    except Exception as e:  # transformers raises many types (OSError, KeyError, ...): one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"transformers could not load {os.fspath(name_or_path)}: {first}") from None
    return hf.to(resolve_device(device)).eval()


def transformers_from_model(model: GPT2) -> Any:
    """transformers' GPT2LMHeadModel holding ``model``'s config and weights, in float32
    (a half-precision model's weights are upcast exactly), on the model's device, eval mode."""
    transformers = require_transformers("compare_to_transformers")
    fields = {k: v for k, v in model.config.to_dict().items() if k != "architectures"}
    # A head untied in memory (lm_head given its own tensor) stays untied in the copy.
    fields["tie_word_embeddings"] = model.lm_head.weight is model.transformer.wte.weight
    config = transformers.GPT2Config(**fields)
    hf = transformers.GPT2LMHeadModel(config).float()  # float32 whatever dtype the config names
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)  # a tied lm_head.weight is wte on both sides
    missing = [n for n, _ in hf.named_parameters() if n not in state]
    if missing:
        raise ValueError(f"the model has no weights for transformers' {', '.join(missing)}")
    return hf.to(model.device).eval()
