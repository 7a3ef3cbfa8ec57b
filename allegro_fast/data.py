"""Labelled structures: reading, unit conversion, splits and batches.

A labelled frame is an ``ase.Atoms`` with a SinglePointCalculator carrying energy (eV), forces (eV/Å)
and, for periodic data where the file has it, stress (eV/Å^3, ASE's Voigt order xx yy zz yz xz xy).
`read_frames` returns such frames from any ASE-readable file (extxyz first) or an rMD17-style ``.npz``
(keys nuclear_charges (N,), coords (F, N, 3), energies (F,), forces (F, N, 3); the MD17 names z, R, E, F
are accepted too), converting energies from `energy_unit` and lengths from `length_unit`. Every problem
is reported with the file, the frame and the field.

`LabelledDataset` holds frames with their neighbour lists built once (positions do not change between
epochs) and yields `Batch`es of several structures of different sizes by concatenating the per-structure
graphs (`collate`), so no neighbour search runs during training.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import ase.data
import ase.io
import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.formats import string2index

from .graph import AtomicGraph

__all__ = [
    "ENERGY_UNIT_IN_EV",
    "LENGTH_UNIT_IN_ANGSTROM",
    "Batch",
    "DataError",
    "LabelledDataset",
    "Split",
    "collate",
    "read_frames",
    "species_of",
    "split_frames",
]

ENERGY_UNIT_IN_EV = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": units.kcal / units.mol,  # 0.0433641 eV
    "kJ/mol": units.kJ / units.mol,
    "Hartree": units.Hartree,
    "Ry": units.Rydberg,
}
LENGTH_UNIT_IN_ANGSTROM = {"Å": 1.0, "Angstrom": 1.0, "Bohr": units.Bohr, "nm": 10.0}

_NPZ_KEYS = {  # our name: accepted names in the file, first found wins
    "numbers": ("nuclear_charges", "z", "Z"),
    "positions": ("coords", "R"),
    "energies": ("energies", "E"),
    "forces": ("forces", "F"),
}


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the frame and the field."""


# ----------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------
def read_frames(
    path: str | os.PathLike,
    format: str | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Å",
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    index: str | int | slice = ":",
) -> list[Atoms]:
    """Labelled frames (energy in eV, forces in eV/Å, stress in eV/Å^3 where present) from a file.

    format: "npz" for rMD17-style arrays, otherwise an ASE format name (None: from the suffix).
    Every frame must have finite energy and forces with one row per atom; an error names the file, the
    frame (0-based) and the field.
    """
    path = Path(path)
    if energy_unit not in ENERGY_UNIT_IN_EV:
        raise DataError(f"{path}: unknown energy unit '{energy_unit}'; choose one of {list(ENERGY_UNIT_IN_EV)}")
    if length_unit not in LENGTH_UNIT_IN_ANGSTROM:
        raise DataError(f"{path}: unknown length unit '{length_unit}'; choose one of {list(LENGTH_UNIT_IN_ANGSTROM)}")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    energy_factor = ENERGY_UNIT_IN_EV[energy_unit]
    length_factor = LENGTH_UNIT_IN_ANGSTROM[length_unit]

    if format == "npz" or (format is None and path.suffix == ".npz"):
        raw = _read_npz(path)
    else:
        raw = _read_ase(path, format, energy_key, forces_key, stress_key)
    if isinstance(index, str):
        index = string2index(index)  # ASE's syntax: ":", "-1", "::10", "5:20"
    try:
        frame_numbers = range(len(raw))[index] if isinstance(index, slice) else [range(len(raw))[index]]
    except (IndexError, TypeError):
        raise DataError(f"{path}: frame index {index!r} does not select from its {len(raw)} frames") from None

    frames = []
    for frame_index in frame_numbers:
        atoms, energy, forces, stress = raw[frame_index]
        where = f"{path}, frame {frame_index}"
        energy, forces, stress = _checked_labels(where, len(atoms), energy, forces, stress)
        atoms = atoms.copy()
        atoms.calc = None
        if length_factor != 1.0:
            atoms.set_cell(atoms.cell.array * length_factor, scale_atoms=False)
            atoms.positions = atoms.positions * length_factor
        results = {"energy": energy * energy_factor, "forces": forces * (energy_factor / length_factor)}
        if stress is not None:
            results["stress"] = stress * (energy_factor / length_factor**3)
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    if not frames:
        raise DataError(f"{path}: no frames")
    return frames


