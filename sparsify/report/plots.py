"""The report's figures (matplotlib, the `[plot]` extra): top-1 and sparsity per round, per-layer
sparsity, mask pictures, training curves, and sensitivity and bench figures when the run has them.

Each `*_figure` takes plain values (see `series`) and returns a matplotlib Figure drawn by the Agg
canvas: no pyplot, no window. `report_figures` gathers them for a report; `write_figures` saves PNG and
SVG files.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsify.errors import SparsifyError

PLOT_EXTRA = "pip install 'sparsify-cnn[plot]'"
KEPT, PRUNED, DENSE, TARGET = "#3b6ea5", "#e8a33d", "#b8b8b8", "#c03d3d"
PALE = "#f3e3c8"  # pruned cells of a mask picture
STYLE = {"font.size": 10, "axes.titlesize": 12, "axes.titleweight": "bold", "axes.labelsize": 10,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "legend.frameon": False, "svg.hashsalt": "sparsify"}  # fixed SVG ids: the same report, the same file
PNG_DPI = 110


@dataclass
class NamedFigure:
    name: str  # file stem: rounds, layers, mask-<layer>, training, sensitivity, bench-layers, bench-end-to-end
    title: str
    figure: object  # matplotlib.figure.Figure


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    """SparsifyError (one line) when matplotlib is not installed."""
    if not has_matplotlib():
        raise SparsifyError(f"figures need matplotlib, which is not installed: {PLOT_EXTRA}")


def new_figure(width: float, height: float, rows: int = 1, columns: int = 1, **grid):
    """A Figure on the Agg canvas with its axes (constrained layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False, **grid)


def short(name: str) -> str:
    return name.removesuffix(".weight")


def rounds_figure(points: list[dict], *, dense_acc1: float | None, target: float | None):
    """Top: top-1 after each round's training (and right after its prune when evaluated), the dense
    top-1 as a line. Bottom: sparsity of eligible weights at the end of each round, the target as a line."""
    figure, axes = new_figure(7.5, 6, 2, 1, sharex=True, height_ratios=[3, 2])
    top, bottom = axes[0, 0], axes[1, 0]
    rounds = [p["round"] for p in points]
    done = [(p["round"], p["val_acc1"]) for p in points if p["val_acc1"] is not None]
    if done:
        top.plot(*zip(*done), "o-", color=KEPT, lw=2, ms=7, label="after training")
        for x, y in done:
            top.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
    pruned = [(p["round"], p["pruned_acc1"]) for p in points if p["pruned_acc1"] is not None]
    if pruned:
        top.plot(*zip(*pruned), "v", color=PRUNED, ms=8, mfc="white", mew=2, ls="none", label="right after prune")
    if dense_acc1 is not None:
        top.axhline(dense_acc1, color="#555555", ls="--", lw=1.2, label=f"dense {dense_acc1:.2f}%")
    if not done and not pruned:
        top.text(0.5, 0.5, "no evaluated round in the history", transform=top.transAxes, ha="center", color="#777777")
        top.set_yticks([])
    top.set_ylabel("val top-1 (%)")
    top.set_title("top-1 and sparsity per round")
    top.margins(y=0.2)
    if done or pruned or dense_acc1 is not None:
        top.legend(loc="lower left")
    sparsity = [100 * (p["sparsity"] or 0) for p in points]
    bottom.bar(rounds, sparsity, color=PRUNED, width=0.6)
    for x, y in zip(rounds, sparsity):
        bottom.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)
    if isinstance(target, (int, float)):
        bottom.axhline(100 * target, color=TARGET, ls="--", lw=1.2, label=f"target {100 * target:.0f}%")
        bottom.legend(loc="upper left")
    bottom.set_ylim(0, max([100 * (target or 0), *sparsity, 1]) * 1.25)
    bottom.set_ylabel("sparsity of\neligible weights (%)")
    bottom.set_xlabel("round (0: dense)")
    bottom.set_xticks(rounds)
    return figure


