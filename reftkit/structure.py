"""Find intervention sites in Hugging Face transformers by structure.

``resolve_site(model, layer, component)`` maps one of pyvene's component names
(or a raw module path) to the module to hook, the hook kind and the width the
intervention sees.  Modules are found by walking the model and matching the
names transformers uses across families (``self_attn``/``attn``/``attention``,
``mlp``/``feed_forward``, ``q_proj``/``query`` ...), so the same code covers
Llama, Mistral, Qwen2/3, Gemma/Gemma2, GPT-2, GPT-NeoX, Phi3, OPT, BERT, RoBERTa
and most of their relatives.  Nothing here runs the model, so it also works
on a model built on the ``meta`` device.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .anatomy import (
    ACTIVATION_NAMES,
    ATTENTION_NAMES,
    CROSS_ATTENTION_NAMES,
    DOWN_PROJECTION_NAMES,
    FUSED_QKV_NAMES,
    KEY_NAMES,
    MLP_NAMES,
    OUTPUT_PROJECTION_NAMES,
    QUERY_NAMES,
    UP_PROJECTION_NAMES,
    VALUE_NAMES,
    FusedSlice,
    Site,
    StructureError,
    arch_name,
    config_int,
    feature_sizes,
    feature_sizes_at,
    find_layers,
    find_part,
    hidden_size,
    is_activation,
    is_encoder_decoder,
    num_layers,
    stack_root,
    text_config,
)

__all__ = ["COMPONENTS", "CROSS_COMPONENTS", "HEAD_COMPONENTS", "FusedSlice", "Site", "StructureError", "find_layers",
           "num_layers", "hidden_size", "resolve_site", "is_encoder_decoder", "stack_root"]

COMPONENTS: tuple[str, ...] = (
    "block_input", "block_output", "mlp_input", "mlp_activation", "mlp_output",
    "attention_input", "attention_output", "attention_value_output",
    "query_output", "key_output", "value_output",
)
#: a decoder block's cross-attention (encoder-decoder models, ``stack="decoder"``): as the self-attention ones;
#: ``cross_key_output`` / ``cross_value_output`` run along the encoder's sequence, so their positions count over it
CROSS_COMPONENTS: tuple[str, ...] = (
    "cross_attention_input", "cross_attention_output", "cross_attention_value_output",
    "cross_query_output", "cross_key_output", "cross_value_output",
)
#: head-level components: the per-head view of a q/k/v projection output or of the attention
#: output projection's input; k/v count key-value heads (fewer under GQA/MQA), the others query heads
HEAD_COMPONENTS: tuple[str, ...] = (
    "head_query_output", "head_key_output", "head_value_output", "head_attention_value_output",
)

# Fused q|k|v columns laid out per head ([q_h | k_h | v_h] for each head h), as in
# GPTNeoXAttention.forward: qkv.view(..., n_heads, 3 * head_dim).chunk(3, dim=-1).
_INTERLEAVED_QKV = frozenset({"gpt_neox", "gpt_neox_japanese", "bloom"})
# Fused layouts that are neither contiguous [q|k|v] nor per-head interleaved.
_UNSUPPORTED_QKV = {
    "codegen": "its qkv_proj is split into model-parallel shards with a permuted q|v|k order",
    "falcon": "its query_key_value layout depends on multi_query/new_decoder_architecture",
}


def _normalise_layer(model: nn.Module, layer: int, n: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise StructureError(f"layer={layer!r} must be an int")
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise StructureError(
            f"layer={layer} is out of range: this {arch_name(model)} has {n} layers (0..{n - 1})")
    return idx


# ----------------------------------------------------------------------------- raw paths

def _submodule(model: nn.Module, path: str, spec: str) -> nn.Module:
    module, walked = model, []
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            where = ".".join(walked) or "<root>"
            kids = ", ".join(module._modules) or "none"
            raise StructureError(
                f"component={spec!r}: module path {path!r} does not exist; nearest existing "
                f"prefix is {where!r} ({type(module).__name__}), whose children are: {kids}")
        module = child
        walked.append(part)
    return module


def _check_runs(module: nn.Module, path: str, spec: str) -> None:
    """Refuse a module whose forward is ``nn.Module``'s unimplemented one (``ModuleList``, ``ModuleDict``, a
    bare ``nn.Module`` grouping children): the model never calls it, so its hooks never fire and an
    intervention there would train parameters with no effect.

    Not detected: a module that has a forward but that the model's forward never calls (an unused
    sub-module, a head the task does not run). Only running the model shows that, and attaching runs nothing.
    """
    if type(module).forward is not nn.Module.forward:
        return
    kids = list(module._modules)
    if kids and all(k.isdigit() for k in kids):
        hint = f"{path + '.{layer}'!r} with layer=..., or one element such as {path + '.' + kids[0]!r}"
    elif kids:
        hint = f"one of its children: {', '.join(repr(path + '.' + k) for k in kids[:6])}"
    else:
        hint = "a module the model calls"
    raise StructureError(
        f"component={spec!r}: {path!r} is a {type(module).__name__}, a container the model never calls (it has no "
        f"forward of its own), so a hook there would never run; give {hint}")


def _raw_site(model: nn.Module, layer: int | None, spec: str, stack: str | None = None) -> Site:
    path, hook = spec, "output"
    if ":" in spec:
        path, hook = spec.rsplit(":", 1)
        if hook not in ("input", "output"):
            raise StructureError(f"component={spec!r}: suffix {':' + hook!r} must be ':input' or ':output'")
    if layer is not None:
        try:
            layer = _normalise_layer(model, layer, num_layers(model, stack))
        except StructureError as err:
            # Not a transformer we recognise: the path still works, but without a
            # layer count there is no end to count back from.
            if "layer stack" not in str(err):
                raise
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise StructureError(f"layer={layer!r} must be a non-negative int: {err}") from None
    if "{layer}" in path:
        if layer is None:
            raise StructureError(f"component={spec!r} contains '{{layer}}' but layer=None")
        path = path.replace("{layer}", str(layer))
    module = _submodule(model, path, spec)
    _check_runs(module, path, spec)
    if isinstance(module, nn.Embedding) and hook == "input":
        raise StructureError(f"component={spec!r}: an embedding's input is token ids, which have "
                             "no feature dimension to intervene on; use ':output'")
    io = feature_sizes(module)
    width = (io[0] if hook == "input" else io[1]) if io else hidden_size(model)
    return Site(layer, spec, path, hook, width)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- named components

def _unavailable(model: nn.Module, component: str, why: str) -> StructureError:
    return StructureError(f"{component} is not available for {arch_name(model)}: {why}")


def _qkv_site(model: nn.Module, layer: int, component: str, attn_path: str,
              attn: nn.Module, o_rel: str | None) -> Site:
    names = {"query_output": QUERY_NAMES, "key_output": KEY_NAMES, "value_output": VALUE_NAMES}[component]
    rel = find_part(attn, names)
    if rel is not None:
        io = feature_sizes(attn.get_submodule(rel))
        if io is None:
            raise _unavailable(model, component, f"{attn_path}.{rel} is not a Linear/Conv1D")
        return Site(layer, component, f"{attn_path}.{rel}", "output", io[1])
    rel = find_part(attn, FUSED_QKV_NAMES)
    if rel is None:
        raise _unavailable(model, component, f"no q/k/v or fused qkv projection under {attn_path}")
    path, io = f"{attn_path}.{rel}", feature_sizes(attn.get_submodule(rel))
    model_type = getattr(text_config(model), "model_type", None)
    which = ("query_output", "key_output", "value_output").index(component)
    if model_type in _UNSUPPORTED_QKV:
        raise _unavailable(model, component, f"{path} is fused and {_UNSUPPORTED_QKV[model_type]}; "
                           "hook it with a raw path instead")
    if io is None:
        raise _unavailable(model, component, f"{path} is not a Linear/Conv1D")
    total = io[1]
    if model_type in _INTERLEAVED_QKV:
        heads = config_int(model, "num_attention_heads", "n_head")
        if not heads or total % (3 * heads):
            raise _unavailable(model, component, f"cannot split {path} ({total} columns) per head")
        hd = total // (3 * heads)
        return Site(layer, component, path, "output", heads * hd,
                    FusedSlice(heads, 3 * hd, which * hd, (which + 1) * hd))
    if rel.endswith("query_key_value"):
        raise _unavailable(model, component, f"the column layout of {path} for model_type="
                           f"{model_type!r} is not known; hook it with a raw path instead")
    # Contiguous [q | k | v]: q is as wide as the attention output (n_heads*head_dim),
    # k and v share the rest equally (they are narrower under GQA/MQA).
    o_io = feature_sizes_at(attn, o_rel)
    q = o_io[0] if o_io else hidden_size(model)
    if (total - q) <= 0 or (total - q) % 2:
        raise _unavailable(model, component, f"{path} has {total} columns, which do not split into "
                           f"q={q} plus two equal k/v parts")
    kv = (total - q) // 2
    bounds = [(0, q), (q, q + kv), (q + kv, total)][which]
    return Site(layer, component, path, "output", bounds[1] - bounds[0],
                FusedSlice(1, total, bounds[0], bounds[1]))


def _head_site(model: nn.Module, layer: int, component: str, heads: list[int] | tuple[int, ...] | None,
               stack: str | None = None) -> Site:
    base = resolve_site(model, layer, component[len("head_"):], stack=stack)
    kv = component in ("head_key_output", "head_value_output")
    n_query = (config_int(model, "decoder_attention_heads") if stack == "decoder" else None) or config_int(
        model, "num_attention_heads", "n_head", "num_heads")
    n_heads = (config_int(model, "num_key_value_heads", "multi_query_group_num") or n_query) if kv else n_query
    if not n_heads:
        raise _unavailable(model, component, "its config gives no num_attention_heads")
    if base.width % n_heads:
        raise _unavailable(model, component, f"{base.module_path} has width {base.width}, not a multiple of "
                           f"{n_heads} heads")
    kind = "key/value heads" if kv else "attention heads"
    if not heads:
        raise StructureError(f"component={component!r} needs heads=[...] (this layer has {n_heads} {kind})")
    bad = [h for h in heads if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < n_heads]
    if bad:
        raise StructureError(f"heads={list(heads)!r}: head {bad[0]!r} is out of range; {component} of "
                             f"{arch_name(model)} has {n_heads} {kind} (0..{n_heads - 1})")
    return Site(base.layer, component, base.module_path, base.hook, base.width // n_heads, base.fused,
                tuple(heads), n_heads)


def resolve_site(model: nn.Module, layer: int | None, component: str,
                 heads: list[int] | tuple[int, ...] | None = None, stack: str | None = None) -> Site:
    """Resolve ``(layer, component)`` to a :class:`Site`.

    ``layer`` may be negative (``-1`` is the last block); ``Site.layer`` is the
    normalised index.  Components (pyvene's names):

    * ``block_input`` / ``block_output``: input / output of the block.
    * ``attention_input`` / ``attention_output``: input / output of the
      self-attention module.  In post-norm encoders (BERT, RoBERTa, ELECTRA) the
      attention module also adds the residual and applies LayerNorm; there
      ``attention_output`` is the output of its projection (``attention.output.dense``),
      i.e. the attention's contribution before residual/LayerNorm, like ``mlp_output``.
    * ``attention_value_output``: input of the attention output projection
      (the concatenated per-head attention results).
    * ``query_output`` / ``key_output`` / ``value_output``: outputs of the q/k/v
      projections (before rotary embeddings or q/k norms); for fused projections
      ``Site.fused`` selects the columns.  k/v are narrower under GQA.
    * ``mlp_input`` / ``mlp_output``: input / output of the MLP module.  Where a
      block has no single MLP module (OPT: ``fc1``/``fc2``; BERT/RoBERTa:
      ``intermediate``/``output``) these are the input of the first MLP linear and
      the output of the last MLP linear, before residual/LayerNorm.  OPT flattens
      tokens around its MLP, so there these tensors are ``[batch*seq, width]``.
    * ``mlp_activation``: output of the activation module (``act_fn``, ``act``,
      ``activation_fn``, ``intermediate_act_fn``); width is the down projection's
      input size.  For gated MLPs this is ``act(gate)``, before the ``* up``.

    * ``head_query_output`` / ``head_key_output`` / ``head_value_output`` /
      ``head_attention_value_output``: the same tensors viewed per head, ``heads``
      selecting which (GQA-aware: k/v index key-value heads, q and the attention value
      output index query heads); the intervention's width is ``head_dim``.

    * ``cross_attention_input`` / ``cross_attention_output`` / ``cross_attention_value_output`` /
      ``cross_query_output`` / ``cross_key_output`` / ``cross_value_output``: the same for a decoder
      block's cross-attention (encoder-decoder models, ``stack="decoder"``); its keys and values are
      projections of the encoder's output, so their positions count over the encoder input.

    A component containing ``"."`` is a module path from the model root, with an
    optional ``{layer}`` placeholder and ``:input``/``:output`` suffix (default
    output), e.g. ``"model.layers.{layer}.mlp.down_proj:input"``.

    ``stack``: for an encoder-decoder model (T5, BART, mT5 ...), ``"encoder"`` or ``"decoder"``, the stack
    ``layer`` counts in (required there; refused on a decoder-only model). A raw path's positions count over
    the named stack's sequence.
    """
    stack_root(model, stack)  # the stack exists (or is rightly absent) before anything else is read
    site = _resolve(model, layer, component, heads, stack)
    if "." not in component:  # a raw path was checked as it was walked
        _check_runs(model.get_submodule(site.module_path), site.module_path, component)
    if stack is None:
        return site
    encoder_side = stack == "encoder" or component in ("cross_key_output", "cross_value_output")
    return replace(site, stack=stack, sequence="encoder" if encoder_side else "decoder")


def _resolve(model: nn.Module, layer: int | None, component: str,
             heads: list[int] | tuple[int, ...] | None, stack: str | None = None,
             attention_names: tuple[str, ...] = ATTENTION_NAMES) -> Site:
    if not isinstance(component, str):
        raise StructureError(f"component={component!r} must be a str")
    if "." in component:
        return _raw_site(model, layer, component, stack)
    if component in HEAD_COMPONENTS:
        return _head_site(model, layer, component, heads, stack)
    if component in CROSS_COMPONENTS:
        if stack != "decoder":
            raise StructureError(f"component={component!r} is a decoder block's cross-attention over the encoder's "
                                 f"output; it needs stack='decoder' (an encoder-decoder model), not stack={stack!r}")
        site = _resolve(model, layer, component[len("cross_"):], heads, stack, CROSS_ATTENTION_NAMES)
        return replace(site, component=component)
    if component not in COMPONENTS:
        known = COMPONENTS + HEAD_COMPONENTS + (CROSS_COMPONENTS if stack == "decoder" else ())
        raise StructureError(
            f"component={component!r} is not known; choose one of {', '.join(known)}, "
            "or give a module path containing '.', e.g. 'model.layers.{layer}.mlp:input'")
    if layer is None:
        raise StructureError(f"layer=None is only allowed with a raw module path, not component={component!r}")
    layers_path, layers = find_layers(model, stack)
    layer = _normalise_layer(model, layer, len(layers))
    block_path = f"{layers_path}.{layer}" if layers_path else str(layer)
    block = layers[layer]
    hidden = hidden_size(model)

    if component in ("block_input", "block_output"):
        return Site(layer, component, block_path, "input" if component == "block_input" else "output", hidden)

    attn_rel = find_part(block, attention_names)
    if component.startswith(("attention", "query", "key", "value")):
        if attn_rel is None:
            kind = "cross-attention" if attention_names is CROSS_ATTENTION_NAMES else "self-attention"
            raise _unavailable(model, component, f"no {kind} module ({'/'.join(attention_names)}) in {block_path}")
        attn_path, attn = f"{block_path}.{attn_rel}", block.get_submodule(attn_rel)
        o_rel = find_part(attn, OUTPUT_PROJECTION_NAMES)
        o_io = feature_sizes_at(attn, o_rel)
        if component in ("query_output", "key_output", "value_output"):
            return _qkv_site(model, layer, component, attn_path, attn, o_rel)
        if component == "attention_input":
            p_io = feature_sizes_at(attn, find_part(attn, QUERY_NAMES + FUSED_QKV_NAMES))
            return Site(layer, component, attn_path, "input", p_io[0] if p_io else hidden)
        if o_rel is None or o_io is None:
            if component == "attention_output":
                return Site(layer, component, attn_path, "output", hidden)
            names = "/".join(OUTPUT_PROJECTION_NAMES)
            raise _unavailable(model, component, f"no attention output projection ({names}) under {attn_path}")
        if component == "attention_value_output":
            return Site(layer, component, f"{attn_path}.{o_rel}", "input", o_io[0])
        # A projection nested below the attention module (BERT's attention.output.dense)
        # means the module's own output is already residual + LayerNorm.
        path = f"{attn_path}.{o_rel}" if "." in o_rel else attn_path
        return Site(layer, component, path, "output", o_io[1])

    # MLP components.  Without a single MLP module, search the block itself but
    # never inside the attention module.
    skip = tuple(p for p in (attn_rel, find_part(block, CROSS_ATTENTION_NAMES)) if p)
    mlp_rel = find_part(block, MLP_NAMES, skip)
    root = block.get_submodule(mlp_rel) if mlp_rel else block
    root_path = f"{block_path}.{mlp_rel}" if mlp_rel else block_path
    root_skip = () if mlp_rel else skip
    down_rel = find_part(root, DOWN_PROJECTION_NAMES, root_skip)
    down_io = feature_sizes_at(root, down_rel)
    if component == "mlp_activation":
        act_rel = find_part(root, ACTIVATION_NAMES, root_skip) or next(
            (p for p, m in root.named_modules() if p and is_activation(m)
             and not any(p == s or p.startswith(s + ".") for s in root_skip)), None)
        if act_rel is None:
            raise _unavailable(model, component,
                               f"no activation module ({'/'.join(ACTIVATION_NAMES)}) under {root_path}")
        if down_io is None:
            raise _unavailable(model, component,
                               f"no down projection ({'/'.join(DOWN_PROJECTION_NAMES)}) under {root_path}")
        return Site(layer, component, f"{root_path}.{act_rel}", "output", down_io[0])
    up_rel = find_part(root, UP_PROJECTION_NAMES, root_skip)
    up_io = feature_sizes_at(root, up_rel)
    if mlp_rel is not None:
        if component == "mlp_input":
            return Site(layer, component, root_path, "input", up_io[0] if up_io else hidden)
        return Site(layer, component, root_path, "output", down_io[1] if down_io else hidden)
    if component == "mlp_input":
        if up_io is None:
            raise _unavailable(model, component,
                               f"no MLP module ({'/'.join(MLP_NAMES)}) or first MLP linear in {block_path}")
        return Site(layer, component, f"{block_path}.{up_rel}", "input", up_io[0])
    if down_io is None:
        raise _unavailable(model, component,
                           f"no MLP module ({'/'.join(MLP_NAMES)}) or last MLP linear in {block_path}")
    return Site(layer, component, f"{block_path}.{down_rel}", "output", down_io[1])
