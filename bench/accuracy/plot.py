"""Learning-curve plot of an accuracy result: validation force MAE against wall-clock time, per package.

    python bench/accuracy/plot.py bench/results/accuracy-aspirin-<date>.json   # writes the .png beside it

Reads the JSON written by rmd17_aspirin.py or acac.py; each package entry ("allegro_fast", "nequip_allegro")
holds a "learning_curve" list of {epoch, wall_s, val_force_mae_meV_per_A, ...}, a "test" dict and optionally
"test_by_temperature" (several test sets, each drawn as a line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"allegro_fast": "allegro-fast", "nequip_allegro": "nequip-allegro 0.8.3"}
COLOURS = {"allegro_fast": "tab:blue", "nequip_allegro": "tab:orange"}


def plot_learning_curves(result: dict, path: Path) -> None:
    """Validation force MAE (log scale) against training wall-clock minutes; the test force MAE as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key, label in LABELS.items():
        entry = result.get(key)
        if not entry:
            continue
        points = [(row["wall_s"] / 60, row["val_force_mae_meV_per_A"]) for row in entry.get("learning_curve", [])
                  if row.get("wall_s") is not None and row.get("val_force_mae_meV_per_A") is not None]
        if points:
            minutes, errors = zip(*points)
            axis.plot(minutes, errors, "o-", markersize=3, color=COLOURS[key], label=f"{label}: validation ({len(points)} epochs)")
        tests = entry.get("test_by_temperature") or {"": entry.get("test", {})}
        for (name, test), style in zip(tests.items(), ("--", ":", "-.")):
            value = test.get("force_mae_meV_per_A")
            if value is not None:
                axis.axhline(value, color=COLOURS[key], linestyle=style, linewidth=1,
                             label=f"{label}: test {name} {value:.1f} meV/Å (best-validation model)".replace("  ", " "))
    axis.set_yscale("log")
    axis.set_xlabel("training wall-clock time (min)")
    axis.set_ylabel("force MAE (meV/Å)")
    load = result.get("load", {}).get("loadavg_1min_mean")
    title = result.get("title", Path(result.get("benchmark", "accuracy")).stem)
    subtitle = f"{result.get('budget_minutes')} min budget, {result.get('threads_per_process', 1)} thread each"
    if load is not None:
        subtitle += f", mean load {load:.1f} on {result.get('machine', {}).get('cpu_count')} cores"
    axis.set_title(f"{title}\n{subtitle}", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        plot_learning_curves(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
