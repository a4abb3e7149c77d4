"""Figures for :mod:`reftkit.analysis.representations`; each returns a :class:`matplotlib.figure.Figure`
(object-oriented API, nothing is shown). matplotlib is imported when a function is called."""
from __future__ import annotations

from typing import Sequence

__all__ = ["plot_representation_changes", "plot_pca", "plot_subspace_similarity", "plot_logit_lens"]


def _layer_label(layer: int) -> str:
    return "emb" if layer == -1 else str(layer)


def plot_representation_changes(frame: "pandas.DataFrame", value: str = "delta_norm",  # noqa: F821
                                tokens: Sequence[str] | None = None,
                                title: str | None = None) -> "matplotlib.figure.Figure":  # noqa: F821
    """Two panels for :func:`~reftkit.analysis.representations.representation_changes`' frame.

    Left: heat map of ``value`` (default ``delta_norm``), layers down (``emb`` = embeddings), positions
    across (``tokens`` labels them). Right: the ``cosine`` between base and adapted states — one line
    per layer across positions when there are several positions, else one line across layers.
    """
    from matplotlib.figure import Figure

    if frame.empty:
        raise ValueError("the frame is empty: nothing to plot")
    grid = frame.pivot(index="layer", columns="position", values=value).sort_index()
    cos = frame.pivot(index="layer", columns="position", values="cosine").sort_index()
    fig = Figure(figsize=(4.0 + 0.5 * grid.shape[1] + 4.0, 1.5 + 0.3 * grid.shape[0]))
    ax, ax_cos = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(grid.shape[1], 2), 3]})
    image = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels([tokens[p] for p in grid.columns] if tokens is not None else list(grid.columns),
                       rotation=60, ha="right")
    ax.set_yticks(range(grid.shape[0]))
    ax.set_yticklabels([_layer_label(int(layer)) for layer in grid.index])
    ax.set_xlabel("token position" + (" (from the end)" if frame.attrs.get("positions") == "last" else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"{value} (adapted − base)")
    fig.colorbar(image, ax=ax, label=value)
    if cos.shape[1] > 1:
        for layer, row in cos.iterrows():
            ax_cos.plot(list(cos.columns), row.values, marker=".", label=f"layer {_layer_label(int(layer))}")
        ax_cos.set_xlabel("token position")
        ax_cos.legend(fontsize="x-small", ncol=2)
    else:
        ax_cos.plot(list(cos.index), cos.iloc[:, 0].values, marker="o", label=f"position {cos.columns[0]}")
        ax_cos.set_xticks(list(cos.index))
        ax_cos.set_xticklabels([_layer_label(int(layer)) for layer in cos.index])
        ax_cos.set_xlabel("layer")
    ax_cos.set_ylabel("cosine(base, adapted)")
    ax_cos.set_title("cosine similarity")
    fig.suptitle(title or "representation change")
    fig.tight_layout()
    return fig


def plot_pca(frame: "pandas.DataFrame", title: str | None = None) -> "matplotlib.figure.Figure":  # noqa: F821
    """Scatter of :func:`~reftkit.analysis.representations.pca_before_after`'s frame on PC1/PC2: base
    states, adapted states, and one arrow per prompt from its base to its adapted state (a quiver)."""
    from matplotlib.figure import Figure

    if "pc2" not in frame:
        raise ValueError("plot_pca needs two components (pc1, pc2); run pca_before_after with n_components >= 2")
    base = frame[frame["state"] == "base"].sort_values("prompt")
    adapted = frame[frame["state"] == "adapted"].sort_values("prompt")
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    ax.scatter(base["pc1"], base["pc2"], label="base", color="tab:blue")
    ax.scatter(adapted["pc1"], adapted["pc2"], label="adapted", color="tab:orange")
    ax.quiver(base["pc1"].values, base["pc2"].values, adapted["pc1"].values - base["pc1"].values,
              adapted["pc2"].values - base["pc2"].values, angles="xy", scale_units="xy", scale=1,
              color="grey", alpha=0.6, width=0.004)
    ratio = frame.attrs.get("explained_variance_ratio", [])
    for k, axis in enumerate((ax.set_xlabel, ax.set_ylabel)):
        share = f" ({100 * ratio[k]:.1f}% of base variance)" if len(ratio) > k else ""
        axis(f"PC{k + 1}{share}")
    layer = frame.attrs.get("layer")
    where = "" if layer is None else f": layer {_layer_label(int(layer))}, position {frame.attrs.get('position')}"
    ax.set_title(title or f"PCA of base states{where}")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_subspace_similarity(frame: "pandas.DataFrame", value: str = "mean_cos2",  # noqa: F821
                             title: str | None = None) -> "matplotlib.figure.Figure":  # noqa: F821
    """Heat map of :func:`~reftkit.analysis.subspaces.subspace_similarity`'s ``value`` over all
    pairs, in the input order, each cell annotated when there are at most 12 subspaces."""
    from matplotlib.figure import Figure

    names = frame.attrs.get("names") or list(dict.fromkeys(frame["a"]))
    grid = frame.pivot(index="a", columns="b", values=value).loc[names, names]
    fig = Figure(figsize=(2.5 + 0.6 * len(names), 2.0 + 0.5 * len(names)))
    ax = fig.subplots()
    limits = (0.0, 90.0) if value.endswith("_deg") else (0.0, 1.0)
    image = ax.imshow(grid.values, cmap="magma", vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{grid.values[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
                        color="grey")
    ax.set_xlabel("subspace")
    ax.set_ylabel("subspace")
    ax.set_title(title or f"subspace similarity ({value})")
    fig.colorbar(image, ax=ax, label=f"{value} [degrees]" if value.endswith("_deg") else value)
    fig.tight_layout()
    return fig


def plot_logit_lens(frame: "pandas.DataFrame", max_panels: int = 16,  # noqa: F821
                    title: str | None = None) -> "matplotlib.figure.Figure":  # noqa: F821
    """One horizontal bar chart per (name, direction) of :func:`~reftkit.analysis.subspaces.logit_lens`'s
    frame (the first ``max_panels``): promoted tokens (positive scores) on top, suppressed below."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(zip(frame["name"], frame["direction"])))[:max_panels]
    if not keys:
        raise ValueError("the frame is empty: nothing to plot")
    cols = min(len(keys), 4)
    rows = -(-len(keys) // cols)
    top_k = int(frame["rank"].max()) + 1
    fig = Figure(figsize=(3.2 * cols, (0.6 + 0.28 * 2 * top_k) * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, direction) in zip(axes, keys):
        part = frame[(frame["name"] == name) & (frame["direction"] == direction)]
        promoted = part[part["kind"] == "promoted"].sort_values("rank")
        suppressed = part[part["kind"] == "suppressed"].sort_values("rank", ascending=False)
        shown = list(promoted.itertuples()) + list(suppressed.itertuples())
        y = list(range(len(shown)))[::-1]
        ax.barh(y, [r.score for r in shown], color=["tab:green" if r.kind == "promoted" else "tab:red" for r in shown])
        ax.set_yticks(y)
        ax.set_yticklabels([str(r.token) for r in shown], fontsize="x-small")
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_title(f"{name} · direction {direction}", fontsize="small")
        ax.set_xlabel("logit score")
        ax.set_ylabel("token")
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    fig.suptitle(title or "logit lens of intervention directions")
    fig.tight_layout()
    return fig
