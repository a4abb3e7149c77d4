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

from torch import Tensor, nn

from .sites import FusedSlice, Site, StructureError

__all__ = ["COMPONENTS", "HEAD_COMPONENTS", "FusedSlice", "Site", "StructureError", "find_layers",
           "num_layers", "hidden_size", "resolve_site"]

COMPONENTS: tuple[str, ...] = (
    "block_input", "block_output", "mlp_input", "mlp_activation", "mlp_output",
    "attention_input", "attention_output", "attention_value_output",
    "query_output", "key_output", "value_output",
)
#: head-level components: the per-head view of a q/k/v projection output or of the attention
#: output projection's input; k/v count key-value heads (fewer under GQA/MQA), the others query heads
HEAD_COMPONENTS: tuple[str, ...] = (
    "head_query_output", "head_key_output", "head_value_output", "head_attention_value_output",
)

_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn", "mlp_block")
_Q = ("q_proj", "query", "wq", "query_proj", "q")
_K = ("k_proj", "key", "wk", "key_proj", "k")
_V = ("v_proj", "value", "wv", "value_proj", "v")
_FUSED = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
_O = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
# Entries with a dot are path suffixes: BERT splits its MLP over two sub-modules.
_UP = ("gate_up_proj", "gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h", "fc_in",
       "w1", "wi", "intermediate.dense")
_DOWN = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "w2", "wo", "output.dense")
_ACT = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation", "act_layer")
# Fused q|k|v columns laid out per head ([q_h | k_h | v_h] for each head h), as in
# GPTNeoXAttention.forward: qkv.view(..., n_heads, 3 * head_dim).chunk(3, dim=-1).
_INTERLEAVED_QKV = frozenset({"gpt_neox", "gpt_neox_japanese", "bloom"})
# Fused layouts that are neither contiguous [q|k|v] nor per-head interleaved.
_UNSUPPORTED_QKV = {
    "codegen": "its qkv_proj is split into model-parallel shards with a permuted q|v|k order",
    "falcon": "its query_key_value layout depends on multi_query/new_decoder_architecture",
}


# ----------------------------------------------------------------------------- helpers

def _arch(model: nn.Module) -> str:
    return type(model).__name__


def _config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        # Multimodal wrappers keep the decoder sizes in a text sub-config.
        cfg = cfg.get_text_config()
    return cfg


