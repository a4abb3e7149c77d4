"""pyreft's ``ReftModel`` and ``get_reft_model`` on reftkit's core.

``reftkit.pyreft.ReftModel`` *is* a :class:`reftkit.ReftModel` (same hooks, same math, the same
trainer and data paths), with pyreft's and pyvene's surface added:

* the call forms ``reft_model(base_dict, unit_locations=..., labels=..., subspaces=...)`` returning
  pyvene's pair ``(original_output_or_None, intervened_output)``, and ``generate(base_dict,
  unit_locations=..., intervene_on_prompt=..., **generation_kwargs)`` returning ``(None, ids)``; a call
  in reftkit's own form (``input_ids=..., intervention_locations=...``) is reftkit's;
* interventions keyed by pyvene's names (``layer_8_comp_block_output_unit_pos_nunit_1#0``), in the
  config's order, the intervention instances of the config themselves (as pyvene keeps them);
* ``set_device``, ``get_device``, ``count_parameters``, ``get_trainable_parameters``,
  ``disable_model_gradients`` / ``enable_model_gradients``, ``print_trainable_parameters``,
  ``save(save_directory=...)`` and ``ReftModel.load(path, model)`` (pyreft's folder format).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from reftkit.model import ReftModel as CoreReftModel

from .call_forms import base_locations, subspace_indices
from .config import ReftConfig
from .persistence import load_into, load_pyreft_folder, save_pyreft_folder


@dataclass
class IntervenableModelOutput:
    """pyvene's ``return_dict=True`` result."""

    original_outputs: Any = None
    intervened_outputs: Any = None
    collected_activations: Any = None


def _refuse(name: str, value: Any, why: str) -> None:
    if value is not None and value is not False and value != {}:
        raise ValueError(f"{name}={value!r:.60} is not supported by reftkit.pyreft: {why}")


