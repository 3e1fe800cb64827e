"""The bench result as text: what the sparsity buys end to end, per layer, in multiply-adds and bytes.

`render_bench` prints the whole result of `sparsify bench`; `bench_summary` is the few lines
`report` shows from a run's latest bench.json.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_NOTES = {"dense": "dense weights, dense kernels", "masked": "pruned weights, dense kernels",
               "calibrated": "pruned weights, fastest executor per layer",
               "compact": "unused channels removed (export --compact), dense kernels"}


def human(count: float, unit: str = "") -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= limit:
            return f"{count / limit:.2f}{suffix}{unit}"
    return f"{count:g}{unit}"


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def header_lines(result: dict) -> list[str]:
    env, costs, sizes = result["environment"], result["costs"], result["sizes"]
    return [
        f"bench of {result['checkpoint']} ({result['arch']}, pattern {result.get('pattern') or 'none'}) on "
        f"{env['device']} ({env['device_name']}), {env['threads']} thread(s), torch {env['torch']}, "
        f"input {'x'.join(map(str, result['input']))}",
        f"parameters {human(costs['params'])}, nonzero {human(costs['nonzero_params'])} "
        f"({costs['nonzero_params'] / max(costs['params'], 1):.1%}); multiply-adds per image "
        f"{human(costs['macs'])} dense, {human(costs['effective_macs'])} on kept weights ({costs['mac_ratio']:.1%})",
        f"checkpoint {megabytes(sizes['checkpoint'])}; safetensors export {megabytes(sizes['safetensors_export'])}, "
        f"{megabytes(sizes['safetensors_export_zlib'])} compressed (zlib)",
        *compaction_lines(result.get("compaction")),
    ]


def compaction_lines(compaction: dict | None) -> list[str]:
    """Parameters and multiply-adds before and after `export --compact`, and why zero channels stay."""
    if not compaction:
        return []
    if "error" in compaction:
        return [f"compaction: not possible ({compaction['error']})"]
    lines = [f"compaction: {compaction['removed_channels']} channels removed; parameters "
             f"{human(compaction['params_before'])} -> {human(compaction['params_after'])}, multiply-adds per "
             f"image {human(compaction['macs_before'])} -> {human(compaction['macs_after'])} "
             f"({compaction['macs_after'] / max(compaction['macs_before'], 1):.1%})"]
    kept = compaction.get("kept") or []
    if kept:
        zeros = sum(plan["kept_zero"] for plan in kept)
        lines.append(f"compaction keeps {zeros} zero channels in {len(kept)} channel sets; first: "
                     f"{kept[0]['producers'][0]}: {kept[0]['reason']}")
    return lines


def end_to_end_lines(result: dict) -> list[str]:
    lines = [f"end to end (median of {result['end_to_end'][0]['runs']} interleaved runs; dense is "
             f"{result['dense_source']}):" if result["end_to_end"] else "end to end: not measured"]
    lines.append(f"  {'batch':>5}  {'model':<10}  {'median ms':>10}  {'min-max ms':>17}  {'images/s':>9}  "
                 f"{'vs dense':>8}  what runs")
    for row in result["end_to_end"]:
        lines.append(f"  {row['batch']:>5}  {row['model']:<10}  {row['median_ms']:>10.2f}  "
                     f"{row['min_ms']:>8.2f}-{row['max_ms']:<8.2f}  {row['images_per_s']:>9.1f}  "
                     f"{row['vs_dense']:>7.3f}x  {MODEL_NOTES.get(row['model'], '')}")
    return lines


def layer_lines(result: dict) -> list[str]:
    rows = result["layers"]
    if not rows:
        return ["per layer: no pruned layer"]
    executors = sorted({name for row in rows for name in row["times_ms"]}, key=lambda n: (n != "dense", n))
    lines = ["per layer (median ms per executor; chosen = fastest, dense unless another beats it by the margin):"]
    lines.append(f"  {'batch':>5}  {'layer':<32}  {'kind':<14}  {'density':>7}  "
                 + "  ".join(f"{name:>9}" for name in executors) + f"  {'chosen':<15}  speedup")
    for row in rows:
        times = "  ".join(f"{row['times_ms'][name]:>9.3f}" if name in row["times_ms"] else f"{'-':>9}"
                          for name in executors)
        lines.append(f"  {row['batch']:>5}  {row['layer'][:32]:<32}  {row['kind'][:14]:<14}  {row['density']:>7.1%}  "
                     f"{times}  {row['chosen']:<15}  {row['speedup']:.2f}x")
    return lines


def render_bench(result: dict, fmt: str = "table") -> str:
    """`fmt` table (text) or json."""
    if fmt == "json":
        return json.dumps(result, indent=1)
    lines = header_lines(result) + [""] + end_to_end_lines(result) + [""] + layer_lines(result)
    lines.append(f"\nmeasured in {result['seconds']:.1f} s" + (f"; written to {result['written']}"
                                                                 if result.get("written") else ""))
    return "\n".join(lines)


def bench_summary(run_root: Path) -> dict | None:
    """The latest bench of a run, in brief (None when there is none or it cannot be read)."""
    try:
        result = json.loads((Path(run_root) / "bench.json").read_text())
        return {"checkpoint": Path(result["checkpoint"]).name, "device": result["environment"]["device_name"],
                "threads": result["environment"]["threads"], "mac_ratio": result["costs"]["mac_ratio"],
                "end_to_end": [{key: row[key] for key in ("batch", "model", "median_ms", "images_per_s", "vs_dense")}
                               for row in result["end_to_end"]],
                "sparse_layers": sum(row["chosen"] != "dense" for row in result["layers"]),
                "compaction": result.get("compaction"),
                "layers": len(result["layers"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