def _checked_labels(where: str, num_atoms: int, energy, forces, stress):
    if num_atoms == 0:
        raise DataError(f"{where}: the frame has no atoms")
    if energy is None:
        raise DataError(f"{where}: field 'energy' is missing")
    try:
        energy = float(np.asarray(energy).reshape(()))
    except (TypeError, ValueError):
        raise DataError(f"{where}: field 'energy' is not a single number ({energy!r})") from None
    if not np.isfinite(energy):
        raise DataError(f"{where}: field 'energy' is not finite ({energy})")
    if forces is None:
        raise DataError(f"{where}: field 'forces' is missing")
    forces = np.asarray(forces, dtype=np.float64)
    if forces.shape != (num_atoms, 3):
        raise DataError(f"{where}: field 'forces' has shape {forces.shape}, expected ({num_atoms}, 3)")
    bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
    if len(bad):
        raise DataError(f"{where}: field 'forces' is not finite on atom {int(bad[0])}")
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (3, 3):
            stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        if stress.shape != (6,):
            raise DataError(f"{where}: field 'stress' has shape {stress.shape}, expected (6,) or (3, 3)")
        if not np.isfinite(stress).all():
            raise DataError(f"{where}: field 'stress' is not finite")
    return energy, forces, stress


def _read_ase(path: Path, format: str | None, energy_key: str, forces_key: str, stress_key: str):
    """(atoms, energy, forces, stress) per frame; frames read one at a time so an error names its frame."""
    raw = []
    try:
        for atoms in ase.io.iread(str(path), index=":", format=format):
            raw.append(_ase_labels(atoms, energy_key, forces_key, stress_key))
    except DataError:
        raise
    except Exception as error:  # ASE raises many kinds for a malformed file
        raise DataError(
            f"{path}, frame {len(raw)}: cannot read the frame ({type(error).__name__}: {error}); "
            f"the file may be truncated or not in {format or 'the format its suffix suggests'}"
        ) from error
    return raw


def _ase_labels(atoms: Atoms, energy_key: str, forces_key: str, stress_key: str):
    results = atoms.calc.results if atoms.calc is not None else {}

    def find(key, standard, store):
        if key in store:
            return store[key]
        if key == standard and standard in results:
            return results[standard]
        return None

    energy = find(energy_key, "energy", atoms.info)
    if energy is None and energy_key == "energy" and "free_energy" in results:
        energy = results["free_energy"]
    forces = find(forces_key, "forces", atoms.arrays)
    stress = find(stress_key, "stress", atoms.info)
    return atoms, energy, forces, stress


def _read_npz(path: Path):
    try:
        arrays = np.load(path)
        keys = set(arrays.files)
    except Exception as error:
        raise DataError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from error

    def get(field):
        for name in _NPZ_KEYS[field]:
            if name in keys:
                try:
                    return name, np.asarray(arrays[name])
                except Exception as error:
                    raise DataError(f"{path}: field '{name}' cannot be read ({error}); the file may be truncated") from error
        raise DataError(f"{path}: field '{_NPZ_KEYS[field][0]}' is missing (the file has {sorted(keys)})")

    (numbers_key, numbers), (positions_key, positions) = get("numbers"), get("positions")
    (energies_key, energies), (forces_key, forces) = get("energies"), get("forces")
    if numbers.ndim != 1:
        raise DataError(f"{path}: field '{numbers_key}' must have shape (N,), got {numbers.shape}")
    num_atoms = numbers.shape[0]
    if positions.ndim != 3 or positions.shape[1:] != (num_atoms, 3):
        raise DataError(f"{path}: field '{positions_key}' must have shape (frames, {num_atoms}, 3), got {positions.shape}")
    num_frames = positions.shape[0]
    energies = energies.reshape(-1) if energies.ndim == 2 and energies.shape[1] == 1 else energies
    if energies.shape != (num_frames,):
        raise DataError(f"{path}: field '{energies_key}' must have shape ({num_frames},), got {energies.shape}")
    if forces.shape != positions.shape:
        raise DataError(f"{path}: field '{forces_key}' must have shape {positions.shape}, got {forces.shape}")
    raw = []
    for frame in range(num_frames):
        if not np.isfinite(positions[frame]).all():
            raise DataError(f"{path}, frame {frame}: field '{positions_key}' is not finite")
        atoms = Atoms(numbers=numbers.astype(int), positions=positions[frame].astype(np.float64))
        raw.append((atoms, energies[frame], forces[frame], None))
    return raw


# ----------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Split:
    train: list[Atoms]
    validation: list[Atoms]
    test: list[Atoms]


def _count(value: float | None, total: int, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float):
        return round(value * total)
    return int(value)


def split_frames(
    frames: Sequence[Atoms],
    n_train: float,
    n_val: float,
    n_test: float | None = 0,
    seed: int = 0,
    source: str = "the data",
) -> Split:
    """Shuffle with seed, then the first n_train frames train, the next n_val validate, the next n_test test.

    Counts are ints, or floats in (0, 1) as fractions of len(frames); n_test None takes all that remain.
    """
    total = len(frames)
    train_count = _count(n_train, total, "n_train")
    val_count = _count(n_val, total, "n_val")
    test_count = _count(n_test, total, "n_test")
    if train_count < 1:
        raise DataError(f"{source}: n_train = {n_train} gives no training frames out of {total}")
    used = train_count + val_count + (test_count or 0)
    if used > total:
        raise DataError(
            f"{source} has {total} frames, fewer than n_train {train_count} + n_val {val_count}"
            + (f" + n_test {test_count}" if test_count else "")
        )
    order = np.random.default_rng(seed).permutation(total)
    train = [frames[i] for i in order[:train_count]]
    validation = [frames[i] for i in order[train_count:train_count + val_count]]
    rest = order[train_count + val_count:]
    test = [frames[i] for i in (rest if test_count is None else rest[:test_count])]
    return Split(train=train, validation=validation, test=test)


