"""FSDP support for :class:`~reftkit.training.ReftTrainer`: which FSDP setups can train a ReftModel, and
how the sharded trained tensors are saved and loaded.

Under FSDP2 (``fully_shard``) every parameter is a ``DTensor`` holding this rank's shard outside the
forward. The interventions (and a classifier head) are a few small tensors: saving gathers just them
(:func:`full_parameters`), never the frozen base as ``accelerator.get_state_dict`` would, and loading
cuts each rank's shard out of the full tensors (:func:`loading_into_shards`). In both, the modules'
own ``save_pretrained`` / ``load_state_dict`` code runs unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

# Why FSDP1 is refused rather than supported for some dtypes only. FSDP1 flattens every module it does
# not wrap separately into the root FlatParameter: the interventions land there with the embeddings,
# final norm and LM head, and a FlatParameter must have one dtype, so a bf16/fp16 base fails ("Must
# flatten tensors with uniform dtype") while the interventions stay float32. They cannot get FSDP1 units
# of their own either: FSDP1 unshards a unit only when its wrapper's forward runs, and the hooks call
# the intervention modules themselves.
FSDP1_REFUSED = ("ReftTrainer supports FSDP2 only, got fsdp_config['version']=1 (FSDP1): FSDP1 flattens the "
                 "float32 interventions into one FlatParameter with the unwrapped base modules (embeddings, "
                 "final norm, LM head), which fails for a bf16/fp16 base, and it cannot shard them separately "
                 "because reftkit's hooks call them directly. Use fsdp_config={'version': 2} (the default; "
                 "accelerate config: fsdp_version: 2)")


def check_fsdp_plugin(plugin: Any, base: nn.Module) -> None:
    """Refuse FSDP setups that cannot train a ReftModel; default the sharded layers to the base model's.

    ``plugin``: accelerate's ``FullyShardedDataParallelPlugin`` (built from ``TrainingArguments.fsdp`` /
    ``fsdp_config`` or from ``accelerate launch``'s config); ``base``: the Hugging Face model under the
    interventions.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(FSDP1_REFUSED)
    if plugin.activation_checkpointing:
        # FSDP's checkpoint wrapper re-runs the layers in backward, after ReftModel has dropped the
        # call's positions (it keeps them only for the base model's own checkpointing): torch then
        # raises CheckpointError, "A different number of tensors was saved ...".
        raise ValueError("ReftTrainer does not support fsdp_config['activation_checkpointing']=True (FSDP's own "
                         "checkpoint wrapper; accelerate config fsdp_activation_checkpointing): set "
                         "TrainingArguments(activation_checkpointing=True) instead, which checkpoints the base "
                         "model's layers and works under FSDP")
    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    if plugin.transformer_cls_names_to_wrap is None:
        # accelerate takes the default from the prepared model's `_no_split_modules`, which a ReftModel
        # lacks: the whole model would be one FSDP unit, gathered at once in every forward.
        names = getattr(base, "_no_split_modules", None)
        if names:
            plugin.transformer_cls_names_to_wrap = sorted(names)
        return
    # Units whose own forward never runs are never gathered: reftkit calls the base model's decoder
    # and head (and the interventions) directly, not the top-level model or the ModuleDict.
    never_called = {type(base).__name__, "ReftModel", "ModuleDict"}
    bad = sorted(never_called & set(plugin.transformer_cls_names_to_wrap))
    if bad:
        default = sorted(getattr(base, "_no_split_modules", None) or [])
        raise ValueError(f"fsdp_config['transformer_layer_cls_to_wrap'] names {bad}: ReftTrainer never calls the "
                         "forward of such a module (it runs the decoder, the head and the interventions "
                         "directly), so FSDP would never gather its parameters; name the decoder layer class "
                         f"(default: the base model's _no_split_modules, {default})")


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support: nothing can be sharded
        return None
    return DTensor


def _reshard(modules: Sequence[nn.Module]) -> None:
    """Put every FSDP2 unit above or in ``modules`` back in its sharded state.

    A unit left unsharded (e.g. the root after an evaluation forward) would be resharded by its own
    state-dict hook in the middle of ``state_dict()``, replacing the full tensors set here.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()


def _sharded(module: nn.Module, dtensor: type) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module._parameters.items() if isinstance(p, dtensor)}


@contextlib.contextmanager
def full_parameters(modules: Sequence[nn.Module], root: nn.Module | None = None) -> Iterator[None]:
    """Inside the block, every ``DTensor`` parameter of ``modules`` is an ordinary parameter holding the
    full tensor, so ``state_dict`` / ``save_pretrained`` read it unchanged. For reading only: the
    originals come back on exit, and anything written to the stand-ins is lost.

    Every rank must enter the block (the gathers are collectives), in the same order; parameters that
    are not sharded (no FSDP, or DDP) are left alone, so the block is free there. ``root``: the FSDP2
    root module, resharded first so that its state-dict hooks find nothing to reshard.
    """
    dtensor = _dtensor_type()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    if dtensor is not None:
        _reshard([root] if root is not None else modules)
        for module in modules:
            for sub in module.modules():
                for name, param in _sharded(sub, dtensor).items():
                    full = param.detach().full_tensor().clone()  # clone: a plain tensor, not a collective's
                    sub._parameters[name] = nn.Parameter(full, requires_grad=param.requires_grad)
                    swapped.append((sub, name, param))
    try:
        yield
    finally:
        for sub, name, param in swapped:
            sub._parameters[name] = param


@contextlib.contextmanager
def loading_into_shards(modules: Sequence[nn.Module], root: nn.Module | None = None) -> Iterator[None]:
    """Inside the block, ``load_state_dict`` of a full tensor into a ``DTensor`` parameter of ``modules``
    keeps this rank's shard of it, so the ordinary loaders work on a sharded model.

    Every rank must load the same full tensors (each reads the same file); the shard is cut locally,
    without communication. The parameters stay the same objects: FSDP2 keeps references to them.
    ``root`` as in :func:`full_parameters`: an unsharded unit would show plain tensors here, then
    reshard to ``DTensor`` ones in its own pre-load hook.
    """
    dtensor = _dtensor_type()
    handles = []
    if dtensor is not None:
        from torch.distributed.tensor import distribute_tensor

        _reshard([root] if root is not None else modules)

        def to_shards(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            for name, param in _sharded(module, dtensor).items():
                value = state_dict.get(prefix + name)
                # a wrong shape is left for load_state_dict to report with its own message
                if torch.is_tensor(value) and not isinstance(value, dtensor) and value.shape == param.shape:
                    state_dict[prefix + name] = distribute_tensor(
                        value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements,
                        src_data_rank=None)

        for module in modules:
            for sub in module.modules():
                if _sharded(sub, dtensor):
                    handles.append(sub.register_load_state_dict_pre_hook(to_shards))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