class ReftModel(CoreReftModel):
    """pyreft's ``ReftModel(config, model)``; see the module docstring."""

    def __init__(self, config: ReftConfig | Mapping[str, Any] | list, model: nn.Module, **kwargs: Any) -> None:
        if isinstance(config, nn.Module) and not isinstance(model, nn.Module):
            config, model = model, config  # reftkit's own order, ReftModel(model, config)
        for name, value in kwargs.items():
            _refuse(name, value, "pyvene's use_fast / as_adaptor modes have no reftkit equivalent")
        if not isinstance(config, ReftConfig):
            config = ReftConfig(representations=config["representations"] if isinstance(config, Mapping)
                                and "representations" in config else config)
        #: the pyreft config this model was built from
        self.pyreft_config = config
        entries = [rep.reftkit_entry() for rep in config.representations]
        users: dict[int, list[dict]] = {}
        for entry in entries:  # pyvene shares an instance given to several entries: tie them
            users.setdefault(id(entry["intervention"]), []).append(entry)
        for n, group in enumerate(g for g in users.values() if len(g) > 1):
            for entry in group:
                entry["tie"] = f"shared_instance_{n}"
        super().__init__(model, entries)
        self._adopt_pyvene_layout(config)
        self.disable_model_gradients()  # pyvene freezes the model (and sets eval mode) when it wraps it

    def _adopt_pyvene_layout(self, config: ReftConfig) -> None:
        """Key interventions as pyvene does, and keep the config's own instances (pyvene uses the objects
        it was given: a user holding one sees the trained weights, and one instance in two entries is shared)."""
        built = list(self.interventions.values())
        counts: dict[str, int] = {}
        renamed = nn.ModuleDict()
        seen: set[int] = set()
        for slot, rep, copy in zip(self._hooks.slots, config.representations, built):
            stem = rep.key
            counts[stem] = counts.get(stem, -1) + 1
            key = f"{stem}#{counts[stem]}"
            instance = rep.intervention
            if id(instance) not in seen:
                if not instance.is_materialized:
                    instance.materialize(copy.embed_dim)
                instance.load_state_dict(copy.state_dict())
                instance.to(device=next(copy.parameters()).device, dtype=torch.float32)
                seen.add(id(instance))
            renamed[key] = instance
            slot.key, slot.intervention = key, instance
        self.interventions = renamed

    # -- pyvene's call forms --------------------------------------------------------------
    def _pyvene_inputs(self, base: Mapping[str, Any], unit_locations: Any, subspaces: Any,
                       sources: Any, source_representations: Any,
                       intervention_additional_kwargs: Any) -> tuple[dict[str, Any], torch.Tensor, Any]:
        _refuse("sources", sources, "pyreft's interventions are sourceless; for interchange interventions use "
                "reftkit.ReftModel(..., sources=...)")
        _refuse("source_representations", source_representations, "pyreft's interventions are sourceless")
        _refuse("intervention_additional_kwargs", intervention_additional_kwargs,
                "pyreft's interventions take no extra arguments")
        inputs = dict(base)
        ref = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if not isinstance(ref, torch.Tensor):
            raise ValueError(f"base has no input_ids (or inputs_embeds) tensor; its keys are {sorted(inputs)}")
        batch, length = ref.shape[0], ref.shape[1]
        locations = base_locations(unit_locations, batch, length, len(self.interventions)).to(ref.device)
        ranks = [iv.rank for iv in self.interventions.values()]
        return inputs, locations, subspace_indices(subspaces, batch, ranks)

    def forward(self, base: Any = None, sources: Any = None, unit_locations: Any = None,
                source_representations: Any = None, subspaces: Any = None, labels: torch.Tensor | None = None,
                output_original_output: bool = False, return_dict: bool | None = None, use_cache: bool | None = None,
                intervention_additional_kwargs: Any = None, **kwargs: Any) -> Any:
        """pyvene's call: ``base`` is the inputs dict; returns ``(original or None, intervened)``. Called with
        ``input_ids=...`` instead, it is :meth:`reftkit.ReftModel.forward`."""
        extra = {k: v for k, v in (("labels", labels), ("use_cache", use_cache), ("return_dict", return_dict))
                 if v is not None}
        if not isinstance(base, Mapping):
            if unit_locations is not None:
                raise TypeError("unit_locations= goes with pyvene's call form, reft_model(base_dict, "
                                "unit_locations=...); with input_ids=... pass intervention_locations= ([B, K, P])")
            return super().forward(base, sources=sources, subspaces=subspaces, **extra, **kwargs)
        if kwargs:
            raise TypeError(f"reft_model(base, ...) got unexpected arguments {sorted(kwargs)}; model inputs go in "
                            "the base dict")
        extra.pop("return_dict", None)
        inputs, locations, subspace_index = self._pyvene_inputs(base, unit_locations, subspaces, sources,
                                                                source_representations, intervention_additional_kwargs)
        original = self.model(**inputs) if output_original_output else None
        intervened = super().forward(input_ids=inputs.pop("input_ids", None),
                                     attention_mask=inputs.pop("attention_mask", None),
                                     intervention_locations=locations, subspaces=subspace_index, **inputs, **extra)
        if return_dict:
            return IntervenableModelOutput(original_outputs=original, intervened_outputs=intervened)
        return original, intervened

    @torch.no_grad()
    def generate(self, base: Any = None, sources: Any = None, unit_locations: Any = None,
                 source_representations: Any = None, intervene_on_prompt: bool = False, subspaces: Any = None,
                 output_original_output: bool = False, intervention_additional_kwargs: Any = None,
                 **kwargs: Any) -> Any:
        """pyvene's generate: returns ``(original or None, generated ids)``.

        ``intervene_on_prompt=True`` edits the prompt at ``unit_locations`` (every prompt position and every
        new token when ``unit_locations`` is None); ``False`` (pyvene's default) edits each generated
        token and not the prompt. Called with ``input_ids=...`` instead, it is :meth:`reftkit.ReftModel.generate`.
        """
        if not isinstance(base, Mapping):
            if unit_locations is not None or intervene_on_prompt:
                raise TypeError("unit_locations= / intervene_on_prompt= go with pyvene's call form, "
                                "reft_model.generate(base_dict, unit_locations=..., intervene_on_prompt=True); "
                                "with input_ids=... pass intervention_locations= ([B, K, P])")
            return super().generate(base, sources=sources, subspaces=subspaces, **kwargs)
        inputs, locations, subspace_index = self._pyvene_inputs(base, unit_locations, subspaces, sources,
                                                                source_representations, intervention_additional_kwargs)
        if intervene_on_prompt:
            new_tokens = unit_locations is None
        else:
            if unit_locations is not None and bool((locations > 0).any()):
                raise ValueError("intervene_on_prompt=False edits each generated token only, at position 0 of each "
                                 "decoding step (pyvene's rule), so unit_locations other than 0 cannot apply; pass "
                                 "intervene_on_prompt=True to edit the prompt at these positions")
            locations = torch.full_like(locations[..., :1], -1)
            new_tokens = True
        original = self.model.generate(**inputs, **kwargs) if output_original_output else None
        generated = super().generate(input_ids=inputs.pop("input_ids", None),
                                     attention_mask=inputs.pop("attention_mask", None),
                                     intervention_locations=locations, subspaces=subspace_index,
                                     edit_new_tokens=new_tokens, **inputs, **kwargs)
        return original, generated

    # -- pyreft's bookkeeping -------------------------------------------------------------
    @property
    def sorted_keys(self) -> list[str]:
        """pyvene's name for the intervention keys in order (the K axis of the locations)."""
        return list(self.interventions)

    def set_device(self, device: str | torch.device, set_model: bool = True) -> None:
        """Move the interventions (and the model, unless ``set_model=False``) to ``device``."""
        self.interventions.to(device)
        if set_model:
            self.model.to(device)

    def get_device(self) -> torch.device:
        return self.device

    def _unique_interventions(self) -> list[nn.Module]:
        return list({id(iv): iv for iv in self.interventions.values()}.values())

    def count_parameters(self, include_model: bool = False) -> int:
        """Trainable intervention parameters (a shared intervention once), plus the model's trainable ones."""
        total = sum(p.numel() for iv in self._unique_interventions() for p in iv.parameters() if p.requires_grad)
        if include_model:
            total += sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return total

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for iv in self._unique_interventions() for p in iv.parameters()]
        return params + [p for p in self.model.parameters() if p.requires_grad]

    def disable_model_gradients(self) -> None:
        """Freeze the base model and put it in eval mode (pyvene's behaviour)."""
        self.model.eval()
        self.model.requires_grad_(False)
        self.model_has_grad = False

    def enable_model_gradients(self) -> None:
        """Unfreeze every base-model weight and put it in train mode (pyvene's behaviour)."""
        self.model.train()
        self.model.requires_grad_(True)
        self.model_has_grad = True

    def save(self, save_directory: str | Path, save_to_hf_hub: bool = False, hf_repo_name: str | None = None,
             include_model: bool = False) -> Path:
        """Write pyreft's folder format (``config.json``, ``intkey_<key>.bin``; ``pytorch_model.bin`` with the
        model's trainable weights when ``include_model``), readable by pyreft 0.1.0 and by :meth:`load`."""
        _refuse("save_to_hf_hub", save_to_hf_hub, "save locally, then upload the folder with huggingface_hub")
        return save_pyreft_folder(self, save_directory, include_model=include_model)

    def save_intervention(self, save_directory: str | Path, include_model: bool = True) -> Path:
        """pyvene's ``save_intervention``: :meth:`save` with the model's trainable weights by default."""
        return self.save(save_directory, include_model=include_model)

    def load_intervention(self, load_directory: str | Path, include_model: bool = True) -> None:
        """pyvene's ``load_intervention``: read the weights a :meth:`save` wrote into this model, in place."""
        load_into(self, load_directory, include_model=include_model)

    @staticmethod
    def load(load_directory: str | Path, model: nn.Module, local_directory: str | None = None,
             from_huggingface_hub: bool = False, include_model: bool = False) -> "ReftModel":
        """Rebuild a model saved by :meth:`save` or by pyreft itself on ``model`` (a local folder)."""
        _refuse("from_huggingface_hub", from_huggingface_hub, "download the folder first (huggingface_hub."
                "snapshot_download) and pass its path")
        _refuse("local_directory", local_directory, "pass the local folder as load_directory")
        return load_pyreft_folder(ReftModel, load_directory, model, include_model=include_model)


def get_reft_model(model: nn.Module, reft_config: ReftConfig | Mapping[str, Any] | list, set_device: bool = True,
                   disable_model_grads: bool = True) -> ReftModel:
    """pyreft's ``get_reft_model``: wrap ``model`` (a Hugging Face model, or a peft model) with the config's
    interventions. As in pyreft, whose constructor already does both, the interventions are on the model's
    device and the model is frozen and in eval mode whatever the two flags say; re-enable what you train
    yourself, e.g. ``reft_model.model.enable_adapter_layers()`` for peft's LoRA."""
    if isinstance(reft_config, ReftModel):
        raise TypeError("get_reft_model(model, reft_config): the second argument is the ReftConfig")
    return ReftModel(reft_config, model)
