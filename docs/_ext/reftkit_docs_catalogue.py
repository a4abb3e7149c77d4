"""The pages that picture the interventions and positions, drawn from the code at build time.

* :func:`interventions_page` — the catalogue table and each class's docstring (formula and source).
* :func:`positions_figure` — which tokens ``f3+l3`` selects under left and right padding, computed by
  :func:`reftkit.positions.locate`, the function every call uses.
"""
from __future__ import annotations

import io


def interventions_page() -> str:
    """The catalogue: a table of config name, class and aliases, then each class's docstring."""
    from reftkit.interventions import ALIASES, INTERVENTIONS

    classes: dict[type, list[str]] = {}
    for key, cls in INTERVENTIONS.items():
        classes.setdefault(cls, []).append(key)
    aliases: dict[type, list[str]] = {}
    for alias, cls in ALIASES.items():
        aliases.setdefault(cls, []).append(alias)
    out = [".. list-table:: The intervention catalogue", "   :header-rows: 1", "",
           "   * - ``\"intervention\"``", "     - class", "     - pyreft / pyvene name"]
    for cls, keys in classes.items():
        out += [f"   * - {', '.join(f'``{k}``' for k in keys)}",
                f"     - :class:`~reftkit.interventions.{cls.__name__}`",
                f"     - {', '.join(f'``{a}``' for a in aliases.get(cls, [])) or '—'}"]
    out.append("")
    for cls in classes:
        out += [f".. autoclass:: reftkit.interventions.{cls.__name__}", "   :no-index:", ""]
    return "\n".join(out) + "\n"


def positions_figure(target: io.BytesIO) -> None:
    """``f3+l3`` on a batch of two (10 and 7 real tokens) under left and right padding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import Patch

    from reftkit.positions import locate, parse_positions, sequence_extent

    spec = parse_positions("f3+l3")
    width, lengths = 10, (10, 7)
    colours = {"pad": "#d9d9d9", "token": "#ffffff", "first": "#4c72b0", "last": "#dd8452"}
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 3.4))
    for ax, side in zip(axes, ("left", "right")):
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for row, n in enumerate(lengths):
            if side == "left":
                mask[row, width - n:] = 1
            else:
                mask[row, :n] = 1
        start, real = sequence_extent(mask, len(lengths), width, mask.device)
        located = locate(spec, start, real, width)  # [batch, first + last]: the first slots, then the last
        picked_first, picked_last = located[:, :spec.first], located[:, spec.first:]
        for row in range(len(lengths)):
            for col in range(width):
                kind = "token" if mask[row, col] else "pad"
                if col in picked_first[row].tolist():
                    kind = "first"
                elif col in picked_last[row].tolist():
                    kind = "last"
                ax.add_patch(plt.Rectangle((col, -row - 1), 1, 1, facecolor=colours[kind], edgecolor="black"))
                ax.text(col + 0.5, -row - 0.5, "pad" if kind == "pad" else str(col), ha="center", va="center",
                        fontsize=8, color="white" if kind in ("first", "last") else "black")
        ax.set_xlim(0, width)
        ax.set_ylim(-len(lengths), 0)
        ax.set_yticks([-r - 0.5 for r in range(len(lengths))],
                      [f"example {r} ({n} tokens)" for r, n in enumerate(lengths)])
        ax.set_xticks([])
        ax.set_title(f"{side} padding", fontsize=10)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.legend(handles=[Patch(facecolor=colours["first"], label="f3 (first 3 real tokens)"),
                        Patch(facecolor=colours["last"], label="l3 (last 3 real tokens)"),
                        Patch(facecolor=colours["pad"], edgecolor="black", label="padding")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle('positions "f3+l3": the token indices reftkit.positions.locate returns', fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(target, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