def _cfg_int(model: nn.Module, *names: str) -> int | None:
    cfg = _config(model)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _io(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) feature sizes read from attributes, so meta tensors work too."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "nx"):  # transformers' Conv1D (weight [nx, nf])
        return int(module.nx), int(module.nf)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1], module.normalized_shape[-1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:  # RMSNorm-style
        return weight.shape[0], weight.shape[0]
    return None


def _io_at(root: nn.Module, rel: str | None) -> tuple[int, int] | None:
    return _io(root.get_submodule(rel)) if rel else None


def _find(root: nn.Module, names: tuple[str, ...], skip: tuple[str, ...] = ()) -> str | None:
    """Shallowest descendant whose path ends with one of ``names`` (earlier names win ties).

    ``skip`` prunes subtrees, e.g. the attention module when looking for MLP parts,
    so that BERT's ``attention.output.dense`` is never taken for the MLP's.
    """
    best: tuple[int, int, str] | None = None
    for path, _ in root.named_modules():
        if not path or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        for rank, name in enumerate(names):
            if path == name or path.endswith("." + name):
                key = (path.count("."), rank, path)
                if best is None or key < best:
                    best = key
                break
    return None if best is None else best[2]


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in ("transformers.activations", "torch.nn.modules.activation")


# ----------------------------------------------------------------------------- layers

def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ``nn.ModuleList`` of decoder/encoder blocks.

    Preference order: a list whose length equals the config's layer count, whose
    children share one class and contain an attention module; relaxing those
    checks one at a time; finally (no config, or pruned layers) the longest
    homogeneous list of blocks with an attention module.
    """
    want = _cfg_int(model, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]

    def homogeneous(ml: nn.ModuleList) -> bool:
        return len({type(c) for c in ml}) == 1

    def has_attention(ml: nn.ModuleList) -> bool:
        return _find(ml[0], _ATTN) is not None

    sized = [(p, m) for p, m in lists if len(m) == want]
    for pick in ([x for x in sized if homogeneous(x[1]) and has_attention(x[1])],
                 [x for x in sized if homogeneous(x[1])], sized):
        if pick:
            return pick[0]
    pick = [x for x in lists if homogeneous(x[1]) and has_attention(x[1])]
    if pick:
        return max(pick, key=lambda x: len(x[1]))
    seen = ", ".join(f"{p or '<root>'}[{len(m)}]" for p, m in lists) or "none"
    raise StructureError(
        f"could not find the layer stack of {_arch(model)}: no nn.ModuleList with "
        f"num_hidden_layers={want} blocks (ModuleLists found: {seen})")


def num_layers(model: nn.Module) -> int:
    """Number of blocks in the layer stack returned by :func:`find_layers`."""
    return len(find_layers(model)[1])


def hidden_size(model: nn.Module) -> int:
    """Residual-stream width: from the config, else the input embedding width."""
    size = _cfg_int(model, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    if size is not None:
        return size
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    raise StructureError(f"cannot tell the hidden size of {_arch(model)}: no hidden_size in its config")


def _normalise_layer(model: nn.Module, layer: int, n: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise StructureError(f"layer={layer!r} must be an int")
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise StructureError(
            f"layer={layer} is out of range: this {_arch(model)} has {n} layers (0..{n - 1})")
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


def _raw_site(model: nn.Module, layer: int | None, spec: str) -> Site:
    path, hook = spec, "output"
    if ":" in spec:
        path, hook = spec.rsplit(":", 1)
        if hook not in ("input", "output"):
            raise StructureError(f"component={spec!r}: suffix {':' + hook!r} must be ':input' or ':output'")
    if layer is not None:
        try:
            layer = _normalise_layer(model, layer, num_layers(model))
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
    if isinstance(module, nn.Embedding) and hook == "input":
        raise StructureError(f"component={spec!r}: an embedding's input is token ids, which have "
                             "no feature dimension to intervene on; use ':output'")
    io = _io(module)
    width = (io[0] if hook == "input" else io[1]) if io else hidden_size(model)
    return Site(layer, spec, path, hook, width)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- named components

def _unavailable(model: nn.Module, component: str, why: str) -> StructureError:
    return StructureError(f"{component} is not available for {_arch(model)}: {why}")


def _qkv_site(model: nn.Module, layer: int, component: str, attn_path: str,
              attn: nn.Module, o_rel: str | None) -> Site:
    names = {"query_output": _Q, "key_output": _K, "value_output": _V}[component]
    rel = _find(attn, names)
    if rel is not None:
        io = _io(attn.get_submodule(rel))
        if io is None:
            raise _unavailable(model, component, f"{attn_path}.{rel} is not a Linear/Conv1D")
        return Site(layer, component, f"{attn_path}.{rel}", "output", io[1])
    rel = _find(attn, _FUSED)
    if rel is None:
        raise _unavailable(model, component, f"no q/k/v or fused qkv projection under {attn_path}")
    path, io = f"{attn_path}.{rel}", _io(attn.get_submodule(rel))
    model_type = getattr(_config(model), "model_type", None)
    which = ("query_output", "key_output", "value_output").index(component)
    if model_type in _UNSUPPORTED_QKV:
        raise _unavailable(model, component, f"{path} is fused and {_UNSUPPORTED_QKV[model_type]}; "
                           "hook it with a raw path instead")
    if io is None:
        raise _unavailable(model, component, f"{path} is not a Linear/Conv1D")
    total = io[1]
    if model_type in _INTERLEAVED_QKV:
        heads = _cfg_int(model, "num_attention_heads", "n_head")
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
    o_io = _io_at(attn, o_rel)
    q = o_io[0] if o_io else hidden_size(model)
    if (total - q) <= 0 or (total - q) % 2:
        raise _unavailable(model, component, f"{path} has {total} columns, which do not split into "
                           f"q={q} plus two equal k/v parts")
    kv = (total - q) // 2
    bounds = [(0, q), (q, q + kv), (q + kv, total)][which]
    return Site(layer, component, path, "output", bounds[1] - bounds[0],
                FusedSlice(1, total, bounds[0], bounds[1]))


def _head_site(model: nn.Module, layer: int, component: str, heads: list[int] | tuple[int, ...] | None) -> Site:
    base = resolve_site(model, layer, component[len("head_"):])
    kv = component in ("head_key_output", "head_value_output")
    n_query = _cfg_int(model, "num_attention_heads", "n_head", "num_heads")
    n_heads = (_cfg_int(model, "num_key_value_heads", "multi_query_group_num") or n_query) if kv else n_query
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
                             f"{_arch(model)} has {n_heads} {kind} (0..{n_heads - 1})")
    return Site(base.layer, component, base.module_path, base.hook, base.width // n_heads, base.fused,
                tuple(heads), n_heads)


def resolve_site(model: nn.Module, layer: int | None, component: str,
                 heads: list[int] | tuple[int, ...] | None = None) -> Site:
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

    A component containing ``"."`` is a module path from the model root, with an
    optional ``{layer}`` placeholder and ``:input``/``:output`` suffix (default
    output), e.g. ``"model.layers.{layer}.mlp.down_proj:input"``.
    """
    if not isinstance(component, str):
        raise StructureError(f"component={component!r} must be a str")
    if "." in component:
        return _raw_site(model, layer, component)
    if component in HEAD_COMPONENTS:
        return _head_site(model, layer, component, heads)
    if component not in COMPONENTS:
        raise StructureError(
            f"component={component!r} is not known; choose one of {', '.join(COMPONENTS + HEAD_COMPONENTS)}, "
            "or give a module path containing '.', e.g. 'model.layers.{layer}.mlp:input'")
    if layer is None:
        raise StructureError(f"layer=None is only allowed with a raw module path, not component={component!r}")
    layers_path, layers = find_layers(model)
    layer = _normalise_layer(model, layer, len(layers))
    block_path = f"{layers_path}.{layer}" if layers_path else str(layer)
    block = layers[layer]
    hidden = hidden_size(model)

    if component in ("block_input", "block_output"):
        return Site(layer, component, block_path, "input" if component == "block_input" else "output", hidden)

    attn_rel = _find(block, _ATTN)
    if component.startswith(("attention", "query", "key", "value")):
        if attn_rel is None:
            raise _unavailable(model, component, f"no self-attention module ({'/'.join(_ATTN)}) in {block_path}")
        attn_path, attn = f"{block_path}.{attn_rel}", block.get_submodule(attn_rel)
        o_rel = _find(attn, _O)
        o_io = _io_at(attn, o_rel)
        if component in ("query_output", "key_output", "value_output"):
            return _qkv_site(model, layer, component, attn_path, attn, o_rel)
        if component == "attention_input":
            p_io = _io_at(attn, _find(attn, _Q + _FUSED))
            return Site(layer, component, attn_path, "input", p_io[0] if p_io else hidden)
        if o_rel is None or o_io is None:
            if component == "attention_output":
                return Site(layer, component, attn_path, "output", hidden)
            raise _unavailable(model, component, f"no attention output projection ({'/'.join(_O)}) under {attn_path}")
        if component == "attention_value_output":
            return Site(layer, component, f"{attn_path}.{o_rel}", "input", o_io[0])
        # A projection nested below the attention module (BERT's attention.output.dense)
        # means the module's own output is already residual + LayerNorm.
        path = f"{attn_path}.{o_rel}" if "." in o_rel else attn_path
        return Site(layer, component, path, "output", o_io[1])

    # MLP components.  Without a single MLP module, search the block itself but
    # never inside the attention module.
    skip = (attn_rel,) if attn_rel else ()
    mlp_rel = _find(block, _MLP, skip)
    root = block.get_submodule(mlp_rel) if mlp_rel else block
    root_path = f"{block_path}.{mlp_rel}" if mlp_rel else block_path
    root_skip = () if mlp_rel else skip
    down_rel = _find(root, _DOWN, root_skip)
    down_io = _io_at(root, down_rel)
    if component == "mlp_activation":
        act_rel = _find(root, _ACT, root_skip) or next(
            (p for p, m in root.named_modules() if p and _is_activation(m)
             and not any(p == s or p.startswith(s + ".") for s in root_skip)), None)
        if act_rel is None:
            raise _unavailable(model, component, f"no activation module ({'/'.join(_ACT)}) under {root_path}")
        if down_io is None:
            raise _unavailable(model, component, f"no down projection ({'/'.join(_DOWN)}) under {root_path}")
        return Site(layer, component, f"{root_path}.{act_rel}", "output", down_io[0])
    up_rel = _find(root, _UP, root_skip)
    up_io = _io_at(root, up_rel)
    if mlp_rel is not None:
        if component == "mlp_input":
            return Site(layer, component, root_path, "input", up_io[0] if up_io else hidden)
        return Site(layer, component, root_path, "output", down_io[1] if down_io else hidden)
    if component == "mlp_input":
        if up_io is None:
            raise _unavailable(model, component, f"no MLP module ({'/'.join(_MLP)}) or first MLP linear in {block_path}")
        return Site(layer, component, f"{block_path}.{up_rel}", "input", up_io[0])
    if down_io is None:
        raise _unavailable(model, component, f"no MLP module ({'/'.join(_MLP)}) or last MLP linear in {block_path}")
    return Site(layer, component, f"{block_path}.{down_rel}", "output", down_io[1])
