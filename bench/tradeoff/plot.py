"""Pareto plot of a trade-off result: test force MAE against inference cost, one point per model size.

    python bench/tradeoff/plot.py bench/results/tradeoff-<date>.json [--cost single|batch]

x: energy + forces cost, µs per atom in batches (`--cost batch`, default) or ms per aspirin structure
(`--cost single`); y: test force MAE (meV/Å). The Pareto front (no other point both cheaper and more accurate)
is joined by a line. Writes <json>.png beside the JSON (or <json>-single.png for --cost single) and prints the
table of points with the front marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (cost, error, name) not dominated by another (cheaper-or-equal and more accurate), by cost."""
    front, best_error = [], float("inf")
    for cost, error, name in sorted(points):
        if error < best_error:
            front.append((cost, error, name))
            best_error = error
    return front


def cost_of(row: dict, cost: str) -> float:
    return row["batch"]["us_per_atom"] if cost == "batch" else row["single"]["cost_ms"]


def describe(row: dict) -> str:
    model = row["model"]
    if "preset" in model:
        return f"preset {model['preset']}"
    return (f"{model['num_layers']}L l{model['l_max']} n{model['num_tensor_features']} "
            f"F{model['num_scalar_features']} r{model['r_max']:g}")


def plot(result: dict, path: Path, cost: str) -> list[tuple[float, float, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["points"] if "test" in row]
    points = [(cost_of(row, cost), row["test"]["force_mae_meV_per_A"], row["name"]) for row in rows]
    front = pareto_front(points)
    figure, axis = plt.subplots(figsize=(7.5, 5))
    for index, (row, (x, y, name)) in enumerate(zip(sorted(rows, key=lambda r: cost_of(r, cost)), sorted(points))):
        on_front = any(name == f[2] for f in front)
        axis.scatter([x], [y], s=40, color="tab:red" if on_front else "tab:blue", zorder=3)
        # Neighbours in cost alternate above and below their marker so that labels do not overlap.
        axis.annotate(f"{name} ({row['epochs']} ep)", (x, y), textcoords="offset points",
                      xytext=(5, -11 if index % 2 == 0 else 5), fontsize=8)
    if front:
        axis.plot([f[0] for f in front], [f[1] for f in front], color="tab:red", linewidth=1, label="Pareto front")
    axis.set_xscale("log")
    axis.set_yscale("log")
    unit = "µs/atom (batches of {} structures)".format(rows[0]["batch"]["num_structures"]) if cost == "batch" \
        else "ms per aspirin structure (21 atoms)"
    basis = rows[0].get("cost_basis", "median wall time")
    axis.set_xlabel(f"energy + forces cost, {unit}\n{basis}, {result['device']}, "
                    f"{result['inference_threads']} thread(s)", fontsize=9)
    axis.set_ylabel("test force MAE (meV/Å)")
    load = result.get("load_during_training", {}).get("loadavg_1min_mean")
    axis.set_title(f"rMD17 aspirin: accuracy after {result['budget_minutes_per_point']} min of training vs cost\n"
                   f"{result['concurrent_trainings']} trainings at once, 1 thread each, mean load "
                   f"{load:.1f} on {result['machine']['cpu_count']} cores", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    sizes = "\n".join(f"{row['name']}: {describe(row)}" for row in rows)
    axis.text(0.99, 0.02, sizes, transform=axis.transAxes, fontsize=7, ha="right", va="bottom", family="monospace",
              bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)
    return front


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--cost", choices=["batch", "single"], default="batch")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    path = args.result.with_suffix(".png") if args.cost == "batch" else \
        args.result.with_name(args.result.stem + "-single.png")
    front = {name for _, _, name in plot(result, path, args.cost)}
    print(f"{'point':<14} {'size':<24} {'params':>8} {'epochs':>6} {'E MAE meV':>10} {'F MAE meV/Å':>12} "
          f"{'ms/struct':>10} {'µs/atom':>8}  front")
    for row in result["points"]:
        if "test" not in row:
            print(f"{row['name']:<14} failed: {row.get('error', {}).get('error')}")
            continue
        print(f"{row['name']:<14} {describe(row):<24} {row['num_parameters']:>8} {row['epochs']:>6} "
              f"{row['test']['energy_mae_meV']:>10.1f} {row['test']['force_mae_meV_per_A']:>12.1f} "
              f"{row['single']['cost_ms']:>10.2f} {row['batch']['us_per_atom']:>8.1f}  "
              f"{'*' if row['name'] in front else ''}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
