"""Training through a weight-only quantized base without a float copy of its weights.

torchao's weight-only tensors (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``) run ``F.linear`` with ordinary
torch ops on a dequantized weight, so autograd saves that float32 weight for backward: every quantized linear
the gradient crosses keeps a full float copy until backward, and a quantized base needed *more* memory to train
than the float32 one (``benchmarks/bench_quantized.py``: peak RSS 1.29x). Inside :func:`keep_quantized_weights`
such a call runs as :class:`QuantizedLinear`: the forward is the weight's own, backward keeps the weight as stored
and dequantizes it only for the product ``dx = dy W``, then frees it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

__all__ = ["QuantizedLinear", "keep_quantized_weights", "has_weight_only_quantized"]

#: per (weight class, dtype): whether ``weight.dequantize()`` is the weight its ``F.linear`` uses
_CONSISTENT: dict[tuple[type, torch.dtype], bool] = {}


class QuantizedLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` for a frozen ``W`` stored quantized; backward ``dx = dy · dequantize(W)``, computed when
    backward runs. Exact: a frozen weight-only linear is affine in ``x``, its input gradient is ``dy`` times the
    weight its forward used (checked once per weight type against ``F.linear`` on random rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the stored (quantized) tensor: a reference, not a copy
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        dense = ctx.weight.dequantize().to(grad.dtype)
        return (grad @ dense).to(ctx.x_dtype), None, None


def _is_weight_only(weight: Any) -> bool:
    return (isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao")
            and callable(getattr(weight, "dequantize", None))
            and getattr(weight, "act_quant_kwargs", None) is None)


def _consistent(weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` equals ``x @ weight.dequantize().T`` on random rows (once per type)."""
    key = (type(weight), weight.dtype)
    if key not in _CONSISTENT:
        with torch.no_grad():
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(
                device=weight.device, dtype=weight.dtype)
            ours = x @ weight.dequantize().to(x.dtype).T
            theirs = F.linear(x, weight)
            tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
            _CONSISTENT[key] = bool(torch.allclose(theirs.float(), ours.float(), rtol=tol, atol=tol * float(
                ours.abs().max().clamp_min(1))))
    return _CONSISTENT[key]


class _KeepQuantizedWeights(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (isinstance(x, torch.Tensor) and x.requires_grad and _is_weight_only(weight)
                    and not weight.requires_grad and (bias is None or not bias.requires_grad)
                    and _consistent(weight)):
                return QuantizedLinear.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def keep_quantized_weights() -> Iterator[None]:
    """Run the forward passes inside the block so that backward keeps torchao weight-only weights as stored
    (the backward itself may run after the block). Other calls, and weights of other kinds, are untouched."""
    with _KeepQuantizedWeights():
        yield


def has_weight_only_quantized(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a torchao weight-only quantized tensor."""
    return any(_is_weight_only(p) for p in model.parameters())
