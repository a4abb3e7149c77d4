"""Every public plot helper returns a matplotlib Figure a reader can read on its own: a title on every
panel with data, both axes labelled (units in brackets where there are units), and a labelled colour bar
wherever colour encodes a value (an image, or a collection coloured from an array).

The frames are built by hand with the columns each helper reads, so the tests stay fast and need no model;
``subspace_similarity`` is pure tensor maths and is used as is."""
from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

matplotlib.use("Agg")

from reftkit.analysis import plot_comparison, plot_sweep  # noqa: E402
from reftkit.analysis.patching import plot_patching  # noqa: E402
from reftkit.analysis.representation_plots import (  # noqa: E402
    plot_logit_lens,
    plot_pca,
    plot_representation_changes,
    plot_subspace_similarity,
)
from reftkit.analysis.subspaces import subspace_similarity  # noqa: E402


def _is_colorbar(ax: Axes) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _colour_encoders(ax: Axes) -> list[ScalarMappable]:
    """Artists whose colour is read from data: images, and collections given a value array (a scatter
    with ``c=values``); a scatter with one fixed colour has no array and needs no colour bar."""
    collections = [c for c in ax.collections if c.get_array() is not None]
    return [*ax.images, *collections]


def assert_readable(fig: object, *, colour_bars: int = 0) -> list[Axes]:
    """Check the figure contract and return the data axes (every axes that is not a colour bar).

    ``colour_bars`` is how many colour-encoding artists the helper is expected to draw, so a helper that
    stopped drawing its heat map (and with it the need for a colour bar) fails too."""
    assert isinstance(fig, Figure), f"expected a matplotlib Figure, got {type(fig).__name__}"
    data_axes = [ax for ax in fig.axes if not _is_colorbar(ax)]
    assert data_axes, "the figure has no axes with data"
    for ax in data_axes:
        where = f"axes {fig.axes.index(ax)}"
        assert ax.get_title().strip(), f"{where} has no title"
        assert ax.get_xlabel().strip(), f"{where} has no x label"
        assert ax.get_ylabel().strip(), f"{where} has no y label"
    if len(data_axes) > 1:
        assert fig._suptitle is not None and fig._suptitle.get_text().strip(), "a multi-panel figure needs a suptitle"
    encoders = [m for ax in data_axes for m in _colour_encoders(ax)]
    assert len(encoders) == colour_bars, f"expected {colour_bars} colour-encoding artists, found {len(encoders)}"
    for mappable in encoders:
        bar = mappable.colorbar
        assert bar is not None, f"{type(mappable).__name__} encodes a value by colour but has no colour bar"
        assert bar.ax in fig.axes
        label = bar.ax.get_ylabel() if bar.orientation == "vertical" else bar.ax.get_xlabel()
        assert label.strip(), "the colour bar has no label"
    return data_axes


def _changes_frame(positions: int) -> pd.DataFrame:
    rows = [{"layer": layer, "position": pos, "delta_norm": 0.1 * (layer + 2) * (pos + 1),
             "relative_delta": 0.01 * (pos + 1), "cosine": 1.0 - 0.05 * (layer + 1)}
            for layer in (-1, 0, 1) for pos in range(positions)]
    return pd.DataFrame(rows)


def test_plot_representation_changes_heat_map_over_positions():
    fig = plot_representation_changes(_changes_frame(positions=3), tokens=["a", "b", "c"])
    heat, lines = assert_readable(fig, colour_bars=1)
    assert heat.images[0].colorbar.ax.get_ylabel() == "delta_norm"
    assert heat.get_xlabel() == "token position" and heat.get_ylabel() == "layer"
    assert lines.get_xlabel() == "token position" and fig._suptitle.get_text() == "representation change"


def test_plot_representation_changes_one_position_across_layers():
    frame = _changes_frame(positions=1)
    frame.attrs["positions"] = "last"
    fig = plot_representation_changes(frame, value="relative_delta", title="last token")
    heat, lines = assert_readable(fig, colour_bars=1)
    assert heat.images[0].colorbar.ax.get_ylabel() == "relative_delta"
    assert heat.get_xlabel() == "token position (from the end)" and lines.get_xlabel() == "layer"