def layers_figure(rows: list[dict], *, target: float | None):
    """One bar per layer: pruned and kept shares of its weights; a layer not eligible is a grey bar with
    the reason; the layer's own target (or the run's) as a red tick."""
    count = len(rows)
    figure, axes = new_figure(9, 1.6 + (0.3 if count <= 60 else 0.22) * count)
    ax = axes[0, 0]
    ys = range(count)
    for y, row in zip(ys, rows):
        zero = 100 * row["sparsity"]
        if row["eligible"] == "yes":
            ax.barh(y, zero, color=PRUNED, height=0.7)
            ax.barh(y, 100 - zero, left=zero, color=KEPT, height=0.7)
            ax.text(101, y, f"{zero:.1f}%", va="center", fontsize=9)
            layer_target = row.get("target") if row.get("target") is not None else target
            if isinstance(layer_target, (int, float)):
                ax.plot([100 * layer_target] * 2, [y - 0.45, y + 0.45], color=TARGET, lw=2)
        else:
            ax.barh(y, 100, color=DENSE, height=0.7)
            reason = row["eligible"].removeprefix("no: ")
            ax.text(1, y, f"not eligible: {reason[:70]}{'...' if len(reason) > 70 else ''}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [short(r["parameter"]) for r in rows], fontsize=9 if count <= 60 else 7)
    ax.set_ylim(count - 0.5, -0.5)
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("share of the layer's weights (%)")
    ax.grid(axis="y", visible=False)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=PRUNED, label="zero (pruned)"), Patch(color=KEPT, label="kept"),
               Patch(color=DENSE, label="not eligible (dense)"), Line2D([], [], color=TARGET, lw=2, label="target")]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4)
    ax.set_title("sparsity per layer", pad=28)
    return figure


