"""Errors of a model on labelled frames: MAE and RMSE of energies, forces and stress, per species for forces.

Definitions (all in meV-based units in the returned dict):
    energy:          over structures s, E_s^pred - E_s^ref                    (meV)
    energy_per_atom: over structures s, (E_s^pred - E_s^ref) / N_s            (meV/atom)
    forces:          over all force components of all atoms                   (meV/Å)
    forces, per species Z: over the components of atoms of species Z          (meV/Å)
    stress:          over the 9 components of structures with a stress label (meV/Å^3)
MAE = mean |error|, RMSE = sqrt(mean error^2). `ErrorSums` keeps sums, so that several batches, or the
shares of several processes, add up exactly before the means are taken.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ase.data
import numpy as np
import torch
from ase import Atoms

from .data import DataError, LabelledDataset

__all__ = ["ErrorSums", "Predictions", "evaluate", "format_metrics", "metrics_from_predictions", "predict"]


@dataclasses.dataclass
class Predictions:
    """Per-structure and per-atom predictions and labels, float64 numpy, eV units.

    energy_* (S,), num_atoms (S,), forces_* (N, 3), atomic_numbers (N,), stress_* (S, 3, 3), has_stress (S,).
    """

    energy_pred: np.ndarray
    energy_ref: np.ndarray
    num_atoms: np.ndarray
    forces_pred: np.ndarray
    forces_ref: np.ndarray
    atomic_numbers: np.ndarray
    stress_pred: np.ndarray
    stress_ref: np.ndarray
    has_stress: np.ndarray


class ErrorSums:
    """Running sums of absolute and squared errors, as a flat float64 tensor (so it can be all-reduced)."""

    FIELDS = ("energy", "energy_per_atom", "forces", "stress")

    def __init__(self, atomic_numbers: Sequence[int] = ()) -> None:
        self.atomic_numbers = list(atomic_numbers)
        # per field: count, sum |e|, sum e^2; then the same per species for forces
        self.values = torch.zeros(3 * (len(self.FIELDS) + len(self.atomic_numbers)), dtype=torch.float64)

    def _add(self, slot: int, errors: torch.Tensor) -> None:
        errors = errors.detach().to(torch.float64).reshape(-1).cpu()
        self.values[3 * slot] += errors.numel()
        self.values[3 * slot + 1] += errors.abs().sum()
        self.values[3 * slot + 2] += errors.pow(2).sum()

    def add(self, energy_error, num_atoms, forces_error, atomic_numbers, stress_error=None) -> None:
        """energy_error (S,) eV, num_atoms (S,), forces_error (N, 3) eV/Å, atomic_numbers (N,),
        stress_error (S', 3, 3) eV/Å^3 for the structures with a stress label."""
        self._add(0, energy_error)
        self._add(1, energy_error / num_atoms.to(energy_error.dtype))
        self._add(2, forces_error)
        if stress_error is not None and stress_error.numel() > 0:
            self._add(3, stress_error)
        for k, z in enumerate(self.atomic_numbers):
            self._add(len(self.FIELDS) + k, forces_error[atomic_numbers == z])

    def _mae_rmse(self, slot: int) -> tuple[float, float, int] | None:
        count, absolute, squared = (float(v) for v in self.values[3 * slot:3 * slot + 3])
        if count == 0:
            return None
        return absolute / count, (squared / count) ** 0.5, int(count)

    def metrics(self) -> dict:
        """MAE and RMSE in meV, meV/atom, meV/Å and meV/Å^3; per_species holds force errors by symbol."""
        result = {}
        units = {"energy": "meV", "energy_per_atom": "meV_per_atom", "forces": "meV_per_A", "stress": "meV_per_A3"}
        for slot, field in enumerate(self.FIELDS):
            values = self._mae_rmse(slot)
            if values is not None:
                result[f"{field}_mae_{units[field]}"] = 1000 * values[0]
                result[f"{field}_rmse_{units[field]}"] = 1000 * values[1]
        per_species = {}
        for k, z in enumerate(self.atomic_numbers):
            values = self._mae_rmse(len(self.FIELDS) + k)
            if values is not None:
                per_species[ase.data.chemical_symbols[z]] = {
                    "forces_mae_meV_per_A": 1000 * values[0], "forces_rmse_meV_per_A": 1000 * values[1],
                    "num_atoms": values[2] // 3,
                }
        result["per_species"] = per_species
        return result


def _as_model(model):
    if isinstance(model, (str, os.PathLike)):
        from .serialization import load
        return load(model)
    return model


def _check_species(model, frames: Sequence[Atoms], source: str) -> None:
    known = set(model.config.atomic_numbers)
    for index, atoms in enumerate(frames):
        unknown = sorted({int(z) for z in atoms.numbers} - known)
        if unknown:
            names = [ase.data.chemical_symbols[z] for z in unknown]
            raise DataError(
                f"{source}, frame {index}: species {names} not in the model's type_names {list(model.config.type_names)}"
            )


def predict(model, frames: Sequence[Atoms] | LabelledDataset, batch_size: int = 16,
            device: str | torch.device | None = None, progress: bool = False, source: str = "data",
            compute_stress: bool | None = None) -> Predictions:
    """Run model on labelled frames in batches; returns predictions and labels (eV units, float64)."""
    model = _as_model(model)
    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    if isinstance(frames, LabelledDataset):
        dataset = frames
    else:
        _check_species(model, frames, source)
        dataset = LabelledDataset(frames, r_max=model.config.r_max, dtype=model.dtype, device=device, source=source)
    was_training = model.training
    model.eval()
    if compute_stress is None:
        compute_stress = dataset.has_any_stress
    parts = {key: [] for key in ("ep", "er", "n", "fp", "fr", "z", "sp", "sr", "hs")}
    batches = dataset.batches(batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=(len(dataset) + batch_size - 1) // batch_size, desc="evaluating", leave=False)
    try:
        for batch in batches:
            periodic = bool(batch.graph.pbc.any())
            out = model(batch.graph, compute_forces=True, compute_stress=compute_stress and periodic,
                        create_graph=False)
            parts["ep"].append(out["energy"].detach().double())
            parts["er"].append(batch.energy)
            parts["n"].append(batch.graph.num_atoms)
            parts["fp"].append(out["forces"].detach())
            parts["fr"].append(batch.forces)
            parts["z"].append(batch.graph.atomic_numbers)
            stress = out.get("stress")
            parts["sp"].append(stress.detach() if stress is not None else torch.zeros_like(batch.stress))
            parts["sr"].append(batch.stress)
            parts["hs"].append(batch.has_stress & (stress is not None))
    finally:
        model.train(was_training)

    def cat(key):
        return torch.cat(parts[key]).cpu().double().numpy() if key not in ("n", "z", "hs") else \
            torch.cat(parts[key]).cpu().numpy()

    return Predictions(
        energy_pred=cat("ep"), energy_ref=cat("er"), num_atoms=cat("n"), forces_pred=cat("fp"),
        forces_ref=cat("fr"), atomic_numbers=cat("z"), stress_pred=cat("sp"), stress_ref=cat("sr"),
        has_stress=cat("hs").astype(bool),
    )


def metrics_from_predictions(predictions: Predictions) -> dict:
    """The metrics dict of module docstring from Predictions (plus num_structures, num_atoms)."""
    p = predictions
    sums = ErrorSums(sorted({int(z) for z in p.atomic_numbers}))
    sums.add(
        torch.as_tensor(p.energy_pred - p.energy_ref), torch.as_tensor(p.num_atoms),
        torch.as_tensor(p.forces_pred - p.forces_ref), torch.as_tensor(p.atomic_numbers),
        torch.as_tensor((p.stress_pred - p.stress_ref)[p.has_stress]),
    )
    metrics = sums.metrics()
    metrics["num_structures"] = len(p.energy_ref)
    metrics["num_atoms"] = int(p.num_atoms.sum())
    return metrics


def evaluate(model, frames: Sequence[Atoms] | str | os.PathLike, batch_size: int = 16,
             device: str | torch.device | None = None, progress: bool = False, source: str | None = None,
             **read_options) -> dict:
    """MAE and RMSE of energy (total and per atom), force components (all and per species) and stress.

    model: a model or a model file; frames: labelled ASE Atoms or a data file (read with
    `read_frames(path, **read_options)`, e.g. energy_unit="kcal/mol"); source names the frames in errors.
    Returns the dict described in
    the module docstring (meV units), with num_structures and num_atoms.
    """
    from .data import read_frames

    source = source or "frames"
    if isinstance(frames, (str, os.PathLike)):
        source = str(frames)
        frames = read_frames(frames, **read_options)
    return metrics_from_predictions(predict(model, frames, batch_size=batch_size, device=device,
                                            progress=progress, source=source))


def format_metrics(metrics: dict, title: str = "") -> str:
    """A few aligned lines: energy, energy per atom, forces (and per species), stress."""
    lines = [title] if title else []
    rows = [("energy", "energy", "meV"), ("energy per atom", "energy_per_atom", "meV_per_atom"),
            ("forces", "forces", "meV_per_A"), ("stress", "stress", "meV_per_A3")]
    shown_units = {"meV": "meV", "meV_per_atom": "meV/atom", "meV_per_A": "meV/Å", "meV_per_A3": "meV/Å³"}
    for label, field, unit in rows:
        if f"{field}_mae_{unit}" in metrics:
            lines.append(f"  {label:<16} MAE {metrics[f'{field}_mae_{unit}']:10.3f}   "
                         f"RMSE {metrics[f'{field}_rmse_{unit}']:10.3f}  {shown_units[unit]}")
    for symbol, values in metrics.get("per_species", {}).items():
        if len(metrics["per_species"]) > 1:
            lines.append(f"  forces on {symbol:<6} MAE {values['forces_mae_meV_per_A']:10.3f}   "
                         f"RMSE {values['forces_rmse_meV_per_A']:10.3f}  meV/Å  ({values['num_atoms']} atoms)")
    return "\n".join(lines)
