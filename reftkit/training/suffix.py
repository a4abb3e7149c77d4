"""Suffix training: autograd only over the tokens the interventions can change.

In a causal decoder the state at position ``t`` depends on tokens ``0..t`` only. When every intervention of an
example acts at positions ``>= s`` and every supervised prediction is read from a position ``>= s``, the tokens
before ``s`` (the *prefix*: on the last-position recipe, the prompt up to its last token) reach the loss only
through their keys and values, which no intervention changes. So per example:

* the prefix runs once without autograd, through every layer, into a KV cache;
* the suffix (positions ``s..e-1``, ``e`` one past the last supervised prediction) runs forward and backward
  on that cache, the interventions' positions shifted by ``-s``; its targets are the same, so is the loss.

When the model's backbone has a ``layers`` list and the earliest intervention sits in layer ``L > 0``, the
prefix's keys/values of layers ``L..N-1`` and the suffix's input of layer ``L`` are stored per example (up to
``max_bytes``); a batch whose examples are all stored then runs only layers ``L..N-1`` over the suffix
(:class:`~reftkit.training.frozen_prefix.FrozenPrefixCache`'s saving, combined with this one).

Exactness is checked, not assumed: the first batch run by each path is also run the full way (no grad, same
random stream), and a mismatch of loss or hidden states raises :class:`SuffixTrainingError` (or, when the
trainer chose the path by itself, turns it off with a warning). Batches it cannot take exactly (left
padding, extra backbone inputs, dropout in a training-mode base, gradient checkpointing, ``sources``) run the
full path, and the first of each reason is warned about.
"""
from __future__ import annotations

import hashlib
import inspect
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from reftkit.anatomy import find_backbone_and_head
from reftkit.model import ReftModel

from .frozen_prefix import dropout_sources
from .label_only import label_only_loss, next_token_loss
from .suffix_batch import SuffixBatch, cache_of, left_aligned_cache, stack_cache

__all__ = ["SuffixTraining", "SuffixTrainingError", "DEFAULT_MAX_BYTES"]

#: default byte budget of the stored prefixes (2 GiB): the 1k WordNet recipe on SmolLM2 needs about 1.2 GB
DEFAULT_MAX_BYTES = 2 << 30
#: a batch whose rows start with at least this many equal tokens runs them once, from a stored block
MIN_SHARED_TOKENS = 4


class SuffixTrainingError(ValueError):
    """Suffix training cannot run exactly on this model; the message says why."""


