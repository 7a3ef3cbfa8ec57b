"""Figures from benchmark JSON (bench/run.py, bench/roofline.py): PNGs next to the JSON or in --out.

    python bench/plot.py bench/results/cpu-2026-11-21-150000.json            # latency + speedup figures
    python bench/plot.py e2e.json roofline.json --out figures/

- <name>-latency.png: energy + forces latency (median, bars p25-p75) against the number of atoms, one line
  per provider and model (log-log), one panel per task; the training step at its batch size.
- <name>-speedup.png: for every job, median(provider) / median(torch): how many times slower each
  provider is than the torch backend (above 1: torch is faster), on a log axis.
- <name>-roofline.png (roofline JSON, or the "roofline" entry of an end-to-end JSON on CUDA): the
  roofline of the device (copy bandwidth, FMA rate per dtype) and each measured layer at its
  whole-layer arithmetic intensity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MARKERS = {"torch": "o", "torch-compiled": "8", "triton": "s", "triton-compiled": "p", "reference": "^", "nequip": "v",
           "nequip-compiled": "<", "nequip-aoti": ">", "nequip-triton": "D", "nequip-triton-aoti": "d", "nequip-cueq": "P"}


def device_label(result: dict) -> str:
    name = result.get("gpu") or result.get("cpu") or result.get("device", "")
    load = result.get("loadavg_at_start")
    return f"{name}" + (f", load {load[0]:.1f}" if load and result.get("device") == "cpu" else "")


def plot_latency(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if "median_ms" in r]
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for provider, model in sorted({(r["provider"], r["model"]) for r in rows if r["task"] == task}):
            series = sorted((r for r in rows if r["task"] == task and r["provider"] == provider and r["model"] == model),
                            key=lambda r: r["num_atoms"])
            x = [r["num_atoms"] for r in series]
            y = [r["median_ms"] for r in series]
            spread = [[r["median_ms"] - r["p25_ms"] for r in series], [r["p75_ms"] - r["median_ms"] for r in series]]
            axis.errorbar(x, y, yerr=spread, marker=MARKERS.get(provider, "x"), capsize=3,
                          label=f"{provider} ({model})", linestyle="-" if model == "default" else "--")
            for r in series:
                axis.annotate(r["case"], (r["num_atoms"], r["median_ms"]), fontsize=7, alpha=0.6,
                              textcoords="offset points", xytext=(3, 3))
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("atoms")
        axis.set_ylabel("median time per call (ms)" if task == "inference" else "median time per training step (ms)")
        axis.set_title(f"{'energy + forces' if task == 'inference' else 'training step'} ({result.get('settings', {}).get('dtype', '')})")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"allegro-fast end to end: {device_label(result)} ({result.get('date', '')[:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_speedup(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if "median_ms" in r]
    jobs = sorted({(r["case"], r["model"], r["task"]) for r in rows}, key=lambda j: (j[2], j[1], j[0]))
    base = {(r["case"], r["model"], r["task"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    others = [p for p in MARKERS if p != "torch" and any(r["provider"] == p for r in rows)]
    jobs = [j for j in jobs if j in base]
    if not jobs or not others:
        return
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(jobs) * max(1, len(others)) / 2), 4.5))
    width = 0.8 / len(others)
    for k, provider in enumerate(others):
        medians = {(r["case"], r["model"], r["task"]): r["median_ms"] for r in rows if r["provider"] == provider}
        xs = [i + (k - (len(others) - 1) / 2) * width for i, job in enumerate(jobs) if job in medians]
        ratios = [medians[job] / base[job] for job in jobs if job in medians]
        bars = axis.bar(xs, ratios, width, label=f"{provider} / torch")
        for bar, ratio in zip(bars, ratios):
            axis.annotate(f"{ratio:.1f}x", (bar.get_x() + bar.get_width() / 2, ratio), ha="center", va="bottom", fontsize=7)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_xticks(range(len(jobs)))
    axis.set_xticklabels([f"{c}\n{m} {t}" for c, m, t in jobs], fontsize=8)
    axis.set_ylabel("time relative to the torch backend")
    axis.set_title(f"speedup of the torch backend: {device_label(result)}")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_roofline(roofline: dict, path: Path) -> None:
    import numpy as np

    peaks = roofline.get("peaks", {})
    bandwidth = peaks.get("copy_bandwidth", {}).get("bytes_per_s")
    measured = [r for r in roofline.get("measured", []) if "roofline" in r]
    if not bandwidth or not measured:
        return
    figure, axis = plt.subplots(figsize=(7, 5))
    intensity = np.logspace(-1, 3, 100)
    for name, peak in peaks.items():
        if name.startswith("fma_"):
            axis.plot(intensity, np.minimum(peak["flops_per_s"], intensity * bandwidth) / 1e9,
                      label=f"roofline {name[4:]} ({peak['flops_per_s'] / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.0f} GB/s)")
    work = {(w["position"], w["dtype"]): w for w in roofline.get("layers", [])}
    for row in measured:
        layer = work.get((row["position"], row["dtype"]))
        if layer is None:
            continue
        # the fused kernel against its own counts; the device time (CUDA-graph replays) where measured
        part = "fused_core" if row["provider"] == "triton-kernel" else "whole_layer"
        achieved = (row.get("device_roofline") or row["roofline"])[part]["achieved_flops_per_s"] / 1e9
        edges = row.get("num_edges", roofline.get("edges"))
        size = "" if edges == roofline.get("edges") else f" E={edges}"
        axis.scatter(layer[part]["intensity"], achieved, marker=MARKERS.get(row["provider"], "x"))
        axis.annotate(f"{row['provider']} {row['position']} {row['dtype'][5:]}{size}",
                      (layer[part]["intensity"], achieved), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("arithmetic intensity (FLOP / byte, minimal bytes; whole layer, the fused kernel its core)")
    axis.set_ylabel("GFLOP/s (time on the device where measured)")
    axis.set_title(f"one Allegro layer, E = {roofline.get('edges')}: {roofline.get('gpu') or roofline.get('device')}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of bench/run.py or bench/roofline.py")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to each JSON)")
    args = parser.parse_args(argv)
    for path in args.results:
        result = json.loads(path.read_text())
        folder = args.out or path.parent
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if "rows" in result:
            for name, draw in (("latency", plot_latency), ("speedup", plot_speedup)):
                target = folder / f"{path.stem}-{name}.png"
                draw(result, target)
                if target.exists():
                    written.append(target)
        roofline = result if "peaks" in result else result.get("roofline") if isinstance(result.get("roofline"), dict) else None
        if roofline and "peaks" in roofline:
            target = folder / f"{path.stem}-roofline.png"
            plot_roofline(roofline, target)
            if target.exists():
                written.append(target)
        print("\n".join(f"wrote {p}" for p in written) or f"{path}: nothing to plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