def mask_figure(name: str, grid, *, share: bool, weight_shape: str, pattern: str):
    """A mask as a picture: rows are output groups, columns input groups; kept dark, pruned light (or,
    for element masks, the share of the kh x kw taps kept). Square cells unless the grid is very long."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows, columns = grid.shape
    ratio = rows / max(columns, 1)
    square = 1 / 8 <= ratio <= 8
    side = 4.2  # inches of the longer side of the picture
    width, height = (side, max(side * ratio, 1.6)) if ratio <= 1 else (max(side / ratio, 1.6), side)
    width, height = (width, height) if square else (side, side * 0.7)
    figure, axes = new_figure(max(width + 1.6, 5.2), height + 1.3)
    ax = axes[0, 0]
    values = grid.numpy()
    cmap = "Blues" if share else ListedColormap([PALE, KEPT])
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="equal" if square else "auto",
                      interpolation="nearest" if max(rows, columns) <= 256 else "antialiased")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    if columns == 1:  # a channel mask: one column for all input channels
        ax.set_xticks([])
    if not share and max(rows, columns) <= 64 and min(rows, columns) > 1:  # cell edges
        ax.set_xticks([x - 0.5 for x in range(1, columns)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, rows)], minor=True)
        ax.grid(which="minor", color="white", alpha=1, lw=1.5 if max(rows, columns) <= 32 else 0.6)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    kept = 100 * float(values.mean())
    ax.set_title(f"mask of {short(name)}\n{weight_shape}, {pattern}: {kept:.1f}% kept", fontsize=11)
    cout, cin = (int(d) for d in weight_shape.split("x")[:2])
    ax.set_xlabel(axis_label("input", columns, cin))
    ax.set_ylabel(axis_label("output", rows, cout))
    if share:
        figure.colorbar(image, ax=ax, label="share of kh x kw taps kept", shrink=0.8)
    else:
        ax.legend(handles=[Patch(color=KEPT, label="kept"), Patch(color=PALE, label="pruned")],
                  loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return figure


def axis_label(side: str, cells: int, channels: int) -> str:
    """'input channels (64)', or 'input-channel blocks (8)' when cells group several channels."""
    if cells == channels:
        return f"{side} channels ({cells})"
    if cells == 1:
        return f"{side} channels (all {channels} together)"
    return f"{side}-channel blocks ({cells})"


def round_colour(round_: int):
    from matplotlib import colormaps

    return colormaps["tab10"](round_ % 10)


def training_figure(segments: list[dict]):
    """Train loss (log scale) and learning rate over the steps of every train stage, coloured by round."""
    figure, axes = new_figure(9, 6, 2, 1, sharex=True, height_ratios=[3, 2])
    loss, lr = axes[0, 0], axes[1, 0]
    seen = set()
    for segment in segments:
        colour = round_colour(segment["round"])
        label = None if segment["round"] in seen else f"round {segment['round']}"
        seen.add(segment["round"])
        loss.plot(segment["steps"], segment["loss"], "-", color=colour, lw=1.8, label=label,
                  marker="o" if len(segment["steps"]) < 30 else None, ms=3)
        lr.plot(segment["steps"], segment["lr"], "-", color=colour, lw=1.8)
        for ax in (loss, lr):
            ax.axvline(segment["begin"], color="#777777", lw=0.8, ls=":")
    if all(v > 0 for s in segments for v in s["loss"]):
        loss.set_yscale("log")
    loss.set_ylabel("train loss")
    loss.set_title("training (metrics.csv; dotted lines: a train stage starts)")
    loss.legend(loc="upper right", ncol=min(len(seen), 5))
    lr.set_ylabel("learning rate")
    lr.set_xlabel("training step (the train stages one after another)")
    return figure


def sensitivity_figure(value: str, curves: dict[str, list[tuple[float, float]]]):
    """One line per layer: `value` against the level that layer alone was pruned to."""
    from matplotlib import colormaps

    legend_inside = len(curves) <= 12
    figure, axes = new_figure(9 if legend_inside else 11, 5.5)
    ax = axes[0, 0]
    cmap = colormaps["viridis"]
    for index, (name, pairs) in enumerate(curves.items()):
        xs, ys = zip(*pairs)
        ax.plot([100 * x for x in xs], ys, "o-", ms=4, lw=1.5, color=cmap(index / max(len(curves) - 1, 1)),
                label=short(name))
    ax.set_xlabel("sparsity of the layer alone (%)")
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title("sensitivity: each layer pruned alone")
    ax.legend(fontsize=8, ncol=1 if legend_inside else 2, loc="upper left" if legend_inside else "center left",
              bbox_to_anchor=None if legend_inside else (1.01, 0.5))
    return figure


def bench_layers_figure(rows: list[dict]):
    """Per layer and batch size: the chosen executor's speedup over dense (1.0 = dense)."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    height = 0.8 / len(batches)
    figure, axes = new_figure(9, 1.8 + 0.3 * len(layers) * max(1, len(batches) * 0.6))
    ax = axes[0, 0]
    top = max(r["speedup"] for r in rows)
    for b, batch in enumerate(batches):
        mine = {r["layer"]: r for r in rows if r["batch"] == batch}
        ys = [i - 0.4 + height * (b + 0.5) for i, layer in enumerate(layers) if layer in mine]
        values = [mine[layer] for layer in layers if layer in mine]
        ax.barh(ys, [r["speedup"] for r in values], height=height * 0.9, color=round_colour(b), label=f"batch {batch}")
        for y, r in zip(ys, values):
            ax.text(r["speedup"] + top * 0.01, y, f"{r['speedup']:.2f}x {r['chosen']}", va="center", fontsize=7)
    ax.axvline(1.0, color="#555555", ls="--", lw=1)
    ax.set_yticks(range(len(layers)), [short(n) for n in layers], fontsize=9)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("speedup of the chosen executor over dense (x)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(batches))
    ax.set_title("bench: per-layer speedup", pad=24)
    return figure


def bench_end_to_end_figure(rows: list[dict]):
    """Per batch size: median time per batch of each model, min-max as a whisker."""
    batches = sorted({r["batch"] for r in rows})
    figure, axes = new_figure(min(3.2 * len(batches) + 1, 13), 4.5, 1, len(batches))
    colours = {"dense": DENSE, "masked": PRUNED, "calibrated": KEPT}
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch]
        xs = range(len(mine))
        medians = [r["median_ms"] for r in mine]
        errors = [[r["median_ms"] - r["min_ms"] for r in mine], [r["max_ms"] - r["median_ms"] for r in mine]]
        ax.bar(xs, medians, yerr=errors, capsize=4, color=[colours.get(r["model"], "#8c6bb1") for r in mine])
        for x, m in zip(xs, medians):
            ax.annotate(f"{m:.2f}", (x, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
        ax.set_xticks(list(xs), [r["model"] for r in mine])
        ax.set_title(f"batch {batch}", fontsize=11)
        ax.grid(axis="x", visible=False)
    axes[0, 0].set_ylabel("ms per batch (median; whiskers min-max)")
    figure.suptitle("bench: end to end", fontweight="bold")
    return figure
