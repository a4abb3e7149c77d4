"""Attaching interventions to a base model, and leaving it as it was.

:func:`build_slots` resolves a config's entries to sites on the model and builds one intervention per
site (and per first/last part of an untied entry), or one per ``tie`` group: that module then sits under the
key of every site it serves (:func:`tied_keys`), so ``parameters()`` and the optimizer see it once and its
gradient sums every site's. :class:`BaseState` is the base model's own
``requires_grad`` flags and per-submodule train/eval mode, recorded when the first ``ReftModel``
attaches and restored when the last one detaches: several may share one base (activation patching,
layer sweeps, expert libraries), and a second attach must not take the first one's frozen flags for
the base's own.
"""
from __future__ import annotations

import re
import weakref

import torch
from torch import nn

from reftkit.interventions import InterventionError

from .anatomy import StructureError, find_layers, is_encoder_decoder, max_positions, num_layers, stack_root
from .config import ConfigError, ReftConfig, RepresentationConfig
from .hooks import Slot
from .positions import PositionSpec, split_untied
from .structure import Site, resolve_site

__all__ = ["BaseState", "base_device", "base_state", "build_slots", "check_quantized", "hold_base", "intervention_key",
           "is_quantized", "release_base", "restore_base", "tied_keys"]


def intervention_key(layer: int | None, component: str) -> str:
    """The key of an intervention in ``ReftModel.interventions``: ``layer3_block_output``."""
    name = re.sub(r"[^0-9A-Za-z]+", "_", component).strip("_")
    return name if layer is None else f"layer{layer}_{name}"


def tied_keys(interventions: nn.ModuleDict) -> dict[str, str]:
    """``{key: first key}`` for every key whose module is also under an earlier key (a tie): the set is saved,
    counted and trained once, under its first key."""
    first: dict[int, str] = {}
    return {key: first[id(iv)] for key, iv in interventions.items() if first.setdefault(id(iv), key) != key}


def base_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def check_stack(rep: RepresentationConfig, model: nn.Module, index: int) -> None:
    """Refuse ``stack`` on a decoder-only model, and its absence on an encoder-decoder one (T5, BART ...): which
    stack an entry is in is never guessed."""
    try:
        stack_root(model, rep.stack)
    except StructureError as err:
        if rep.stack is None and is_encoder_decoder(model):
            raise ConfigError(f"representations[{index}].stack is missing: {type(model).__name__} is an "
                              "encoder-decoder model; give stack='encoder' or stack='decoder'") from None
        raise ConfigError(f"representations[{index}].{err}") from None


def layers_in(rep: RepresentationConfig, model: nn.Module, index: int) -> list[int]:
    """The entry's layers for ``model`` as given (negative ones count back; ``resolve_site`` range-checks
    them), after refusing a list that names one layer twice once negatives are resolved (``[3, -1]`` of 4)."""
    where = f"representations[{index}].layer"
    if rep.layer == "all":
        try:
            return list(range(num_layers(model, rep.stack)))
        except StructureError as err:
            raise ConfigError(f"{where}='all': {err}; list the layers instead") from None
    layers = [rep.layer] if isinstance(rep.layer, int) else list(rep.layer)
    if len(layers) > 1 and any(layer < 0 for layer in layers):
        try:
            n = num_layers(model, rep.stack)
        except StructureError:  # no layer stack (a raw path on an unknown model): negatives are refused there
            return layers
        seen: dict[int, int] = {}
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if idx in seen and 0 <= idx < n:
                raise ConfigError(f"{where}={rep.layer!r} names layer {idx} twice ({seen[idx]} and {layer} on this "
                                  f"{type(model).__name__} of {n} layers); list each layer once")
            seen[idx] = layer
    return layers


def check_positions_fit(rep: RepresentationConfig, model: nn.Module, index: int) -> None:
    """Refuse a count beyond the longest sequence ``model`` reads (its ``max_position_embeddings``...)."""
    spec, bound = rep.position_spec, max_positions(model)
    if spec is None or spec.every or bound is None:
        return
    name, limit = bound
    too_many = [f"{kind}{n}" for kind, n in (("f", spec.first), ("l", spec.last)) if n > limit]
    if too_many:
        raise ConfigError(
            f"representations[{index}].positions={rep.positions!r}: {too_many[0]} asks for more tokens than this "
            f"{type(model).__name__} reads ({name}={limit}); give at most {limit} per term, or positions='all'")


