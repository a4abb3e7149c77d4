"""How adaptation changes a model's representations, and how adapted subspaces compare.

Representation change between a base and an adapted model on the same prompts:

* :func:`hidden_states` — the residual stream entering block 0 (the embeddings) and leaving every
  block, captured with plain forward hooks, ``[layers + 1, batch, seq, d]`` float32;
* :func:`representation_changes` — per (layer, position): ‖h_adapted − h_base‖₂, the same relative
  to ‖h_base‖₂, and cos(h_base, h_adapted), averaged over prompts;
* :func:`pca_before_after` — a PCA fitted on the base states at one layer/position, with the base
  and adapted states projected on it (:func:`fit_pca` is the PCA itself).

Subspaces (principal angles, LoReFT and LoRA subspaces, the logit lens) live in
:mod:`reftkit.analysis.subspaces`.

"Adapted" is one of: a :class:`reftkit.ReftModel` (its base is ``reft.model``: reftkit's hooks do
nothing outside ``reft(...)``); a weight-space baseline with ``.model``, ``__call__(input_ids=,
attention_mask=)`` and a ``.disabled()`` context under which it is the base model; or any plain Hugging
Face model, with the base given as ``base=``. Layers are numbered as in reftkit's configs: layer ``i``
is the output of block ``i`` (``block_output``), and layer ``-1`` labels the embeddings (the input of
block 0, Hugging Face's ``hidden_states[0]``). The output of the last block is taken before the final
norm (Hugging Face's last ``hidden_states`` entry has the norm applied). Every ``plot_*`` returns a
:class:`matplotlib.figure.Figure` (see :mod:`reftkit.analysis.representation_plots`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from reftkit.structure import find_layers, hidden_size

from .common import check_tokenizer_fits, model_device
from .representation_plots import plot_pca, plot_representation_changes

__all__ = ["hidden_states", "representation_changes", "fit_pca", "PCA", "pca_before_after",
           "plot_representation_changes", "plot_pca"]


# ----------------------------------------------------------------------------- capture

def _is_reft(model: Any) -> bool:
    from reftkit.model import ReftModel
    return isinstance(model, ReftModel)


def _hf(model: Any) -> nn.Module:
    """The Hugging Face model whose layers carry the representations of ``model``."""
    if _is_reft(model) or hasattr(model, "disabled"):
        return model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch model, a reftkit.ReftModel or a weight-space baseline with .model and "
                        f".disabled(), got {type(model).__name__}")
    return model


def _first(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


@torch.no_grad()
def hidden_states(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run ``model(**inputs)`` once and return the residual stream: ``[layers + 1, batch, seq, d]`` float32.

    Entry 0 is the input of block 0 (the embeddings, with position embeddings where the model adds
    them: Hugging Face's ``hidden_states[0]``); entry ``i + 1`` is the output of block ``i``. The block
    list is found structurally (:func:`reftkit.structure.find_layers`) and read with plain
    ``register_forward_hook``/``register_forward_pre_hook`` hooks, removed afterwards even if the
    forward fails. ``model`` may be a plain model, a ``ReftModel`` (run with its interventions: its own
    hooks on the same blocks were registered first, so these see the edited outputs) or a weight-space
    baseline (run as it is; wrap the call in ``baseline.disabled()`` for its base).
    """
    hf = _hf(model)
    _, layers = find_layers(hf)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def before_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
        states[0] = (args[0] if args else kwargs["hidden_states"]).detach().float()

    def after(i: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            states[i + 1] = _first(output).detach().float()
        return hook

    handles = [layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    try:
        handles += [block.register_forward_hook(after(i)) for i, block in enumerate(layers)]
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i - 1 for i, s in enumerate(states) if s is None]
    if missing:
        raise RuntimeError(f"layers {missing} of {type(hf).__name__} did not run during the forward")
    return torch.stack(states)  # type: ignore[arg-type]


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got one string {prompts[:40]!r}; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts[{bad[0]}]={prompts[bad[0]]!r} is not a string")
    return prompts


def _check_compatible(base: nn.Module, adapted: nn.Module) -> None:
    """Raise if ``base`` and ``adapted`` cannot be compared state by state."""
    def model_type(m: nn.Module) -> Any:
        return getattr(getattr(m, "config", None), "model_type", None)

    checks = [("config.model_type", model_type), ("number of layers", lambda m: len(find_layers(m)[1])),
              ("hidden size", hidden_size),
              ("input embedding rows", lambda m: m.get_input_embeddings().weight.shape[0]),
              ("config.vocab_size", lambda m: getattr(getattr(m, "config", None), "vocab_size", None))]
    for what, get in checks:
        b, a = get(base), get(adapted)
        if b != a:
            raise ValueError(f"base and adapted models differ in {what}: base has {b!r}, adapted has {a!r}; "
                             "representations can only be compared between two versions of one architecture "
                             "and vocabulary")


def _check_tokenizers(tokenizer: Any, adapted_tokenizer: Any, model: nn.Module) -> None:
    check_tokenizer_fits(model, tokenizer)
    if adapted_tokenizer is None or adapted_tokenizer is tokenizer:
        return
    vocab, other = tokenizer.get_vocab(), adapted_tokenizer.get_vocab()
    if vocab != other:
        diff = sorted(set(vocab.items()) ^ set(other.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(f"tokenizer ({len(vocab)} tokens) and adapted_tokenizer ({len(other)} tokens) have "
                         f"different vocabularies, e.g. (token, id) {diff}: the same prompt would be different "
                         "token ids for the two models")


Runner = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _runners(adapted: Any, base: nn.Module | None) -> tuple[Runner, Runner, nn.Module]:
    """(base run, adapted run, adapted HF model), each run mapping a token batch to its hidden states."""
    hf = _hf(adapted)
    run_adapted: Runner = lambda batch: hidden_states(adapted, batch)  # noqa: E731
    if base is not None:
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be a torch model, got {type(base).__name__}")
        _check_compatible(base, hf)
        return (lambda batch: hidden_states(base, {k: v.to(model_device(base)) for k, v in batch.items()}),
                run_adapted, hf)
    if _is_reft(adapted):
        return (lambda batch: hidden_states(hf, batch)), run_adapted, hf  # reftkit hooks are inert here
    if hasattr(adapted, "disabled"):
        def run_base(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            with adapted.disabled():
                return hidden_states(adapted, batch)
        return run_base, run_adapted, hf
    raise ValueError(f"adapted is a plain {type(adapted).__name__}, which carries no base model: pass base= "
                     "(the model before adaptation), or give a reftkit.ReftModel or a weight-space baseline "
                     "with .disabled()")


def _paired_states(adapted: Any, tokenizer: Any, prompts: Sequence[str], base: nn.Module | None, batch_size: int,
                   adapted_tokenizer: Any, progress: bool,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (base states, adapted states, attention mask) per batch, states ``[L + 1, B, T, d]``."""
    from tqdm.auto import tqdm

    prompts = _check_prompts(prompts)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    run_base, run_adapted, hf = _runners(adapted, base)
    _check_tokenizers(tokenizer, adapted_tokenizer, hf)
    if min(batch_size, len(prompts)) > 1 and getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token) "
                         "or use batch_size=1")
    device = model_device(hf)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="representations", disable=not progress or len(starts) < 2):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        empty = (mask.sum(1) == 0).nonzero()
        if len(empty):
            i = start + int(empty[0])
            raise ValueError(f"prompts[{i}]={prompts[i]!r} has no tokens after tokenization")
        h_base, h_adapted = run_base(batch), run_adapted(batch).to(device)
        extra = h_adapted.shape[2] - h_base.shape[2]
        if extra > 0:  # prompt tuning prepends virtual tokens: compare the prompt's own tokens
            h_adapted = h_adapted[:, :, extra:]
        yield h_base.to(device), h_adapted, mask


def _token_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its index counted from the prompt's first real token, and whether it is the last one."""
    mask = mask.long()
    index = mask.cumsum(1) - 1
    last = (index == mask.sum(1, keepdim=True) - 1) & mask.bool()
    return index.clamp_min(0), last


@torch.no_grad()
def representation_changes(adapted: Any, tokenizer: Any, prompts: Sequence[str], base: nn.Module | None = None,
                           batch_size: int = 8, positions: str = "all", adapted_tokenizer: Any = None,
                           progress: bool = True) -> "pandas.DataFrame":  # noqa: F821
    """Per (layer, position), how far the adapted residual stream is from the base one on ``prompts``.

    With ``h_b``, ``h_a`` the base and adapted states of one token (``d``-vectors):
    ``delta_norm`` = ‖h_a − h_b‖₂, ``relative_delta`` = ‖h_a − h_b‖₂ / ‖h_b‖₂, ``cosine`` =
    h_a·h_b / (‖h_a‖₂‖h_b‖₂) (exactly 1 where h_a = h_b), ``base_norm`` = ‖h_b‖₂; each is the mean
    over the prompts that have that position (``n_prompts``). ``layer`` is -1 for the embeddings and
    ``i`` for the output of block ``i``. ``positions="all"``: ``position`` is the token index counted
    from each prompt's first real token (0, 1, ...; padding never counts); ``"last"``: only each
    prompt's last token, labelled ``position = -1`` (counted from the end). ``adapted_tokenizer``, if
    the adapted model came with its own, must have the same vocabulary as ``tokenizer``. Virtual
    tokens an adapted model prepends (peft prompt tuning) are dropped: only the prompt's own tokens
    are compared.
    """
    import pandas as pd

    if positions not in ("all", "last"):
        raise ValueError(f"positions={positions!r}: choose 'all' or 'last'")
    sums: torch.Tensor | None = None  # [5, L + 1, P]: delta, relative, cosine, base norm, count
    for h_base, h_adapted, mask in _paired_states(adapted, tokenizer, prompts, base, batch_size, adapted_tokenizer,
                                                  progress):
        delta = (h_adapted - h_base).norm(dim=-1)
        norm_b, norm_a = h_base.norm(dim=-1), h_adapted.norm(dim=-1)
        nan = torch.full_like(delta, math.nan)
        relative = torch.where(norm_b > 0, delta / norm_b, nan)
        cosine = torch.where(delta == 0, torch.ones_like(delta),
                             torch.where((norm_a > 0) & (norm_b > 0),
                                         (h_adapted * h_base).sum(-1) / (norm_a * norm_b), nan))
        index, last = _token_positions(mask)
        keep = last if positions == "last" else mask.bool()
        index = torch.zeros_like(index) if positions == "last" else index
        stats = torch.stack([delta, relative, cosine, norm_b, torch.ones_like(delta)]).double()
        stats = torch.where(keep, stats, torch.zeros_like(stats))  # [5, L + 1, B, T]
        width = int(index[keep].max()) + 1
        got = torch.zeros(*stats.shape[:2], width, dtype=torch.float64, device=stats.device)
        got.index_add_(2, index[keep], stats[:, :, keep])
        if sums is None:
            sums = got
        else:
            grow = max(width, sums.shape[2])
            sums = nn.functional.pad(sums, (0, grow - sums.shape[2])) + nn.functional.pad(got, (0, grow - width))
    assert sums is not None
    sums = sums.cpu()
    rows = []
    for layer in range(sums.shape[1]):
        for pos in range(sums.shape[2]):
            count = float(sums[4, layer, pos])
            if count:
                rows.append({"layer": layer - 1, "position": -1 if positions == "last" else pos,
                             "delta_norm": float(sums[0, layer, pos]) / count,
                             "relative_delta": float(sums[1, layer, pos]) / count,
                             "cosine": float(sums[2, layer, pos]) / count,
                             "base_norm": float(sums[3, layer, pos]) / count, "n_prompts": int(count)})
    frame = pd.DataFrame(rows)
    frame.attrs["positions"] = positions
    return frame


# ----------------------------------------------------------------------------- PCA

@dataclass
class PCA:
    """A fitted PCA: ``mean`` ``[d]``, ``components`` ``[k, d]`` (orthonormal rows),
    ``explained_variance`` ``[k]`` (S²/(n − 1)), ``explained_variance_ratio`` ``[k]`` (S²/ΣS²)."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates ``(x − mean) componentsᵀ``, ``[n, k]``."""
        return (x.to(self.mean) - self.mean) @ self.components.T

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        """Back to the ``d``-space: ``mean + z components``."""
        return self.mean + z.to(self.mean) @ self.components


def fit_pca(x: torch.Tensor, n_components: int = 2) -> PCA:
    """PCA of the rows of ``x`` (``[n, d]``) by the SVD of the centred data (no sklearn):
    ``x − mean = U S Vᵀ``; the components are the first ``n_components`` rows of ``Vᵀ``, each signed
    so that its largest-magnitude entry is positive (a deterministic choice, like sklearn's)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    if not isinstance(n_components, int) or not 1 <= n_components <= min(n - 1, d):
        raise ValueError(f"n_components={n_components!r} must be between 1 and {min(n - 1, d)}: the centred data "
                         f"of n={n} rows in d={d} dimensions has rank at most min(n - 1, d)")
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:n_components]
    pick = comps.abs().argmax(1, keepdim=True)
    comps = comps * torch.sign(comps.gather(1, pick))
    var = s ** 2
    return PCA(mean, comps, var[:n_components] / (n - 1), var[:n_components] / var.sum())


def _layer_index(layer: Any, n_layers: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool) or not -1 <= layer < n_layers:
        raise ValueError(f"layer={layer!r} is out of range: -1 (the embeddings) or a block index 0..{n_layers - 1}")
    return layer + 1


@torch.no_grad()
def pca_before_after(adapted: Any, tokenizer: Any, prompts: Sequence[str], layer: int,
                     base: nn.Module | None = None, position: str | int = "last", n_components: int = 2,
                     batch_size: int = 8, adapted_tokenizer: Any = None,
                     progress: bool = True) -> "pandas.DataFrame":  # noqa: F821
    """Fit a PCA (:func:`fit_pca`) on the base states of ``prompts`` at ``layer`` and project the
    base and the adapted states onto it, so a plot shows where adaptation moves each prompt.

    ``layer``: -1 for the embeddings, ``i`` for the output of block ``i`` (as in
    :func:`representation_changes`'s ``layer`` column; negative values do not count from the end).
    ``position``: ``"last"`` (each prompt's last token), ``"mean"`` (the mean over its tokens) or an
    int (the token index from the first real token). Returns rows
    ``prompt`` (index into ``prompts``), ``text``, ``state`` (``"base"``/``"adapted"``), ``pc1`` ...
    ``pc{n_components}``; ``attrs`` hold ``layer``, ``position``, ``explained_variance`` and
    ``explained_variance_ratio`` (of the base states).
    """
    import pandas as pd

    prompts = _check_prompts(prompts)
    if not (position in ("last", "mean") or (isinstance(position, int) and not isinstance(position, bool)
                                              and position >= 0)):
        raise ValueError(f"position={position!r}: choose 'last', 'mean' or a token index >= 0")
    picked: dict[str, list[torch.Tensor]] = {"base": [], "adapted": []}
    n_layers = len(find_layers(_hf(adapted))[1])
    row = _layer_index(layer, n_layers)
    done = 0
    for h_base, h_adapted, mask in _paired_states(adapted, tokenizer, prompts, base, batch_size, adapted_tokenizer,
                                                  progress):
        index, last = _token_positions(mask)
        if position == "last":
            weights = last.double()
        elif position == "mean":
            weights = mask.double() / mask.sum(1, keepdim=True)
        else:
            weights = ((index == position) & mask.bool()).double()
            short = (weights.sum(1) == 0).nonzero()
            if len(short):
                i = done + int(short[0])
                raise ValueError(f"position={position} is beyond prompt {i} ({prompts[i]!r}), which has "
                                 f"{int(mask[int(short[0])].sum())} tokens")
        for name, h in (("base", h_base), ("adapted", h_adapted)):
            picked[name].append(torch.einsum("bt,btd->bd", weights, h[row].double()))
        done += mask.shape[0]
    states = {name: torch.cat(parts) for name, parts in picked.items()}
    pca = fit_pca(states["base"], n_components)
    frames = []
    for name, x in states.items():
        coords = pca.transform(x).cpu().numpy()
        part = pd.DataFrame({"prompt": range(len(prompts)), "text": prompts, "state": name})
        for k in range(n_components):
            part[f"pc{k + 1}"] = coords[:, k]
        frames.append(part)
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs.update(layer=layer, position=position,
                       explained_variance=pca.explained_variance.tolist(),
                       explained_variance_ratio=pca.explained_variance_ratio.tolist())
    return frame
