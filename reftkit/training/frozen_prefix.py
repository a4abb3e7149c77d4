"""Opt-in cache of the frozen prefix: the hidden states entering the first intervened decoder layer.

The base model is frozen and deterministic below the earliest intervention (layer ``L``), so the
input of layer ``L`` depends on an example's tokens only. :class:`FrozenPrefixCache` stores it per
example the first time the example is seen (a normal full forward, observed by a hook) and, once
every example of a batch is stored, runs only layers ``L..N-1`` (+ final norm) from the stored
states; backward stops at layer ``L`` anyway, so later epochs skip ``L/N`` of the forward.

Why it is exact, and where it is not:

* Batches must be right-padded. A real token then only attends to earlier real tokens (causal mask)
  and sits at the same position ids as in any other batch, so the pad positions of an assembled
  batch may hold zeros: nothing real reads them, and they carry no labels.
* The layers are run by handing the stored states to the backbone as ``inputs_embeds`` while its
  ``layers`` list is temporarily ``layers[L:]``; the hooks live on the layer objects, so they still
  fire. That is only exact for backbones that do nothing to ``inputs_embeds`` before the layers and
  whose layers do not depend on their index in the list (Llama, Qwen, SmolLM2 ...); Granite scales
  the embeddings, GPT-2 adds position embeddings. The first batch is therefore run both ways and a
  mismatch raises :class:`PrefixCacheError` rather than training on a wrong function.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable

import torch
from torch import nn

from reftkit.anatomy import find_backbone_and_head
from reftkit.model import ReftModel

__all__ = ["FrozenPrefixCache", "PrefixCacheError", "dropout_sources"]

# Config fields of functional dropout (no nn.Dropout module to find) that would make the prefix random.
_DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "embd_pdrop", "attn_pdrop", "resid_pdrop", "dropout",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout")


def dropout_sources(model: nn.Module, skip: nn.Module | None = None) -> list[tuple[str, float]]:
    """``(name, p)`` of every active dropout of ``model`` outside ``skip``: modules, and functional dropout named by
    its config (no module to find). A training-mode base with any of them computes a random function."""
    later = {id(m) for m in skip.modules()} if skip is not None else set()
    found = [(name, float(m.p)) for name, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and id(m) not in later]
    config = getattr(model, "config", None)
    for field in _DROPOUT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found.append((f"config.{field}", float(value)))
    return found


class PrefixCacheError(ValueError):
    """The prefix cache cannot be used exactly with this model or batch; the message says why."""


class FrozenPrefixCache:
    """Per-example cache of the input of the earliest intervened decoder layer, for training.

    ``max_bytes``: stop storing once the stored states would exceed it (a warning says so once);
    batches holding an unstored example keep running the full forward. ``device``: where states are
    kept (default: where the model produced them; ``"cpu"`` trades a copy per step for device memory).

    Counters: ``hits`` / ``misses`` (examples found / not found at lookup), ``cached_steps`` /
    ``full_steps`` (batches run from the cache / in full), ``nbytes`` and ``tokens`` stored.
    """

    def __init__(self, reft: ReftModel, max_bytes: int | None = None,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(reft, ReftModel):
            raise PrefixCacheError(f"FrozenPrefixCache needs a ReftModel (a causal LM with interventions), got "
                                   f"{type(reft).__name__}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or int(max_bytes) < 0):
            raise PrefixCacheError(f"max_bytes={max_bytes!r}: give a byte count >= 0, or None for no limit")
        self.reft = reft
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.device = None if device is None else torch.device(device)
        parts = find_backbone_and_head(reft)
        model_name = type(reft.model).__name__
        if parts is None:
            raise PrefixCacheError(f"{model_name}: the label-only loss path is unavailable (no decoder + LM head "
                                   "pair that reproduces the model's loss), so there is no backbone to run from a "
                                   "cached layer")
        self.backbone = parts[0]
        layers = getattr(self.backbone, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise PrefixCacheError(f"{model_name}: get_decoder() is {type(self.backbone).__name__}, which has no "
                                   "`layers` ModuleList; the prefix cache runs decoder-only Llama-like backbones only")
        self.layer = self._earliest_layer(layers)
        self._check_frozen()
        # Dropout only matters below L: layers from L on are recomputed at every step anyway.
        self._prefix_dropouts = dropout_sources(reft.model, skip=layers[self.layer:])
        self._check_dropout()
        self._states: dict[tuple[int, bytes], torch.Tensor] = {}
        self.nbytes = 0
        self.tokens = 0
        self.hits = self.misses = self.cached_steps = self.full_steps = 0
        self.verified = False
        self._full_warned = False

    # -- up-front checks ---------------------------------------------------------------------
    def _earliest_layer(self, layers: nn.ModuleList) -> int:
        owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
        found = []
        for slot in self.reft._hooks.slots:
            if slot.intervention.uses_source:
                raise PrefixCacheError(f"intervention {slot.key!r} reads a source run (source={slot.source}); its "
                                       "source rows come from a separate forward, which the prefix cache does not "
                                       "cover")
            index = owner.get(id(self.reft.model.get_submodule(slot.site.module_path)))
            if index is None:
                raise PrefixCacheError(f"intervention {slot.key!r} is at module_path={slot.site.module_path!r}, "
                                       "outside the decoder layers; the prefix cache needs every intervention "
                                       "inside a decoder layer")
            found.append((index, slot.key))
        if not found:
            raise PrefixCacheError("this ReftModel has no interventions: nothing to train, nothing to cache")
        layer, key = min(found)
        if layer == 0:
            raise PrefixCacheError(f"the earliest intervention {key!r} is in layer 0: the input of layer 0 is the "
                                   "embedding lookup, so there is nothing to cache")
        return layer

    def _check_frozen(self) -> None:
        trainable = [name for name, p in self.reft.model.named_parameters() if p.requires_grad]
        if trainable:
            raise PrefixCacheError(f"base-model parameter {trainable[0]!r} has requires_grad=True "
                                   f"({len(trainable)} trainable in all): cached states would go stale as it trains")

    def _check_dropout(self) -> None:
        if self.reft.model.training and self._prefix_dropouts:
            name, p = self._prefix_dropouts[0]
            raise PrefixCacheError(f"the base model is in training mode with dropout {name}={p}: the layers below "
                                   f"layer {self.layer} are random, so their output cannot be cached; set it to 0 "
                                   "or call model.eval()")

    # -- storage -----------------------------------------------------------------------------
    @staticmethod
    def _lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
        if attention_mask is None:
            return [input_ids.shape[1]] * input_ids.shape[0]
        mask = attention_mask.bool()
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            row = int((mask[:, 1:] & ~mask[:, :-1]).any(1).nonzero()[0, 0])
            raise PrefixCacheError(f"example {row} of the batch has attention_mask {mask[row].int().tolist()}: the "
                                   "prefix cache needs right-padded batches (tokenizer padding_side='right'); left "
                                   "padding shifts positions between batches")
        return mask.sum(1).tolist()

    @staticmethod
    def _keys(input_ids: torch.Tensor, lengths: list[int]) -> list[tuple[int, bytes]]:
        host = input_ids.detach().cpu().numpy()
        return [(n, hashlib.blake2b(host[b, :n].tobytes(), digest_size=16).digest()) for b, n in enumerate(lengths)]

    def _store(self, keys: list[tuple[int, bytes]], captured: torch.Tensor) -> None:
        for b, key in enumerate(keys):
            if key in self._states:
                continue
            n = key[0]
            size = n * captured.shape[-1] * captured.element_size()
            if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
                if not self._full_warned:
                    warnings.warn(f"FrozenPrefixCache: max_bytes={self.max_bytes} reached with {len(self._states)} "
                                  f"examples ({self.nbytes} bytes) stored; batches holding other examples run the "
                                  "full forward", stacklevel=3)
                    self._full_warned = True
                continue
            state = captured[b, :n].detach()
            # clone: a view would keep the whole captured batch alive
            self._states[key] = state.to(self.device).clone() if self.device is not None else state.clone()
            self.nbytes += size
            self.tokens += n

    def _assemble(self, keys: list[tuple[int, bytes]], width: int, device: torch.device) -> torch.Tensor:
        first = self._states[keys[0]]
        out = torch.zeros(len(keys), width, first.shape[-1], dtype=first.dtype, device=device)
        for b, key in enumerate(keys):
            out[b, :key[0]] = self._states[key]  # pad positions stay zero: no real token reads them
        return out

    def __len__(self) -> int:
        return len(self._states)

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / self.tokens if self.tokens else 0.0

    # -- running -----------------------------------------------------------------------------
    def _from_layer(self, states: torch.Tensor, attention_mask: torch.Tensor | None,
                    kwargs: dict[str, Any]) -> torch.Tensor:
        """The backbone's last hidden state computed from the input of layer ``L``."""
        layers = self.backbone.layers
        self.backbone.layers = layers[self.layer:]  # same module objects: their hooks still fire
        try:
            return self.backbone(inputs_embeds=states, attention_mask=attention_mask,
                                 **{"use_cache": False, **kwargs})[0]
        finally:
            self.backbone.layers = layers

    def _full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The full forward, observing the input of layer ``L`` on the way (before any hook edits it)."""
        seen: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple, kw: dict) -> None:
            if not seen:  # checkpointed layers re-run in backward; keep the forward's value only
                seen.append((args[0] if args else kw["hidden_states"]).detach())

        handle = self.backbone.layers[self.layer].register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
        try:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        finally:
            handle.remove()
        return hidden, seen[0]

    def _verify(self, hidden: torch.Tensor, captured: torch.Tensor, attention_mask: torch.Tensor | None,
                kwargs: dict[str, Any], score: Callable[[torch.Tensor], torch.Tensor] | None,
                lengths: list[int]) -> None:
        """Run the batch from its own captured states, pads zeroed as in an assembled batch, and require
        the result of the full forward. Done once: the check depends on the architecture, not the data."""
        states = captured.clone()
        for b, n in enumerate(lengths):
            states[b, n:] = 0
        # Same random stream for both runs (dropout in later layers or in an intervention), and the
        # training stream left where the full forward put it.
        devices = [hidden.device] if hidden.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._rng_cpu)
            if devices:
                torch.cuda.set_rng_state(self._rng_dev, hidden.device)
            with torch.no_grad():
                again = self._from_layer(states, attention_mask, kwargs)
                want = score(hidden.detach()) if score is not None else None
                got = score(again) if score is not None else None
        real = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        for b, n in enumerate(lengths):
            real[b, :n] = True
        h_want, h_got = hidden.detach()[real].float(), again[real].float()
        h_diff = (h_want - h_got).abs().max().item() if h_want.numel() else 0.0
        h_scale = h_want.abs().max().item() if h_want.numel() else 0.0
        low = hidden.dtype != torch.float32 or torch.is_autocast_enabled(hidden.device.type)
        rtol = 2e-2 if low else 1e-5
        bad = h_diff > rtol * max(h_scale, 1.0)
        detail = f"max |hidden difference| {h_diff:.3g} (scale {h_scale:.3g})"
        if want is not None:
            l_diff = abs(float(want) - float(got))
            bad = bad or l_diff > rtol * max(abs(float(want)), 1e-6)
            detail = f"loss {float(want):.6g} (full) vs {float(got):.6g} (from layer {self.layer}), difference " \
                     f"{l_diff:.3g}; {detail}"
        if bad:
            raise PrefixCacheError(f"{type(self.reft.model).__name__}: running layers {self.layer}.. from cached "
                                   f"states does not reproduce the full forward ({detail}, rtol {rtol}); its "
                                   "backbone transforms inputs_embeds or its layers depend on their index. Train "
                                   "without the prefix cache")
        self.verified = True

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      score: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        """The backbone's last hidden state for a right-padded batch: from cached states when every example
        is stored, else by the full forward (which stores the new examples). Call it inside
        ``reft.intervening(...)``. ``score(hidden) -> loss`` lets the one-time exactness check compare losses.

        Extra backbone ``kwargs`` (``position_ids``, ``inputs_embeds`` ...) change what the prefix computes,
        so such calls are passed through uncached."""
        if kwargs:
            self.full_steps += 1
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        self._check_dropout()
        lengths = self._lengths(input_ids, attention_mask)
        keys = self._keys(input_ids, lengths)
        found = sum(key in self._states for key in keys)
        self.hits += found
        self.misses += len(keys) - found
        if found == len(keys) and self.verified:
            self.cached_steps += 1
            states = self._assemble(keys, input_ids.shape[1], input_ids.device)
            return self._from_layer(states, attention_mask, kwargs)
        self.full_steps += 1
        if not self.verified:
            self._rng_cpu = torch.get_rng_state()
            if input_ids.device.type == "cuda":
                self._rng_dev = torch.cuda.get_rng_state(input_ids.device)
        hidden, captured = self._full(input_ids, attention_mask, kwargs)
        if not self.verified:
            self._verify(hidden, captured, attention_mask, kwargs, score, lengths)
        self._store(keys, captured)
        return hidden

    def clear(self) -> None:
        """Drop every stored state (e.g. after changing the base model's weights)."""
        self._states.clear()
        self.nbytes = self.tokens = 0