def build_slots(model: nn.Module, config: ReftConfig, interventions: nn.ModuleDict
                ) -> tuple[list[Slot], list[PositionSpec | None], list[str | None]]:
    """Resolve every entry of ``config`` on ``model``, add its interventions to ``interventions`` (float32, on
    the model's device) and return the slots with each one's positions and task. Raises ``ConfigError`` naming
    the entry before anything is hooked."""
    device = base_device(model)
    device = torch.device("cpu") if device.type == "meta" else device
    slots: list[Slot] = []
    specs: list[PositionSpec | None] = []
    tasks: list[str | None] = []
    #: tie group -> (its intervention, the entry and the site that built it); and how many sites it serves
    tied: dict[tuple, tuple[nn.Module, int, Site]] = {}
    served: dict[tuple, int] = {}
    for i, rep in enumerate(config.representations):
        spec = rep.position_spec
        group = rep.tie_group(i)
        split = None if rep.share_weights or spec is None else split_untied(spec)
        parts = [("", spec)] if split is None else [("_first", split[0]), ("_last", split[1])]
        check_stack(rep, model, i)
        check_positions_fit(rep, model, i)
        for layer in layers_in(rep, model, i):
            try:
                site = resolve_site(model, layer, rep.component, rep.heads, rep.stack)
            except StructureError as err:
                raise ConfigError(f"representations[{i}]: {err}") from None
            for suffix, part_spec in parts:
                stem = intervention_key(site.layer, rep.component)
                key, n = stem + suffix, 2
                while key in interventions:
                    key, n = f"{stem}{suffix}_{n}", n + 1
                if group in tied:
                    iv, j, site_j = tied[group]
                    if site.width != site_j.width:
                        raise ConfigError(
                            f"representations[{i}].tie={rep.tie!r}: component={rep.component!r} at layer {site.layer} "
                            f"has width {site.width}, but the intervention it shares was built for width "
                            f"{site_j.width} (representations[{j}], component={site_j.component!r} at layer "
                            f"{site_j.layer}); tied sites must have the same width")
                else:
                    iv = rep.make_intervention()
                    try:
                        iv.materialize(site.width)
                    except InterventionError as err:
                        raise ConfigError(f"representations[{i}] at layer {site.layer}: {err}") from None
                    if group is not None:
                        tied[group] = (iv, i, site)
                served[group] = served.get(group, 0) + 1
                interventions[key] = iv.to(device=device, dtype=torch.float32)
                slots.append(Slot(index=len(slots), key=key, intervention=iv, site=site,
                                  every_token=part_spec is not None and part_spec.every, source=rep.source,
                                  task=rep.task))
                specs.append(part_spec)
                tasks.append(rep.task)
    for group, (_, j, _) in tied.items():
        if served[group] == 1:  # a name or "all" that came to one site on this model
            raise ConfigError(f"representations[{j}].tie={config.representations[j].tie!r} ties one site only (layer="
                              f"{config.representations[j].layer!r} on this {type(model).__name__}): nothing to share")
    if any(p.requires_grad for p in interventions.parameters()):
        check_quantized(model, slots)
    return slots, specs, tasks


# ----------------------------------------------------------------------------- quantized bases

