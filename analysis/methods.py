"""The methods :func:`~reftkit.analysis.compare` runs: one name each, with default options and learning rate.

A :class:`Method` is plain data: ``name`` (a reftkit intervention such as ``loreft``, a weight-space
method such as ``lora``, or ``base`` for the unadapted model), ``options`` (the ReFT representation
fields, or the peft / SVF options) and the ``learning_rate`` it trains with. Everything else about the
budget (epochs, batch size, schedule, seed) is shared by all methods of one comparison.

Default learning rates are each method's usual choice at this scale, not tuned on the recipe:
ReFT 2e-3 (reftkit's 1k recipe), LoRA 5e-4, IA3 3e-3 (T-Few), SVF 2e-3 (the Transformer² code's
``lr``), prefix / P-Tuning v2 / P-tuning 5e-3 (peft's MetaMathQA prefix-tuning runs), prompt tuning
3e-2, full fine-tuning 2e-5 (peft's full-finetuning run uses 1e-5 on a 3B model). Template P-tuning
(``p_tuning_template``, :mod:`reftkit.analysis.ptuning`) trains as P-tuning does, with 5e-3, on a template of
10 pseudo tokens (5 before the input, 5 after) by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .baselines import PROMPT_METHODS, WEIGHT_SPACE_METHODS

REFT_DEFAULT_REPRESENTATION = {"layer": "all", "component": "block_output", "positions": "l1",
                               "low_rank_dimension": 4}
# a bottleneck adapter acts on every token (Houlsby et al. 2019), with its own size option
ADAPTER_DEFAULT_REPRESENTATION = {"layer": "all", "component": "block_output", "positions": "all"}
_LEARNING_RATES = {"reft": 2e-3, "lora": 5e-4, "ia3": 3e-3, "svf": 2e-3, "prefix_tuning": 5e-3,
                   "p_tuning_v2": 5e-3, "p_tuning": 5e-3, "prompt_tuning": 3e-2, "fpft": 2e-5, "base": 0.0,
                   "p_tuning_template": 5e-3}
_OPTIONS: dict[str, dict[str, Any]] = {"lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                                       **{m: {"num_virtual_tokens": 10} for m in PROMPT_METHODS},
                                       "p_tuning_template": {"template": "[P*5] {input} [P*5] {output}"}}
#: methods built with the tokenizer (their templates hold text): kind ``template``
TEMPLATE_METHODS = ("p_tuning_template",)


def reft_method_names() -> tuple[str, ...]:
    """Interventions that train on supervised data alone: the LoReFT family and bottleneck adapters
    (the interpretability ones need sources or fixed vectors; ``ia3`` here means peft's IA3)."""
    from reftkit.interventions import REFT_FAMILY

    return tuple(cls.name for cls in REFT_FAMILY) + ("bottleneck_adapter",)


def method_kind(name: str) -> str:
    """``reft``, ``peft``, ``svf``, ``fpft``, ``template`` or ``base``; unknown names raise, listing the known
    ones."""
    if name == "base":
        return "base"
    if name in TEMPLATE_METHODS:
        return "template"
    if name in ("svf", "fpft"):
        return name
    if name in WEIGHT_SPACE_METHODS:
        return "peft"
    known = reft_method_names()
    if name in known:
        return "reft"
    names = WEIGHT_SPACE_METHODS + TEMPLATE_METHODS
    raise ValueError(f"unknown method {name!r}; choose one of: base, {', '.join(names)}, "
                     f"or a ReFT intervention ({', '.join(known)})")


@dataclass(frozen=True)
class Method:
    """One row of a comparison. ``label`` names the row (default: ``name``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        kind = method_kind(self.name)
        object.__setattr__(self, "options", {**_OPTIONS.get(self.name, {}), **dict(self.options)})
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", _LEARNING_RATES["reft" if kind == "reft" else self.name])
        if self.label is None:
            object.__setattr__(self, "label", self.name)
        if kind == "base" and self.options:
            raise ValueError(f"method 'base' takes no options, got {sorted(self.options)}")

    @property
    def kind(self) -> str:
        return method_kind(self.name)

    def representations(self) -> list[dict[str, Any]]:
        """The ReftConfig entries of a ReFT method: ``options["representations"]`` if given, else one
        entry from :data:`REFT_DEFAULT_REPRESENTATION` (:data:`ADAPTER_DEFAULT_REPRESENTATION` for a
        bottleneck adapter) updated by ``options``."""
        if self.kind != "reft":
            raise ValueError(f"{self.name} is not a ReFT method")
        if "representations" in self.options:
            reps = [dict(r) for r in self.options["representations"]]
            for r in reps:
                r.setdefault("intervention", self.name)
            return reps
        default = ADAPTER_DEFAULT_REPRESENTATION if self.name == "bottleneck_adapter" else REFT_DEFAULT_REPRESENTATION
        return [{**default, **self.options, "intervention": self.name}]


def as_method(spec: str | Method | tuple | dict) -> Method:
    """``"lora"``, ``("lora", {"r": 4})``, ``{"name": "lora", "options": {...}}`` or a :class:`Method`."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        return Method(spec)
    if isinstance(spec, tuple):
        return Method(*spec)
    if isinstance(spec, dict):
        return Method(**spec)
    raise TypeError(f"a method is a name, a (name, options) tuple, a dict or a Method, got {type(spec).__name__}")
