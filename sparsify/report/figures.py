"""Which figures a report gets, and their files: `report_figures` draws them (with notes on what was
skipped), `write_figures` saves each as PNG and SVG, `png_bytes` is what the HTML report inlines.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from sparsify.io.files import atomic_write_bytes
from sparsify.io.outputs import make_folder
from sparsify.report import plots, series
from sparsify.report.build import locate


def style():
    """The figures' matplotlib settings, for drawing and saving alike."""
    import matplotlib

    return matplotlib.rc_context(plots.STYLE)


def report_figures(report: dict, *, layers: list[str]) -> tuple[list[plots.NamedFigure], list[str]]:
    """The figures of `report` (masks of `layers`) and notes on the side files that were skipped."""
    plots.require_matplotlib()
    run = locate(Path(report["checkpoint"]))[1]
    figures, notes = [], []
    with style():
        if report["history"]:
            figures.append(plots.NamedFigure("rounds", "top-1 and sparsity per round", plots.rounds_figure(
                series.round_points(report["history"]), dense_acc1=(report.get("outcome") or {}).get("dense_val_acc1"),
                target=report.get("target"))))
        figures.append(plots.NamedFigure("layers", "sparsity per layer",
                                         plots.layers_figure(report["layers"], target=report.get("target"))))
        figures += mask_figures(report, layers)
        if run is not None:
            figures += run_file_figures(run.root, notes)
    return figures, notes


def mask_figures(report: dict, layers: list[str]) -> list[plots.NamedFigure]:
    rows = {r["parameter"]: r for r in report["layers"]}
    found = []
    for name, mask in series.chosen_masks(Path(report["checkpoint"]), layers).items():
        grid, share = series.mask_grid(mask)
        found.append(plots.NamedFigure(f"mask-{name}", f"mask of {name}", plots.mask_figure(
            name, grid, share=share, weight_shape=rows[name]["shape"], pattern=report["pattern"])))
    return found


def run_file_figures(root: Path, notes: list[str]) -> list[plots.NamedFigure]:
    """Training curves (metrics.csv), sensitivity curves (sensitivity.json) and bench timings (bench.json)."""
    from sparsify.training.log import read_rows

    found = []
    segments = series.training_segments(read_rows(root / "metrics.csv"))
    if segments:
        found.append(plots.NamedFigure("training", "training curves", plots.training_figure(segments)))
    data, problems = series.read_side_file(root / "sensitivity.json")
    notes += problems
    if data is not None:
        value, curves = series.sensitivity_curves(data)
        if curves:
            found.append(plots.NamedFigure("sensitivity", "sensitivity per layer", plots.sensitivity_figure(value, curves)))
        else:
            notes.append(f"{root / 'sensitivity.json'} has no per-layer curves in a form the figures read; skipped")
    data, problems = series.read_side_file(root / "bench.json")
    notes += problems
    if data is not None:
        speedups, end_to_end = series.bench_layer_speedups(data), series.bench_end_to_end(data)
        if end_to_end:
            found.append(plots.NamedFigure("bench-end-to-end", "bench: end to end",
                                           plots.bench_end_to_end_figure(end_to_end)))
        if speedups:
            found.append(plots.NamedFigure("bench-layers", "bench: per-layer speedup",
                                           plots.bench_layers_figure(speedups)))
        if not speedups or not end_to_end:
            missing = " and ".join(part for part, rows in (("end-to-end", end_to_end), ("per-layer", speedups))
                                   if not rows)
            notes.append(f"{root / 'bench.json'} has no {missing} timings with the keys the figures need; skipped")
    return found


def file_stem(name: str) -> str:
    """A figure name as a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def figure_bytes(figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    with style():
        figure.savefig(buffer, format=fmt, dpi=plots.PNG_DPI, metadata={"Software": None}
                       if fmt == "png" else {"Date": None, "Creator": None})
    return buffer.getvalue()


def png_bytes(figure) -> bytes:
    return figure_bytes(figure, "png")


def write_figures(figures: list[plots.NamedFigure], folder: Path) -> dict[str, bytes]:
    """<folder>/<name>.png and .svg for each figure (the folder is made); the PNG bytes by figure name."""
    folder = Path(folder)
    make_folder(folder)
    pngs = {}
    for item in figures:
        for fmt in ("png", "svg"):
            data = figure_bytes(item.figure, fmt)
            atomic_write_bytes(folder / f"{file_stem(item.name)}.{fmt}", data)
            if fmt == "png":
                pngs[item.name] = data
    return pngs