class SuffixTraining:
    """Per-batch suffix path for :func:`~reftkit.training.causal_lm.causal_lm_loss` (see the module docstring).

    ``max_bytes``: budget of the per-example store (``0``: store nothing, recompute each prefix without grad).
    ``device``: where stored tensors live (default: where the model made them; ``"cpu"`` saves device memory
    for a copy per step). ``strict``: raise on a failed exactness check instead of turning the path off.

    Counters: ``hits`` / ``misses`` (examples found / not found in the store), ``cached_steps`` (batches run
    from the store), ``suffix_steps`` (batches whose prefix ran without grad), ``full_steps`` with
    ``fallbacks`` (reason -> batches run the full way), ``prefix_tokens`` / ``suffix_tokens`` (real tokens
    skipped by autograd / run with it), ``nbytes`` stored.
    """

    def __init__(self, reft: ReftModel, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 device: torch.device | str | None = None, strict: bool = True) -> None:
        if not isinstance(reft, ReftModel):
            raise SuffixTrainingError(f"suffix training needs a ReftModel (a causal LM with interventions), got "
                                      f"{type(reft).__name__}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 0):
            raise SuffixTrainingError(f"max_bytes={max_bytes!r}: give a byte count >= 0, or None for no limit")
        self.reft, self.strict = reft, strict
        self.max_bytes = max_bytes
        self.device = None if device is None else torch.device(device)
        model_name = type(reft.model).__name__
        config = getattr(reft.model, "config", None)
        if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
            raise SuffixTrainingError(f"{model_name} is not a causal decoder (is_encoder_decoder / is_causal in its "
                                      "config): a position's state may depend on later tokens, so no prefix is "
                                      "independent of the interventions")
        parts = find_backbone_and_head(reft)
        if parts is None:
            raise SuffixTrainingError(f"{model_name}: no decoder + LM head pair that reproduces the model's loss, so "
                                      "there is no backbone to run a suffix through")
        self.backbone, self.head = parts
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        if self._cache_arg is None or "position_ids" not in params:
            raise SuffixTrainingError(f"{type(self.backbone).__name__}.forward takes no KV cache or no position_ids, "
                                      "so a suffix cannot continue from its prefix")
        for slot in reft._hooks.slots:
            if slot.intervention.uses_source:
                raise SuffixTrainingError(f"intervention {slot.key!r} reads a source run (source={slot.source}); its "
                                          "source rows come from a separate forward over whole sequences")
        trainable = [name for name, p in reft.model.named_parameters() if p.requires_grad]
        if trainable:
            raise SuffixTrainingError(f"base-model parameter {trainable[0]!r} has requires_grad=True: the prefix "
                                      "runs without autograd, so it would get no gradient")
        self.layer = self._earliest_layer()
        self._dropouts = dropout_sources(reft.model)
        self._store: dict[tuple[int, int, int, bytes], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._shared: dict[tuple[int, bytes], torch.Tensor] = {}
        self.shared_hits = 0
        self.nbytes = 0
        self.hits = self.misses = self.cached_steps = self.suffix_steps = self.full_steps = 0
        self.prefix_tokens = self.suffix_tokens = 0
        self.fallbacks: Counter[str] = Counter()
        self.disabled: str | None = None
        self.verified = {"suffix": False, "cached": False}
        self._full_warned = False

    # -- up-front facts -------------------------------------------------------------------------------
    def _earliest_layer(self) -> int:
        """``L`` for the stored path: the decoder layer holding the earliest intervention (0: store the prefix
        of every layer and run the suffix through all of them)."""
        layers = getattr(self.backbone, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            return 0
        owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
        found = [owner.get(id(self.reft.model.get_submodule(s.site.module_path))) for s in self.reft._hooks.slots]
        return 0 if not found or None in found else min(found)

    def __len__(self) -> int:
        return len(self._store)

    # -- when a batch can take it ---------------------------------------------------------------------
    def _why_full(self, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                  kwargs: dict[str, Any], call: dict[str, Any]) -> str | None:
        if self.disabled:
            return self.disabled
        if labels is None:
            return "the batch has no labels"
        if kwargs:
            return f"backbone inputs {sorted(kwargs)} change what the prefix computes"
        if call.get("sources") is not None:
            return "the batch carries sources (a separate source run over whole sequences)"
        flag = getattr(self.reft.model, "is_activation_checkpointing", None)  # transformers >= 5 name
        if flag if flag is not None else getattr(self.reft.model, "is_gradient_checkpointing", False):
            return "gradient checkpointing re-runs layers in backward, which would extend the KV cache twice"
        if self.reft.model.training and self._dropouts:
            name, p = self._dropouts[0]
            return f"the base model is in training mode with dropout {name}={p}: its prefix is random"
        if attention_mask is not None:
            mask = attention_mask.bool()
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                return "the batch is not right-padded (tokenizer padding_side='right'): positions would shift"
        return None

    def _fall_back(self, reason: str) -> None:
        self.full_steps += 1
        if not self.fallbacks[reason]:
            warnings.warn(f"suffix training: running the full path because {reason}", stacklevel=4)
        self.fallbacks[reason] += 1

    def _split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
               locations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per example: length ``n``; split ``s`` = the first intervened or supervised-prediction position (at most
        ``n - 1``); end ``e`` = one past the last supervised prediction (at least ``s + 1``; later tokens reach no
        loss term)."""
        batch, width = input_ids.shape
        device = input_ids.device
        lengths = attention_mask.long().sum(1) if attention_mask is not None else \
            torch.full((batch,), width, device=device)
        big = torch.full((batch,), width, device=device)
        located = locations.reshape(batch, -1)
        first_located = torch.where(located >= 0, located, width).amin(1) if located.numel() else big
        supervised = labels[:, 1:].to(device) != -100
        columns = torch.arange(width - 1, device=device).expand(batch, -1)
        first_supervised = torch.where(supervised, columns, width).amin(1) if width > 1 else big
        split = torch.minimum(torch.minimum(first_located, first_supervised), (lengths - 1).clamp_min(0))
        last_supervised = torch.where(supervised, columns, -1).amax(1) if width > 1 else torch.full_like(split, -1)
        ends = torch.minimum(torch.maximum(last_supervised + 1, split + 1), lengths.clamp_min(1))
        return lengths, split, ends

    # -- the store ------------------------------------------------------------------------------------
    @staticmethod
    def _keys(input_ids: torch.Tensor, lengths: list[int], splits: list[int], ends: list[int]
              ) -> list[tuple[int, int, int, bytes]]:
        host = input_ids.detach().cpu().numpy()
        return [(n, s, e, hashlib.blake2b(host[b, :n].tobytes(), digest_size=16).digest())
                for b, (n, s, e) in enumerate(zip(lengths, splits, ends))]

    def _put(self, keys: list[tuple[int, int, int, bytes]], kv: torch.Tensor, states: torch.Tensor | None) -> None:
        """``kv``: ``[layers, 2, B, H, P, D]`` prefix keys/values (right-padded); ``states``: ``[B, S, D]``."""
        for b, key in enumerate(keys):
            if key in self._store:
                continue
            _, s, e, _ = key
            prefix = kv[:, :, b, :, :s]
            suffix = states[b, :e - s] if states is not None else None
            size = prefix.numel() * prefix.element_size() + (suffix.numel() * suffix.element_size() if
                                                             suffix is not None else 0)
            if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
                if not self._full_warned and self.max_bytes > 0:
                    warnings.warn(f"suffix training: max_bytes={self.max_bytes} reached with {len(self._store)} "
                                  f"examples ({self.nbytes} bytes) stored; other examples' prefixes are recomputed "
                                  "without grad at every step", stacklevel=4)
                    self._full_warned = True
                continue
            move = (lambda t: t.to(self.device).clone()) if self.device is not None else (lambda t: t.clone())
            self._store[key] = (move(prefix), move(suffix) if suffix is not None else None)
            self.nbytes += size

    def clear(self) -> None:
        """Drop every stored prefix (e.g. after changing the base model's weights)."""
        self._store.clear()
        self._shared.clear()
        self.nbytes = 0

    # -- running --------------------------------------------------------------------------------------
    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
             intervention_locations: Any, num_items_in_batch: torch.Tensor | int | None,
             call: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The batch's ``{"loss", "logits"}`` by the suffix path, or ``None`` for the full path (reason counted)."""
        reason = self._why_full(attention_mask, labels, kwargs, call)
        if reason is not None:
            self._fall_back(reason)
            return None
        locations = self.reft.resolve_locations(input_ids, attention_mask, intervention_locations)
        lengths, split, ends = self._split(input_ids, attention_mask, labels, locations)
        if not bool((split > 0).any()):
            self._fall_back("no example has a token before its first intervened or supervised position")
            return None
        keys = self._keys(input_ids, lengths.tolist(), split.tolist(), ends.tolist())
        found = sum(key in self._store for key in keys)
        self.hits += found
        self.misses += len(keys) - found
        cached = found == len(keys)
        mode = "cached" if cached else "suffix"
        rng = _rng_state(input_ids.device)
        suffix = SuffixBatch(input_ids, attention_mask, labels, locations, lengths, split, ends)
        if cached:
            hidden = self._run_cached(suffix, keys, call)
        else:
            hidden, kv, states = self._run_uncached(suffix, call)
        loss, logits = next_token_loss(hidden, self.head, suffix.targets, num_items_in_batch)
        if not self.verified[mode]:
            problem = self._compare(mode, hidden, loss, suffix, input_ids, attention_mask, labels, locations,
                                    num_items_in_batch, call, rng)
            if problem is not None:
                if self.strict:
                    raise SuffixTrainingError(problem)
                self.disabled = problem
                _set_rng_state(rng, input_ids.device)  # the full path draws what this batch drew
                self._fall_back(problem)
                return None
            self.verified[mode] = True
        if not cached:
            self._put(keys, kv, states)
        self.cached_steps += cached
        self.suffix_steps += not cached
        self.prefix_tokens += int(split.sum())
        self.suffix_tokens += int((ends - split).sum())
        return {"loss": loss, "logits": logits}

    def _backbone(self, **inputs: Any) -> torch.Tensor:
        cache = inputs.pop("cache")
        return self.backbone(**inputs, **{self._cache_arg: cache}, use_cache=True)[0]

    def _run_uncached(self, suffix: SuffixBatch, call: dict[str, Any]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prefix without autograd into a fresh cache, then the suffix on top with the interventions on."""
        from transformers import DynamicCache

        with torch.no_grad():
            block = self._shared_block(suffix)
            if block is None:
                prefix_cache = DynamicCache()
                self._backbone(input_ids=suffix.prefix_ids, attention_mask=suffix.prefix_mask,
                               position_ids=suffix.prefix_positions, cache=prefix_cache)
            else:  # the rows' common start is read; only the rest of each prefix runs
                start, shared = block
                batch = suffix.ids.shape[0]
                prefix_cache = cache_of([(layer[0].expand(batch, -1, -1, -1), layer[1].expand(batch, -1, -1, -1))
                                          for layer in shared[:, :, 0]])
                if suffix.prefix_ids.shape[1] > start:
                    self._backbone(input_ids=suffix.prefix_ids[:, start:], attention_mask=suffix.prefix_mask,
                                   position_ids=suffix.prefix_positions[:, start:], cache=prefix_cache)
        kv = stack_cache(prefix_cache, start=self.layer)
        cache = left_aligned_cache(stack_cache(prefix_cache, start=0), suffix)
        seen: list[torch.Tensor] = []
        handle = None
        if self.layer > 0:
            def capture(module: nn.Module, args: tuple, kw: dict) -> None:
                if not seen:
                    seen.append((args[0] if args else kw["hidden_states"]).detach())
            handle = self.backbone.layers[self.layer].register_forward_pre_hook(capture, with_kwargs=True,
                                                                                  prepend=True)
        try:
            with self.reft.intervening(suffix.ids, suffix.full_mask, suffix.locations, cached=True, **call):
                hidden = self._backbone(input_ids=suffix.ids, attention_mask=suffix.full_mask,
                                        position_ids=suffix.positions, cache=cache)
        finally:
            if handle is not None:
                handle.remove()
        return hidden, kv, (seen[0] if seen else None)

    def _shared_block(self, suffix: SuffixBatch) -> tuple[int, torch.Tensor] | None:
        """``(c, keys/values [layers, 2, 1, H, c, D])`` of the ``c`` tokens all rows start with (a system prompt),
        computed once and stored; None when they share fewer than ``MIN_SHARED_TOKENS`` before their splits."""
        ids = suffix.prefix_ids
        same = (ids == ids[:1]).all(0).long().cumprod(0)
        common = min(int(same.sum()), int(suffix.split.min()))
        if common < MIN_SHARED_TOKENS:
            return None
        host = ids[0].detach().cpu().numpy()
        for length in sorted({length for length, _ in self._shared}, reverse=True):
            if length <= common:
                found = self._shared.get((length, hashlib.blake2b(host[:length].tobytes(), digest_size=16).digest()))
                if found is not None:
                    self.shared_hits += 1
                    return length, found
        cache = cache_of([])
        self._backbone(input_ids=ids[:1, :common], attention_mask=torch.ones_like(ids[:1, :common]),
                       position_ids=suffix.prefix_positions[:1, :common], cache=cache)
        block = stack_cache(cache, start=0)[:, :, :, :, :common]
        size = block.numel() * block.element_size()
        if self.max_bytes is None or self.nbytes + size <= self.max_bytes:
            key = (common, hashlib.blake2b(host[:common].tobytes(), digest_size=16).digest())
            self._shared[key] = block.to(self.device) if self.device is not None else block
            self.nbytes += size
        return common, block

    def _run_cached(self, suffix: SuffixBatch, keys: list[tuple[int, int, int, bytes]], call: dict[str, Any]
                    ) -> torch.Tensor:
        """Layers ``L..`` over the suffix, from the stored prefix and (``L > 0``) the stored input of layer ``L``."""
        device = suffix.ids.device
        entries = [self._store[key] for key in keys]
        first = entries[0][0]
        batch, width = suffix.ids.shape
        prefix_width = suffix.prefix_ids.shape[1]
        layers, _, heads, _, dim = first.shape
        kv = torch.zeros(layers, 2, batch, heads, prefix_width, dim, dtype=first.dtype, device=device)
        for b, (prefix, _) in enumerate(entries):
            kv[:, :, b, :, prefix_width - prefix.shape[-2]:] = prefix  # left-aligned: it ends where the suffix starts
        filler = torch.zeros(batch, heads, prefix_width, dim, dtype=first.dtype, device=device)
        cache = cache_of([(filler, filler)] * self.layer + [(kv[i, 0], kv[i, 1]) for i in range(layers)])
        if self.layer == 0:
            with self.reft.intervening(suffix.ids, suffix.full_mask, suffix.locations, cached=True, **call):
                return self._backbone(input_ids=suffix.ids, attention_mask=suffix.full_mask,
                                      position_ids=suffix.positions, cache=cache)
        states = torch.zeros(batch, width, entries[0][1].shape[-1], dtype=entries[0][1].dtype, device=device)
        for b, (_, after) in enumerate(entries):
            states[b, :after.shape[0]] = after
        all_layers = self.backbone.layers
        self.backbone.layers = all_layers[self.layer:]  # the same module objects: their hooks still fire
        try:
            with self.reft.intervening(suffix.ids, suffix.full_mask, suffix.locations, cached=True, **call):
                return self._backbone(inputs_embeds=states, attention_mask=suffix.full_mask,
                                      position_ids=suffix.positions, cache=cache)
        finally:
            self.backbone.layers = all_layers

    def _compare(self, mode: str, hidden: torch.Tensor, loss: torch.Tensor, suffix: SuffixBatch,
                 input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                 locations: torch.Tensor, num_items_in_batch: Any, call: dict[str, Any],
                 rng: tuple) -> str | None:
        """The full path on the same batch and random stream; a message when it differs beyond float tolerance."""
        device = input_ids.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _set_rng_state(rng, device)
            with torch.no_grad(), self.reft.intervening(input_ids, attention_mask, locations, **call):
                full = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
                want = label_only_loss(full, self.head, labels, num_items_in_batch)[0]
        full_rows = full.gather(1, suffix.index[..., None].expand(-1, -1, full.shape[-1]))[suffix.valid].float()
        got_rows = hidden.detach()[suffix.valid].float()
        h_diff = (full_rows - got_rows).abs().max().item() if got_rows.numel() else 0.0
        h_scale = full_rows.abs().max().item() if got_rows.numel() else 0.0
        low = hidden.dtype != torch.float32 or torch.is_autocast_enabled(device.type)
        rtol = 2e-2 if low else 1e-5
        l_diff = abs(float(want) - float(loss.detach()))
        if h_diff <= rtol * max(h_scale, 1.0) and l_diff <= rtol * max(abs(float(want)), 1e-6):
            return None
        how = f"from its stored prefix and layer-{self.layer} input" if mode == "cached" else \
            "on a KV cache of its prefix"
        return (f"{type(self.reft.model).__name__}: running the suffix {how} does not reproduce the full forward "
                f"(loss {float(want):.6g} full vs {float(loss.detach()):.6g} suffix; max |hidden difference| "
                f"{h_diff:.3g}, scale {h_scale:.3g}, rtol {rtol}): its attention or position handling is not "
                "reproduced; train with suffix_training=False")

    def summary(self) -> dict[str, Any]:
        """The counters as one dict (for logs and benchmarks)."""
        return {"cached_steps": self.cached_steps, "suffix_steps": self.suffix_steps,
                "full_steps": self.full_steps, "hits": self.hits, "misses": self.misses,
                "stored_examples": len(self._store), "shared_blocks": len(self._shared),
                "shared_hits": self.shared_hits, "nbytes": self.nbytes, "prefix_tokens": self.prefix_tokens,
                "suffix_tokens": self.suffix_tokens, "layer": self.layer, "fallbacks": dict(self.fallbacks),
                "disabled": self.disabled}


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