def test_plot_pca():
    frame = pd.DataFrame([{"prompt": p, "state": s, "pc1": p + (s == "adapted"), "pc2": 2.0 * p}
                          for p in range(3) for s in ("base", "adapted")])
    frame.attrs.update(explained_variance_ratio=[0.6, 0.3], layer=1, position=-1)
    (ax,) = assert_readable(plot_pca(frame))  # base/adapted are categories (legend), not a colour scale
    assert ax.get_xlabel() == "PC1 (60.0% of base variance)" and "layer 1" in ax.get_title()


@pytest.mark.parametrize("value, unit", [("mean_cos2", ""), ("min_angle_deg", " [degrees]")])
def test_plot_subspace_similarity(value, unit):
    e = torch.eye(4)
    frame = subspace_similarity({"x": e[:, :2], "y": e[:, 1:3], "z": e[:, 3]})
    (ax,) = assert_readable(plot_subspace_similarity(frame, value=value), colour_bars=1)
    assert ax.images[0].colorbar.ax.get_ylabel() == value + unit
    assert ax.get_xlabel() == ax.get_ylabel() == "subspace"


def test_plot_logit_lens():
    rows = [{"name": "layer1_block_output", "direction": d, "kind": kind, "rank": r, "token": f"t{d}{kind[0]}{r}",
             "score": (1.0 if kind == "promoted" else -1.0) * (3 - r)}
            for d in range(2) for kind in ("promoted", "suppressed") for r in range(3)]
    axes = assert_readable(plot_logit_lens(pd.DataFrame(rows)))  # bar colour marks the sign, not a scale
    assert len(axes) == 2 and all(ax.get_xlabel() == "logit score" and ax.get_ylabel() == "token" for ax in axes)


def test_plot_comparison():
    frame = pd.DataFrame([
        {"method": "base", "num_trainable_params": 0, "rougeL": 10.0, "train_time": 0.0},
        {"method": "loreft", "num_trainable_params": 130, "rougeL": 30.0, "train_time": 1.5},
        {"method": "lora", "num_trainable_params": 4096, "rougeL": 35.0, "train_time": 2.5},
    ])
    quality, cost = assert_readable(plot_comparison(frame, metric="rougeL"))  # one point per method, named
    assert cost.get_xlabel() == "train time [s]" and quality.get_xlabel() == "trainable parameters"


def test_plot_sweep():
    sites = [("all", "l1"), ("all", "f1+l1"), (0, "l1"), (0, "f1+l1")]
    frame = pd.DataFrame([{"layer": layer, "positions": spec, "improvement": 0.1 * k}
                          for k, (layer, spec) in enumerate(sites)])
    (ax,) = assert_readable(plot_sweep(frame), colour_bars=1)
    assert ax.images[0].colorbar.ax.get_ylabel() == "improvement"


def test_plot_patching():
    frame = pd.DataFrame([{"layer": layer, "position": pos, "recovered": 0.5 * layer - 0.2 * pos}
                          for layer in range(2) for pos in range(3)])
    (ax,) = assert_readable(plot_patching(frame, tokens=["t0", "t1", "t2"]), colour_bars=1)
    assert ax.images[0].colorbar.ax.get_ylabel() == "recovered" and ax.get_xlabel() == "token position"


def test_the_contract_check_catches_a_missing_colour_bar_and_label():
    """The shared check is itself a test subject: it must fail on a heat map without a colour bar."""
    fig = Figure()
    ax = fig.subplots()
    ax.imshow([[0.0, 1.0]])
    ax.set(title="t", xlabel="x", ylabel="y")
    with pytest.raises(AssertionError, match="has no colour bar"):
        assert_readable(fig, colour_bars=1)
    fig.colorbar(ax.images[0], ax=ax)
    with pytest.raises(AssertionError, match="colour bar has no label"):
        assert_readable(fig, colour_bars=1)
    ax.set_ylabel("")
    with pytest.raises(AssertionError, match="no y label"):
        assert_readable(fig, colour_bars=1)
