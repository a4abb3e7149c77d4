"""Singular Value Fine-tuning (SVF) — Sun, Cetin & Tang 2025, "Transformer²: Self-adaptive LLMs", §3.1.

Each chosen weight ``W = U diag(σ) Vᵀ`` (thin SVD, computed once) is replaced by

    W' = U diag(σ ⊙ m(z)) Vᵀ · (Σᵢ σᵢ / Σᵢ σᵢ m(z)ᵢ)

with one trainable vector ``z`` (``min(out, in)`` entries) per matrix. The trailing factor is the
released code's renormalisation (``compose_new_params`` in SakanaAI/self-adaptive-llms): it keeps the
sum of the singular values, so a uniform ``m`` gives back ``W`` exactly.

``m`` is the parametrisation of ``z``:

* ``"identity"`` (default): ``m(z) = z``, initialised to 1 — the paper's "scale each singular value";
  at initialisation the model is unchanged.
* ``"sigmoid"``: ``m(z) = max_mult · sigmoid(z)``, ``z`` initialised to ``init_val + 0.01·N(0, 1)`` — the
  released code's policy (``init_val = 0.1``, ``max_mult = 1``); the near-uniform start is (nearly)
  the identity thanks to the renormalisation.

The released code adapts every MLP matrix (parameter names containing ``"mlp"``); that is the default
here too (``target_modules="mlp"``), and any list of module-name suffixes or ``"all-linear"`` may be chosen.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

SVF_CONFIG_NAME = "svf_config.json"
SVF_WEIGHTS_NAME = "svf.safetensors"
PARAMETRIZATIONS = ("identity", "sigmoid")


class SVFLinear(nn.Module):
    """An ``nn.Linear`` whose weight is recomposed from its SVD with scaled singular values.

    The original layer is kept (frozen, as ``base``) so the adaptation can be bypassed or removed; the
    bias is the base layer's, untouched."""

    def __init__(self, base: nn.Linear, parametrization: str = "identity", init_val: float | None = None,
                 max_mult: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization={parametrization!r}; choose one of {PARAMETRIZATIONS}")
        self.base = base
        self.parametrization = parametrization
        self.max_mult = float(max_mult)
        weight = base.weight.detach()
        # float64 on CPU keeps U·diag(σ)·Vᵀ == W to ~1e-15; stored as float32 (the weight's own dtype
        # is used in the forward).
        work = torch.float64 if weight.device.type == "cpu" else torch.float32
        u, s, vh = torch.linalg.svd(weight.to(work), full_matrices=False)
        self.register_buffer("U", u.float(), persistent=False)
        self.register_buffer("S", s.float(), persistent=False)
        self.register_buffer("Vh", vh.float(), persistent=False)
        if parametrization == "identity":
            start = torch.full_like(self.S, 1.0 if init_val is None else float(init_val))
        else:
            noise = torch.randn(self.S.shape, generator=generator, dtype=torch.float32).to(self.S.device)
            start = noise * 0.01 + (0.1 if init_val is None else float(init_val))
        self.z = nn.Parameter(start)
        self.enabled = True
        self._cache: tuple[int, torch.dtype, torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def mask(self) -> torch.Tensor:
        """``m(z)``: the factors multiplying the singular values (before renormalisation)."""
        if self.parametrization == "sigmoid":
            return torch.sigmoid(self.z) * self.max_mult
        return self.z

    def composed_weight(self) -> torch.Tensor:
        """``U diag(σ ⊙ m) Vᵀ · Σσ / Σ(σ ⊙ m)`` in float32."""
        scaled = self.S * self.mask()
        return (self.U * (scaled * (self.S.sum() / scaled.sum()))) @ self.Vh

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        if torch.is_grad_enabled() and self.z.requires_grad:
            self._cache = None
            return self.composed_weight().to(dtype)
        # Generation runs many small forwards with z fixed: recompose once per (z version, dtype).
        key = (self.z._version, dtype)
        if self._cache is None or self._cache[:2] != key:
            self._cache = (*key, self.composed_weight().to(dtype))
        return self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return F.linear(x, self._weight(x.dtype), self.base.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.S.numel()}, "
                f"parametrization={self.parametrization!r}")


def _matches(name: str, module: nn.Module, targets: str | Sequence[str]) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        # "mlp" (the released code's choice) or any regular expression over the full module name
        return re.search(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def apply_svf(model: nn.Module, target_modules: str | Sequence[str] = "mlp", parametrization: str = "identity",
              init_val: float | None = None, max_mult: float = 1.0, seed: int = 0) -> dict[str, SVFLinear]:
    """Replace the matching ``nn.Linear`` modules of ``model`` by :class:`SVFLinear` (in place) and
    freeze everything else. ``target_modules``: ``"mlp"`` (default, as the released code), a regular
    expression over module names, ``"all-linear"`` (every linear but the output head), or a list of
    name suffixes such as ``["q_proj", "v_proj"]``. Returns ``{module name: SVFLinear}``."""
    head = _output_head(model)
    chosen = [(name, module) for name, module in model.named_modules()
              if module is not head and _matches(name, module, target_modules)]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear of {type(model).__name__}; "
                         f"its linear layers are named {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped: dict[str, SVFLinear] = {}
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        svf = SVFLinear(module, parametrization, init_val, max_mult, generator)
        setattr(parent, child, svf)
        wrapped[name] = svf
    return wrapped


def svf_modules(model: nn.Module) -> dict[str, SVFLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVFLinear)}


def remove_svf(model: nn.Module) -> nn.Module:
    """Put the original linear layers back (bit-identical: they were never modified)."""
    for name, module in list(svf_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model


@contextlib.contextmanager
def svf_disabled(model: nn.Module) -> Iterator[None]:
    """Run the original weights for the duration of the block."""
    modules = list(svf_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def save_svf(model: nn.Module, path: str | Path) -> Path:
    """``svf_config.json`` (targets, parametrisation, shapes) and ``svf.safetensors`` (the z vectors)."""
    from safetensors.torch import save_file

    modules = svf_modules(model)
    if not modules:
        raise ValueError("the model has no SVF layers to save; call apply_svf first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    first = next(iter(modules.values()))
    config = {"method": "svf", "parametrization": first.parametrization, "max_mult": first.max_mult,
              "modules": {name: list(m.S.shape) for name, m in modules.items()}}
    (path / SVF_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file({name: m.z.detach().float().cpu().contiguous() for name, m in modules.items()},
              str(path / SVF_WEIGHTS_NAME))
    return path


def load_svf(model: nn.Module, path: str | Path) -> dict[str, SVFLinear]:
    """Apply SVF to ``model`` as saved in ``path`` (if not applied yet) and load the z vectors; shapes and
    module names are checked against the model before anything is loaded."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / SVF_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not an SVF save folder")
    config = json.loads(config_file.read_text())
    modules = svf_modules(model)
    if not modules:
        names = sorted(config["modules"])
        modules = apply_svf(model, names, config["parametrization"], max_mult=config.get("max_mult", 1.0))
    tensors = load_file(str(path / SVF_WEIGHTS_NAME))
    missing = sorted(set(tensors) - set(modules))
    if missing:
        raise ValueError(f"{path}: z vectors for {missing[:3]} have no SVF layer in {type(model).__name__}")
    for name, z in tensors.items():
        if z.shape != modules[name].z.shape:
            raise ValueError(f"{path}: z for {name!r} has shape {tuple(z.shape)}, the model's layer needs "
                             f"{tuple(modules[name].z.shape)} (a different base model?)")
        with torch.no_grad():
            modules[name].z.copy_(z)
    return modules


def svf_parameter_count(model: nn.Module, target_modules: str | Sequence[str] = "mlp") -> int:
    """Σ min(out, in) over the matrices SVF would adapt — the formula, without decomposing anything."""
    head = _output_head(model)
    return sum(min(m.in_features, m.out_features) for name, m in model.named_modules()
               if m is not head and _matches(name, m, target_modules))

