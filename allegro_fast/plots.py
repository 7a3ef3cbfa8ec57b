"""Figures written after training (matplotlib, Agg backend, PNG): the learning curve and parity plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["learning_curve", "parity"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (works without a display)
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    """Write atomically: a half-written PNG never replaces a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=130, bbox_inches="tight")
    os.replace(temporary, path)
    return path


def learning_curve(metrics_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Three panels against epoch: train and validation loss (log), validation energy and force MAE (log),
    and the learning rate (log). Reads a metrics.jsonl written by the trainer."""
    plt = _pyplot()
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if not records:
        for axis in axes:
            axis.text(0.5, 0.5, "no epochs finished", ha="center", va="center", transform=axis.transAxes)
        try:
            return _save(figure, path)
        finally:
            plt.close(figure)
    epochs = np.array([r["epoch"] for r in records])

    def series(key):
        return np.array([r.get(key, np.nan) if r.get(key) is not None else np.nan for r in records], dtype=float)

    loss_axis, error_axis, lr_axis = axes
    loss_axis.plot(epochs, series("train_loss"), label="train (running, during the epoch)")
    if np.isfinite(series("validation_loss")).any():
        loss_axis.plot(epochs, series("validation_loss"), label="validation (EMA weights)")
    best = [r["epoch"] for r in records if r.get("best")]
    if best:
        loss_axis.axvline(best[-1], color="grey", linestyle=":", label=f"best epoch {best[-1]}")
    loss_axis.set(xlabel="epoch", ylabel="loss (weighted MSE, eV-based units)", yscale="log",
                  title="loss")
    loss_axis.legend(fontsize=8)

    force_line = error_axis.plot(epochs, series("validation_forces_mae_meV_per_A"), color="C0",
                                 label="force MAE (meV/Å)")
    energy_axis = error_axis.twinx()
    energy_line = energy_axis.plot(epochs, series("validation_energy_per_atom_mae_meV_per_atom"), color="C1",
                                   label="energy MAE (meV/atom)")
    error_axis.set(xlabel="epoch", ylabel="force MAE (meV/Å)", yscale="log", title="validation errors (EMA)")
    energy_axis.set(ylabel="energy MAE (meV/atom)", yscale="log")
    error_axis.legend(handles=force_line + energy_line, fontsize=8)

    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_axis.plot(epochs, series("learning_rate"), color="C2")
    lr_axis.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="learning rate (ReduceLROnPlateau)")
    figure.tight_layout()
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def parity(predictions, path: str | os.PathLike, title: str = "") -> Path:
    """Predicted against reference energy per atom (eV/atom), force components (eV/Å) and, where labelled,
    stress components (meV/Å³), with MAE and RMSE in the legends."""
    plt = _pyplot()
    p = predictions
    panels = [
        ("energy per atom", p.energy_ref / p.num_atoms, p.energy_pred / p.num_atoms, "eV/atom", 1000, "meV/atom"),
        ("force components", p.forces_ref.reshape(-1), p.forces_pred.reshape(-1), "eV/Å", 1000, "meV/Å"),
    ]
    if p.has_stress.any():
        panels.append(("stress components", 1000 * p.stress_ref[p.has_stress].reshape(-1),
                       1000 * p.stress_pred[p.has_stress].reshape(-1), "meV/Å³", 1, "meV/Å³"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2))
    for axis, (name, reference, predicted, unit, to_error_unit, error_unit) in zip(np.atleast_1d(axes), panels):
        error = predicted - reference
        mae, rmse = np.abs(error).mean() * to_error_unit, np.sqrt((error**2).mean()) * to_error_unit
        low, high = float(min(reference.min(), predicted.min())), float(max(reference.max(), predicted.max()))
        pad = 0.05 * (high - low or 1.0)
        axis.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", linewidth=1, label="y = x")
        axis.scatter(reference, predicted, s=4, alpha=0.5,
                     label=f"MAE {mae:.3g} {error_unit}\nRMSE {rmse:.3g} {error_unit}\n{len(reference)} points")
        axis.set(xlabel=f"reference {name} ({unit})", ylabel=f"predicted {name} ({unit})",
                 xlim=(low - pad, high + pad), ylim=(low - pad, high + pad), aspect="equal", title=name)
        axis.legend(fontsize=8, loc="upper left")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)
