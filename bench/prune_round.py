"""Benchmark: one prune round over every eligible layer of torchvision resnet50 (random weights).

Measured (interleaved, `--repeats` times, order rotated each repeat):
  * the round schedule with criterion `variance` (target 0.5, step 0.2 of the remaining groups,
    keep_rows + keep_cols): round 1 from full masks, then rounds 2, 3, ... from the evolving
    masks until a round zeros nothing (the round `sparsify prune` answers with exit 3);
  * round 1 from full masks with criteria `l1` and `l2`;
  * baselines: the `variance` scores alone (`score_groups` over all layers), and one float64
    pass over the eligible weights (`w.double().sum()`), a floor for any float64 criterion.

Targets: round 1 (variance) median <= 1.0 s, and exactly 4 rounds zero something before the
target is reached.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, parser, progress, ratio, summary, timed  # noqa: E402

TARGET_FIRST_ROUND_S = 1.0
TARGET_ROUNDS = 4
CRITERIA = ("variance", "l1", "l2")


def block_sizes(shape, pattern):
    """Number of weights in each block of the mask grid (short tail blocks at the edges)."""
    import numpy as np

    cout, cin = shape[:2]
    taps = 1
    for d in shape[2:]:
        taps *= d
    rows = -(-cout // pattern.bo)
    cols = -(-cin // pattern.bi)
    row_len = np.minimum(pattern.bo, cout - np.arange(rows) * pattern.bo)
    col_len = np.minimum(pattern.bi, cin - np.arange(cols) * pattern.bi)
    return np.outer(row_len, col_len) * taps


def main() -> None:
    args = parser(__doc__.splitlines()[0], default_repeats=5).parse_args()
    args_max_rounds = 50

    import torch
    import torchvision

    from sparsify.core.criteria import score_groups
    from sparsify.core.masks import full_masks
    from sparsify.core.block import BlockPattern
    from sparsify.core.prune import PruneSettings, find_layers, prune_round

    torch.manual_seed(0)
    progress("building resnet50 (random weights)")
    model = torchvision.models.resnet50()
    model.eval()
    pattern = BlockPattern(8, 8)
    layers = find_layers(model, pattern, include_linear=False, exclude=[])
    eligible = [layer.name for layer in layers if layer.reason is None]
    weights = dict(model.named_parameters())
    full = full_masks(model, eligible, pattern)
    settings = {
        c: PruneSettings(pattern=pattern, criterion=c, target=0.5, step=0.2) for c in CRITERIA
    }
    sizes = {n: block_sizes(tuple(weights[n].shape), pattern) for n in eligible}
    eligible_weights = sum(weights[n].numel() for n in eligible)
    all_params = sum(p.numel() for p in model.parameters())
    progress(f"{len(eligible)} eligible layers of {len(layers)}, {eligible_weights:,} eligible weights")

    def zeros_of(masks) -> int:
        return int(sum(sizes[n][~masks[n].numpy()].sum() for n in masks))

    def schedule():
        """Rounds from full masks until one zeros nothing; per-round time and facts."""
        masks, rounds = full, []
        for number in range(1, args_max_rounds + 1):
            seconds, (new, log) = timed(prune_round, weights, masks, settings["variance"])
            zeroed = sum(e.zeros_after - e.zeros_before for e in log)
            grew = [n for n in new if bool((new[n] & ~masks[n]).any())]
            zeros = zeros_of(new)
            rounds.append({
                "round": number,
                "seconds": seconds,
                "groups_zeroed": zeroed,
                "sparsity_eligible": zeros / eligible_weights,
                "sparsity_all_params": zeros / all_params,
                "layers_at_target": sum(e.zeros_after >= e.target_zeros for e in log),
                "layers_limited_by_constraints": sum(bool(e.note) for e in log),
                "masks_grew": grew,
            })
            masks = new
            if zeroed == 0:
                break
        return rounds, masks

    def first_round(criterion):
        return timed(prune_round, weights, full, settings[criterion])[0]

    def score_only():
        def run():
            for n in eligible:
                score_groups("variance", weights[n], pattern)
        return timed(run)[0]

    def read_f64():
        def run():
            with torch.no_grad():
                for n in eligible:
                    weights[n].detach().double().sum()
        return timed(run)[0]

    progress("warm-up")
    for c in CRITERIA:
        first_round(c)
    score_only()
    read_f64()

    items = ["schedule", "l1", "l2", "score_only", "read_f64"]
    times = {k: [] for k in ("variance", "l1", "l2", "score_only", "read_f64")}
    round_times: dict[int, list[float]] = {}
    reference_rounds = reference_masks = None
    deterministic = True
    for rep in range(args.repeats):
        order = items[rep % len(items):] + items[:rep % len(items)]
        for item in order:
            if item == "schedule":
                rounds, masks = schedule()
                times["variance"].append(rounds[0]["seconds"])
                for r in rounds:
                    round_times.setdefault(r["round"], []).append(r["seconds"])
                if reference_masks is None:
                    reference_rounds, reference_masks = rounds, masks
                else:
                    deterministic &= all(torch.equal(masks[n], reference_masks[n]) for n in masks)
            elif item in ("l1", "l2"):
                times[item].append(first_round(item))
            elif item == "score_only":
                times["score_only"].append(score_only())
            else:
                times["read_f64"].append(read_f64())
        progress(f"repeat {rep + 1}/{args.repeats}: round 1 (variance) {times['variance'][-1]:.3f} s, "
                 f"l1 {times['l1'][-1]:.3f} s, l2 {times['l2'][-1]:.3f} s, "
                 f"scores only {times['score_only'][-1]:.3f} s, float64 pass {times['read_f64'][-1]:.3f} s")

    med = {k: summary(v)["median"] for k, v in times.items()}
    rounds_to_target = sum(r["groups_zeroed"] > 0 for r in reference_rounds)
    first_ok = med["variance"] <= TARGET_FIRST_ROUND_S
    rounds_ok = rounds_to_target == TARGET_ROUNDS
    shrink_ok = not any(r["masks_grew"] for r in reference_rounds)
    result = {
        "benchmark": "prune_round",
        "model": "torchvision resnet50, random weights",
        "settings": {"pattern": "block 8x8", "criterion": "variance", "target": 0.5, "step": 0.2,
                     "step_basis": "remaining", "keep_rows": True, "keep_cols": True, "balanced": False},
        "eligible_layers": len(eligible),
        "layers": len(layers),
        "eligible_weights": eligible_weights,
        "repeats": args.repeats,
        "first_round_s": {c: summary(times[c]) for c in CRITERIA},
        "later_rounds_s": {f"round_{k}": summary(v) for k, v in sorted(round_times.items()) if k > 1},
        "baseline_s": {
            "variance_scores_only": summary(times["score_only"]),
            "float64_pass_over_weights": summary(times["read_f64"]),
        },
        "ratios": {
            "first_round_variance_over_scores_only": ratio(med["variance"], med["score_only"]),
            "first_round_variance_over_float64_pass": ratio(med["variance"], med["read_f64"]),
            "scoring_share_of_first_round": ratio(med["score_only"], med["variance"]),
            "l1_over_variance": ratio(med["l1"], med["variance"]),
            "l2_over_variance": ratio(med["l2"], med["variance"]),
        },
        "rounds": [
            {
                "round": r["round"],
                "groups_zeroed": r["groups_zeroed"],
                "sparsity_eligible": round(r["sparsity_eligible"], 6),
                "sparsity_all_params": round(r["sparsity_all_params"], 6),
                "layers_at_target": r["layers_at_target"],
                "layers_limited_by_constraints": r["layers_limited_by_constraints"],
            }
            for r in reference_rounds
        ],
        "rounds_to_target": rounds_to_target,
        "final_sparsity_eligible": round(reference_rounds[-1]["sparsity_eligible"], 6),
        "checks": {
            "masks_only_shrink": shrink_ok,
            "same_masks_every_repeat": deterministic,
        },
        "target": {
            "first_round_variance_median_s_max": TARGET_FIRST_ROUND_S,
            "rounds_to_target_exactly": TARGET_ROUNDS,
        },
        "pass_first_round": first_ok,
        "pass_rounds": rounds_ok,
        "pass": bool(first_ok and rounds_ok and shrink_ok and deterministic),
    }
    emit(result)


if __name__ == "__main__":
    main()