#: bitsandbytes' quantized linear classes, matched by name so bitsandbytes is never imported for the check
_BNB_LINEARS = ("Linear4bit", "LinearFP4", "LinearNF4", "Linear8bitLt")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds a quantized weight directly: a torchao tensor subclass, an integer-typed weight,
    or a bitsandbytes quantized linear class. Embeddings are not counted: their input is token ids, below any
    intervention."""
    if isinstance(module, nn.Embedding):
        return False
    if type(module).__name__ in _BNB_LINEARS or type(module).__module__.startswith("bitsandbytes"):
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return type(weight).__module__.startswith(("torchao", "bitsandbytes")) or not (
        weight.is_floating_point() or weight.is_complex())


def _above(model: nn.Module, slots: list[Slot]) -> list[tuple[str, nn.Module]]:
    """The modules gradients may pass through on their way to an intervention: all but those inside the decoder
    layers below the lowest intervened one (conservative within that layer: its parts below the site count)."""
    layers = [s.site.layer for s in slots]
    lowest = 0 if any(layer is None for layer in layers) else min(layers, default=0)
    try:
        stack_path, stack = find_layers(model)
    except StructureError:
        stack_path, stack = "", []
    below = {f"{stack_path}.{i}" if stack_path else str(i) for i in range(min(lowest, len(stack)))}
    out = []
    for path, module in model.named_modules():
        if not any(path == b or path.startswith(b + ".") for b in below):
            out.append((path, module))
    return out


def _probe(module: nn.Module) -> str | None:
    """Why gradients through ``module`` would not be exact, or ``None`` when they are.

    A frozen weight-quantized linear layer is affine in its input, so its exact input gradient satisfies
    ``<grad_x, v> == <r, f(v) - f(0)>`` for an upstream gradient ``r`` and any direction ``v``; this checks that
    identity on random rows against the layer's own forward (no dequantization: it holds for any backend). A
    backward that is missing, zero or detached fails it, and so does a layer that quantizes its activations (its
    forward is not affine, and its autograd gradient is not the gradient of what it computes)."""
    width = getattr(module, "in_features", None)
    weight = getattr(module, "weight", None)
    if width is None and isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor):
        width = weight.shape[-1]
    if not isinstance(width, int):
        return "reftkit cannot tell its input width (no in_features), so it cannot check its gradient"
    dtype = getattr(module, "compute_dtype", None) or (weight.dtype if isinstance(weight, torch.Tensor) else None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x, v = (torch.randn(2, width, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    try:
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            y = module.forward(xg)  # not __call__: another ReftModel's hooks on it are no concern here
            if not isinstance(y, torch.Tensor) or not y.requires_grad:
                return "its output is detached from its input (no autograd path)"
            r = torch.randn(y.shape, generator=gen).to(device=device, dtype=y.dtype)
            (grad,) = torch.autograd.grad(y, xg, r, allow_unused=True)
        if grad is None:
            return "its output has no gradient with respect to its input"
        with torch.no_grad():
            change = (module.forward(v) - module.forward(torch.zeros_like(v))).double()
    except Exception as err:  # noqa: BLE001 - any failure of the probe means reftkit cannot vouch for the gradient
        return f"probing its gradient failed ({type(err).__name__}: {err})"
    got = (grad.double() * v.double()).sum()
    want = (r.double() * change).sum()
    scale = (r.double() * change).abs().sum()
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    if not bool(torch.isfinite(got)) or not bool(torch.isfinite(want)) or abs(float(got - want)) > tol * float(scale):
        return (f"its input gradient is not the gradient of its forward (<grad, v> = {float(got):.6g}, the forward's "
                f"own change gives {float(want):.6g}); an activation-quantizing or non-differentiable kernel does that")
    return None


def check_quantized(model: nn.Module, slots: list[Slot]) -> None:
    """Refuse, at attach time, a quantized layer that gradients must pass through but cannot exactly.

    Weight-only quantized linear layers whose forward is differentiable in its input (torchao's int8 weight-only
    ``Int8Tensor`` and ``IntxUnpackedToInt8Tensor``; bitsandbytes' 4-/8-bit linears, whose matmul functions define
    the input gradient) pass as they are: the base stays frozen, so no weight gradient is needed. Each distinct
    (layer class, weight class, dtype) is probed once by ``_probe``. Layers below the lowest intervened layer
    are not checked: no gradient reaches them. A meta-device model is not probed (it cannot run)."""
    verdicts: dict[tuple, str | None] = {}
    for path, module in _above(model, slots):
        if not is_quantized(module):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
            continue
        act = getattr(weight, "act_quant_kwargs", None)
        key = (type(module), type(weight), getattr(weight, "dtype", None), type(act), repr(act))
        if key not in verdicts:
            verdicts[key] = _probe(module)
        why = verdicts[key]
        if why is not None:
            raise StructureError(
                f"quantized layer {path!r} ({type(module).__name__}, weight type {type(weight).__name__}) is at or "
                "above the lowest intervened layer, so gradients may need to pass through it, and reftkit cannot "
                f"pass them through it exactly: {why}. "
                "Quantize with a weight-only scheme (torchao Int8WeightOnlyConfig / IntxWeightOnlyConfig, "
                "bitsandbytes 4-bit or 8-bit), leave this layer unquantized (torchao quantize_(..., filter_fn=...)), "
                "or intervene above it")


class BaseState:
    """A base model's own ``requires_grad`` flags and per-submodule ``training`` flags, recorded when the first
    ``ReftModel`` attaches to it and restored when the last one attached detaches (or a failed attach undoes)."""

    def __init__(self, model: nn.Module) -> None:
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = {name: m.training for name, m in model.named_modules()}
        #: the ReftModels attached now; weak, so one dropped without detach() does not pin the base frozen
        self.owners = weakref.WeakSet()

    def restore(self, model: nn.Module) -> None:
        restore_base(model, self.requires_grad, self.training)


def restore_base(model: nn.Module, requires_grad: dict[str, bool], training: dict[str, bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))
    for name, module in model.named_modules():
        module.training = training.get(name, module.training)


#: base model -> its state before the first of the ReftModels attached to it now
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, BaseState]" = weakref.WeakKeyDictionary()


def base_state(model: nn.Module) -> tuple[BaseState, bool]:
    """The recorded state of ``model``, and whether this is the first attach (then nothing is recorded yet)."""
    state = _ATTACHED.get(model)
    return (BaseState(model), True) if state is None else (state, False)


def hold_base(model: nn.Module, state: BaseState, owner: nn.Module) -> None:
    """Record that ``owner`` is attached to ``model`` (after its attach succeeded)."""
    _ATTACHED[model] = state
    state.owners.add(owner)


def release_base(model: nn.Module, owner: nn.Module, requires_grad: dict[str, bool],
                 training: dict[str, bool]) -> None:
    """``owner`` detached: restore the base when no other ReftModel holds it. ``requires_grad``/``training``
    are the owner's own copy of the record, for a deep copy whose base is a new object not in the registry."""
    state = _ATTACHED.get(model)
    if state is None:
        restore_base(model, requires_grad, training)
        return
    state.owners.discard(owner)
    if not state.owners:
        state.restore(model)
        _ATTACHED.pop(model, None)
