"""``ReftModel``: a frozen Hugging Face model with interventions attached by hooks.

The path of one call: positions are computed once (or validated, when given), stored in a
:class:`~reftkit.hooks.CallState` for the duration of the call, read by the hooks, and dropped.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .attachment import base_device, base_state, build_slots, hold_base, release_base, tied_keys
from .call_inputs import CALL_INPUTS, Collected, check_inputs, check_keywords, routing, sequence_views, subspace_masks
from .config import ReftConfig
from .hooks import CallState, HookManager
from .positions import (
    PositionSpec,
    check_locations,
    check_sequence_bounds,
    locate_all,
    locate_from_mask,
    locate_sequences,
)
from .pyreft_import import load_pyreft
from .serialization import load_reft, save_reft
from .sources import record_sources


def _checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


class ReftModel(nn.Module):
    """A frozen base model plus ``interventions`` (an ``nn.ModuleDict``), hooked in place.

    Build it with :func:`get_reft_model`; call it like the base model, with optional
    ``intervention_locations``; ``detach()`` returns the untouched base model.
    """

    def __init__(self, model: nn.Module, config: ReftConfig | Mapping[str, Any] | list) -> None:
        super().__init__()
        if not isinstance(config, ReftConfig):
            config = ReftConfig(config if not isinstance(config, Mapping) or "representations" not in config
                                else config["representations"])
        self.reft_config = config
        self.model = model
        self.interventions = nn.ModuleDict()
        self._specs: list[PositionSpec | None] = []
        self._slot_tasks: list[str | None] = []
        held, first = base_state(model)
        # kept per instance too, so a deep copy (whose base is a new object, not in the registry) detaches alike
        self._requires_grad, self._base_training = held.requires_grad, held.training
        self._hooks = HookManager(model, [])
        self._undo_checkpointing: bool | None = None
        try:
            slots, self._specs, self._slot_tasks = build_slots(model, config, self.interventions)
            model.requires_grad_(False)
            #: the tasks of a mixed-task model, in config order (``tasks=`` routes batch rows to them)
            self.task_names: list[str] = list(dict.fromkeys(t for t in self._slot_tasks if t is not None))
            #: per slot, the sequence its positions count over (encoder-decoder models: "encoder" / "decoder")
            self._sequences: list[str | None] = [slot.site.sequence for slot in slots]
            self._hooks = HookManager(model, slots)
            self._hooks.attach()
        except BaseException:
            # a failed attach leaves no trace: no hook, and (when no other ReftModel holds the base) its own flags
            self._hooks.remove()
            if first:
                held.restore(model)
            raise
        hold_base(model, held, self)
        self._detached = False

    # -- positions --------------------------------------------------------------------------
    def _locations(self, ref: torch.Tensor, attention_mask: torch.Tensor | None, locations: Any,
                   what: str = "intervention_locations", cached: bool = False, inputs: Mapping | None = None,
                   generating: bool = False) -> torch.Tensor:
        attention_mask = check_inputs(ref, attention_mask, what != "intervention_locations", cached)
        batch, length = ref.shape[0], ref.shape[1]
        # encoder-decoder: the encoder's and the decoder's sequences (None for a decoder-only model)
        views = sequence_views(self._sequences, attention_mask, length, inputs, generating,
                               required=inputs is not None and what == "intervention_locations")
        if locations is not None:
            if views is None:
                return check_locations(locations, batch, length, len(self._specs), what).to(ref.device)
            lengths = {seq: view[1] for seq, view in views.items() if view is not None}
            located = check_locations(locations, batch, max(lengths.values()), len(self._specs), what)
            check_sequence_bounds(located, self._sequences, lengths, what)
            return located.to(ref.device)
        missing = [key for key, spec in zip(self.interventions, self._specs) if spec is None]
        if missing:
            raise ValueError(
                f"interventions {missing} have positions=None (a from_pyreft load without positions= gives "
                f"that: pyreft saves no positions), so this call needs {what}= ([B, K, P] token indices, -1 "
                "padded, K in the order of intervention_locations_order); or give the positions once: "
                "positions='l1' (etc.) in the config entries, or ReftModel.from_pyreft(model, path, positions=...)")
        if views is not None:
            return locate_sequences(self._specs, self._sequences, views, batch, ref.device)
        return locate_from_mask(self._specs, attention_mask, batch, length, ref.device)  # real tokens only

    def _call_state(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, locations: Any, sources: Any = None,
                    source_locations: Any = None, subspaces: Any = None, tasks: Any = None,
                    cached: bool = False, inputs: Mapping | None = None, generating: bool = False) -> CallState:
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        located = self._locations(ref, attention_mask, locations, cached=cached, inputs=inputs, generating=generating)
        row_valid = routing(self.task_names, self._slot_tasks, tasks, ref.shape[0], ref.device)
        uses_source = [s.index for s in self._hooks.slots if s.intervention.uses_source]
        recorded: dict[int, torch.Tensor] = {}
        if uses_source or sources is not None:
            located, recorded = record_sources(self.model, self._hooks, self._locations, located, row_valid,
                                               uses_source, sources, source_locations, ref.shape[0])
        state = CallState.build(located, row_valid)
        state.sources = recorded
        state.subspaces = subspace_masks(self._hooks.slots, subspaces, ref.shape[0], ref.device)
        return state

    def resolve_locations(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          intervention_locations: Any = None) -> torch.Tensor:
        """Where a call with these inputs intervenes: ``[B, K, P]`` token indices, -1 = empty, K in the order of
        :attr:`intervention_locations_order` (given locations validated and broadcast, else the config's)."""
        return self._locations(input_ids, attention_mask, intervention_locations)

    def prompt_locations(self, lengths: torch.Tensor) -> torch.Tensor:
        """Each intervention's positions (from the config) in prompts of these lengths, from 0: ``[N, K, P]``, -1 =
        empty. Data modules store them with the examples, so appended responses never shift them."""
        missing = [key for key, spec in zip(self.interventions, self._specs) if spec is None]
        if missing:
            raise ValueError(f"interventions {missing} have positions=None in the config; give positions to "
                             "the data module instead")
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        width = int(lengths.max()) if len(lengths) else 0
        return locate_all(self._specs, torch.zeros_like(lengths), lengths, width)

    def _check_live(self) -> None:
        if self._detached:
            raise RuntimeError("this ReftModel was detached; build a new one with get_reft_model")

    # -- calls ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def intervening(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    intervention_locations: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None, *, cached: bool = False,
                    decoder_inputs: Mapping | None = None, **call_inputs: Any) -> Iterator[CallState]:
        """Activate the interventions for calls made inside the block, with positions computed once
        from these inputs — e.g. to run only the backbone (``reft.model.model(...)``) and apply the
        LM head to the few labelled positions yourself. ``call_inputs`` are :data:`~reftkit.call_inputs.CALL_INPUTS`
        (``sources``, ``source_locations``, ``subspaces``, ``tasks``); yields the call's state. ``cached``: the
        calls continue from a KV cache, so ``attention_mask`` may be longer than the inputs (cached tokens
        first); positions are then counted over its last ``seq`` columns. ``decoder_inputs``: an encoder-decoder
        model's call keywords (``decoder_input_ids``, ``decoder_attention_mask``, ``labels``) that decoder-stack
        positions count over; without them those interventions act nowhere (a call of the encoder alone)."""
        self._check_live()
        check_keywords("intervening", self.model, input_ids, call_inputs)
        state = self._call_state(input_ids, inputs_embeds, attention_mask, intervention_locations, **call_inputs,
                                 cached=cached, inputs=decoder_inputs)
        keep = self.training and torch.is_grad_enabled() and _checkpointing(self.model)
        self._hooks.state = state
        try:
            yield state
        finally:
            if keep and self._hooks.state is state:
                # Gradient checkpointing re-runs the layers (and so the hooks) during backward, after the call
                # returned: the state stays for that recomputation only (see HookManager.current).
                state.backward_only = True
            else:
                self._hooks.state = None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                intervention_locations: torch.Tensor | None = None, *, sources: Any = None,
                source_locations: Any = None, subspaces: Any = None, tasks: Any = None, **kwargs: Any) -> Any:
        """The base model's forward, with the interventions applied at the call's positions.

        ``sources``: a batch (``{"input_ids", "attention_mask"}``) or a list of batches, run through the
        bare model first; interventions that read a source (interchange, DAS) get its rows at
        ``source_locations`` (default: the config's positions over the source's own tokens).
        ``subspaces``: per example, the rank coordinates subspace-aware interventions use (pyreft's
        ``subspaces``: a list of index lists, a ``[B, s]`` / ``[B, K, s]`` index tensor with -1 padding,
        or a ``[B, r]`` bool mask). ``tasks``: per example, the task whose interventions act on it
        (``None`` for none), for a model whose config assigns entries to tasks. pyvene's call form (a dict
        first, ``unit_locations=``, ...) raises ``TypeError`` naming the replacement
        (:data:`~reftkit.call_inputs.PYVENE_CALL_ARGUMENTS`); ``reftkit.pyreft`` takes that form.
        """
        cached = check_keywords("forward", self.model, input_ids, kwargs)
        with self.intervening(input_ids, attention_mask, intervention_locations, kwargs.get("inputs_embeds"),
                              sources=sources, source_locations=source_locations, subspaces=subspaces, tasks=tasks,
                              cached=cached, decoder_inputs=kwargs):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def collect(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                intervention_locations: torch.Tensor | None = None, **kwargs: Any) -> "Collected":
        """Run the model and return what its ``Collect`` interventions saw: ``Collected.activations[key]``
        is ``[B, P, W]`` (zeros at empty slots, ``Collected.valid[key]`` ``[B, P]``), plus the output."""
        call = {k: kwargs.pop(k) for k in CALL_INPUTS if k in kwargs}
        cached = check_keywords("collect", self.model, input_ids, kwargs)
        with self.intervening(input_ids, attention_mask, intervention_locations, kwargs.get("inputs_embeds"),
                              **call, cached=cached, decoder_inputs=kwargs) as state:
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        keys = [s.key for s in self._hooks.slots if s.intervention.collects]
        if not keys:
            raise ValueError("this model has no Collect intervention; add one with intervention='collect'")
        valid = {s.key: state.valid[:, s.index] for s in self._hooks.slots if s.intervention.collects}
        return Collected(output=output, activations=dict(state.collected), valid=valid)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 intervention_locations: torch.Tensor | None = None, *, sources: Any = None,
                 source_locations: Any = None, subspaces: Any = None, tasks: Any = None,
                 edit_new_tokens: bool | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the interventions applied to the prompt at prefill.

        Decode steps pass through, except interventions with positions ``"all"`` (IA3, adapters...),
        which edit each new token too: the KV cache carries the prompt's edited representations, so
        a step costs what the bare model's does. That needs the cache, hence ``use_cache=False`` is
        refused rather than silently losing the effect. ``sources``, ``subspaces`` and ``tasks`` are
        as in :meth:`forward` (a task's rows keep their routing through decoding). ``edit_new_tokens``
        overrides the config for decode steps: ``True``, every intervention edits each new token; ``False``, none."""
        self._check_live()
        check_keywords("generate", self.model, input_ids, kwargs)
        gen_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        if kwargs.get("use_cache") is False or (kwargs.get("use_cache") is None and gen_config is not None
                                                and getattr(gen_config, "use_cache", True) is False):
            raise ValueError("use_cache=False: reftkit intervenes on the prompt at prefill and relies on the "
                             "KV cache to carry the effect into decoding; generate with use_cache=True")
        if "decoder" in self._sequences and kwargs.get("decoder_input_ids") is not None:
            raise ValueError("generate(decoder_input_ids=...) with decoder-stack interventions: Hugging Face may "
                             "prepend the start token to them, which would move the decoder positions; generate "
                             "from the start token (leave decoder_input_ids out)")
        state = self._call_state(input_ids, kwargs.get("inputs_embeds"), attention_mask, intervention_locations,
                                 sources, source_locations, subspaces, tasks, inputs={}, generating=True)
        every_token = any(slot.every_token for slot in self._hooks.slots) if edit_new_tokens is None \
            else bool(edit_new_tokens)
        state.edit_new_tokens = bool(edit_new_tokens)
        # generate runs the model that holds the weights: a peft wrapper's generate bypasses its own forward
        stepper = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

        def before_step(module: nn.Module, args: Any, kwargs: dict) -> None:
            ref = next((kwargs[k] for k in ("input_ids", "inputs_embeds", "decoder_input_ids")
                        if kwargs.get(k) is not None), None)
            if ref is not None:
                state.batch = ref.shape[0]

        def after_prefill(module: nn.Module, args: Any, output: Any) -> None:
            if every_token:
                state.decoding = True
            else:
                state.active = False

        handles = [stepper.register_forward_pre_hook(before_step, with_kwargs=True),
                   stepper.register_forward_hook(after_prefill)]
        self._hooks.state = state
        try:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            self._hooks.state = None

    @contextlib.contextmanager
    def decoding(self, batch: int, *, tasks: Any = None, edit_new_tokens: bool | None = None) -> Iterator[CallState]:
        """Decode steps of a hand-written generation loop (a server's): each call in the block feeds ``batch``
        new tokens on a KV cache whose prompts ran under :meth:`intervening`; as in :meth:`generate`, only
        ``"all"``-position interventions edit them (``edit_new_tokens`` overrides), row i as ``tasks[i]``."""
        self._check_live()
        ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        state = self._call_state(ids, None, None, None, tasks=tasks, inputs={}, generating=True)
        state.decoding, state.edit_new_tokens = True, bool(edit_new_tokens)
        state.active = edit_new_tokens is not False
        self._hooks.state = state
        try:
            yield state
        finally:
            self._hooks.state = None

    # -- compilation ----------------------------------------------------------------------
    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the wrapped model in place, its intervention hooks traced into its graph
        (arguments as for :meth:`torch.nn.Module.compile`). Not the wrapper's own ``compile``: :meth:`generate`
        and :func:`reftkit.training.causal_lm_loss` bypass this forward, so the HF model (and its decoder) is
        compiled; positions stay eager and reach the graph as tensors, so new positions never recompile.
        Mixed-task batches (``tasks=``) route rows by host lists: each row-to-task assignment compiles anew."""
        self._check_live()
        targets = [self.model]
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if isinstance(inner, nn.Module) and inner is not self.model:
            targets.append(inner)
        for module in targets:
            module.compile(*args, **kwargs)

    # -- bookkeeping ----------------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> "ReftModel":
        super()._apply(fn, recurse)
        # intervention weights stay float32 whatever dtype the base model is cast to
        for param in self.interventions.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    def parameter_counts(self) -> dict[str, int]:
        """Exact counts (works on a meta-device model), with the keys every adapted model uses
        (``WeightSpaceModel``, ``PromptEnsembleModel`` too): ``trainable``, the parameters training updates
        (the interventions', plus any base-model parameter left trainable), and ``model``, all the base
        model's parameters."""
        return {"trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "model": sum(p.numel() for p in self.model.parameters())}

    def print_trainable_parameters(self) -> str:
        """Print (and return) the trainable intervention and base-model parameters and the share."""
        counts = self.parameter_counts()
        in_model = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        share = 100.0 * counts["trainable"] / max(counts["model"], 1)
        text = (f"trainable intervention params: {counts['trainable'] - in_model:,} || "
                f"trainable model params: {in_model:,}\n"
                f"model params: {counts['model']:,} || trainable%: {share:.6f}")
        print(text)
        return text

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The base model's activation checkpointing, non-reentrant by default (gradients reach the interventions)."""
        ckpt = {"use_reentrant": False} | (gradient_checkpointing_kwargs or {})
        if not _checkpointing(self.model) and self._undo_checkpointing is None:
            # what detach() turns back off: checkpointing, and the input-grad hook transformers adds with it
            self._undo_checkpointing = not (getattr(self.model, "_require_grads_hooks", None)
                                            or hasattr(self.model, "_require_grads_hook"))
        enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs: Any) -> None:
        """transformers 5.x name of :meth:`gradient_checkpointing_enable` (what ``Trainer`` calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def detach(self) -> nn.Module:
        """Remove every hook and return the base model; once no other ``ReftModel`` holds it, its ``requires_grad``
        flags and per-submodule train/eval mode are restored, and checkpointing enabled through this one is undone."""
        self._check_live()
        self._hooks.remove()
        self._detached = True
        if self._undo_checkpointing is not None:  # enabled through this ReftModel: the base did not have it
            disable = getattr(self.model, "activation_checkpointing_disable", None) \
                or self.model.gradient_checkpointing_disable
            disable()
            if self._undo_checkpointing and hasattr(self.model, "disable_input_require_grads"):
                self.model.disable_input_require_grads()
        release_base(self.model, self, self._requires_grad, self._base_training)
        return self.model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return base_device(self.model)

    @property
    def intervention_locations_order(self) -> list[str]:
        """Keys of ``interventions`` in the order of the K axis of ``intervention_locations``."""
        return list(self.interventions)

    @property
    def tied_interventions(self) -> dict[str, str]:
        """``{key: first key}`` for each key whose intervention is one module with an earlier key's (``tie`` in
        the config): it is counted, trained and saved once, and applied at every site it serves."""
        return tied_keys(self.interventions)

    # -- persistence (reftkit.serialization, reftkit.pyreft_import) ------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` (every constructor argument) and ``interventions.safetensors``."""
        return save_reft(self, path)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, verify_weights: bool = True) -> "ReftModel":
        """Attach the interventions saved in ``path`` (by :meth:`save_pretrained`) to ``model``. The weights must
        match the SHA-256 ``config.json`` records (``verify_weights=False``: not checked). A failure raises
        :class:`~reftkit.serialization.LoadError` naming the file and leaves ``model`` as it was."""
        return load_reft(model, path, build=cls, verify_weights=verify_weights)

    @classmethod
    def from_pyreft(cls, model: nn.Module, path: str | Path, positions: str | None = None,
                    classes: dict[str, str] | None = None, **intervention_kwargs: Any) -> "ReftModel":
        """Migrate a pyreft 0.1.0 save folder (``classes`` names the pyreft class a saved subclass extends);
        see :func:`reftkit.pyreft_import.load_pyreft`. To keep running pyreft code, use ``reftkit.pyreft``."""
        return load_pyreft(model, path, cls, positions=positions, classes=classes, **intervention_kwargs)


def get_reft_model(model: nn.Module, config: ReftConfig | Mapping[str, Any] | list) -> ReftModel:
    """Freeze ``model`` and attach the interventions ``config`` describes."""
    return ReftModel(model, config)