def species_of(frames: Sequence[Atoms]) -> list[str]:
    """Chemical symbols present in the frames, ordered by atomic number."""
    numbers = sorted({int(z) for atoms in frames for z in atoms.numbers})
    return [ase.data.chemical_symbols[z] for z in numbers]


# ----------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------
def collate(graphs: Sequence[AtomicGraph]) -> AtomicGraph:
    """One batch graph from several graphs (each of any number of structures): atoms and edges concatenated,
    atom indices and structure indices offset. Equal to AtomicGraph.from_ase of all their structures."""
    if len(graphs) == 1:
        return graphs[0]
    atom_offsets = np.cumsum([0] + [g.num_nodes for g in graphs])
    edge_offsets = np.cumsum([0] + [g.num_edges for g in graphs])
    structure_offsets = np.cumsum([0] + [g.num_structures for g in graphs])
    return AtomicGraph(
        positions=torch.cat([g.positions for g in graphs]),
        atomic_numbers=torch.cat([g.atomic_numbers for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(offset) for g, offset in zip(graphs, atom_offsets)], dim=1),
        edge_shift=torch.cat([g.edge_shift for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        batch=torch.cat([g.batch + int(offset) for g, offset in zip(graphs, structure_offsets)]),
        num_atoms=torch.cat([g.num_atoms for g in graphs]),
        center_ptr=torch.cat([graphs[0].center_ptr[:1]]
                             + [g.center_ptr[1:] + int(offset) for g, offset in zip(graphs, edge_offsets)]),
        r_max=graphs[0].r_max,
    )


@dataclasses.dataclass
class Batch:
    """Several structures and their labels, on one device in one float dtype.

    energy (B,) eV, always float64 (see training.loss_sums); forces (N, 3) eV/Å; stress (B, 3, 3) eV/Å^3 (zeros where absent); has_stress (B,) bool;
    species (N,) atomic numbers (the graph's).
    """

    graph: AtomicGraph
    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor
    has_stress: torch.Tensor

    @property
    def num_structures(self) -> int:
        return self.graph.num_structures


def _voigt_to_matrix(voigt: np.ndarray) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = voigt
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


class LabelledDataset:
    """Frames with neighbour lists built once; `batches` yields `Batch`es in a given order.

    Graphs are stored in float64 (as found) and cast to `dtype` per batch on `device`.
    """

    def __init__(self, frames: Sequence[Atoms], r_max: float, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", type_names: Sequence[str] | None = None,
                 source: str = "dataset") -> None:
        self.frames = list(frames)
        self.dtype, self.device = dtype, torch.device(device)
        self.graphs, self.energies, self.forces, self.stresses = [], [], [], []
        for index, atoms in enumerate(self.frames):
            try:
                self.graphs.append(AtomicGraph.from_ase(atoms, r_max=r_max, type_names=type_names))
            except ValueError as error:
                raise DataError(f"{source}, frame {index}: {error}") from None
            results = atoms.calc.results if atoms.calc is not None else {}
            if "energy" not in results or "forces" not in results:
                missing = "energy" if "energy" not in results else "forces"
                raise DataError(f"{source}, frame {index}: field '{missing}' is missing")
            self.energies.append(float(results["energy"]))
            self.forces.append(np.asarray(results["forces"], dtype=np.float64))
            stress = results.get("stress")
            if stress is not None:
                stress = np.asarray(stress, dtype=np.float64)
                stress = _voigt_to_matrix(stress) if stress.shape == (6,) else stress.reshape(3, 3)
            self.stresses.append(stress)
        self.num_atoms = np.array([len(atoms) for atoms in self.frames])

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def has_any_stress(self) -> bool:
        return any(stress is not None for stress in self.stresses)

    def batch(self, indices: Sequence[int]) -> Batch:
        graph = collate([self.graphs[i] for i in indices]).to(device=self.device, dtype=self.dtype)

        def tensor(array):
            return torch.as_tensor(np.asarray(array), dtype=self.dtype, device=self.device)

        stresses = [self.stresses[i] for i in indices]
        return Batch(
            graph=graph,
            energy=torch.tensor([self.energies[i] for i in indices], dtype=torch.float64, device=self.device),
            forces=tensor(np.concatenate([self.forces[i] for i in indices])),
            stress=tensor(np.stack([s if s is not None else np.zeros((3, 3)) for s in stresses])),
            has_stress=torch.tensor([s is not None for s in stresses], device=self.device),
        )

    def batches(self, batch_size: int, order: Sequence[int] | None = None) -> Iterator[Batch]:
        """Batches of batch_size structures (the last may be smaller) in the given order (default: as stored)."""
        order = list(range(len(self))) if order is None else list(order)
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start:start + batch_size])

