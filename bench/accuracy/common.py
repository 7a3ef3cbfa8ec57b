"""Shared pieces of the accuracy and trade-off benchmarks: datasets, splits, error metrics, machine facts.

Everything here runs in our own environment (/work/venv); nothing imports nequip.

Units: energies in eV, forces in eV/Å inside the code; reported errors in meV (energy per structure,
and per atom) and meV/Å (force components). rMD17 stores kcal/mol and kcal/mol/Å and is converted on
load with 1 kcal/mol = 0.0433641 eV.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("ALLEGRO_FAST_DATA", REPO_ROOT.parent / "shared" / "data"))
RESULTS_DIR = REPO_ROOT / "bench" / "results"
NEQUIP_PYTHON = Path(os.environ.get("NEQUIP_PYTHON", "/work/venv-nequip/bin/python"))
KCAL_MOL_TO_EV = 0.0433641


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def labelled_atoms(numbers, positions, energy: float, forces) -> Atoms:
    """An ASE Atoms (no cell, no pbc) carrying energy (eV) and forces (eV/Å) in a SinglePointCalculator."""
    atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
    atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=np.asarray(forces, dtype=float))
    return atoms


def load_rmd17(path: Path) -> list[Atoms]:
    """All frames of an rMD17 npz file (keys nuclear_charges, coords, energies, forces; kcal/mol) in eV."""
    if not path.exists():
        raise FileNotFoundError(f"rMD17 file not found: {path} (set ALLEGRO_FAST_DATA to the shared data folder)")
    data = np.load(path)
    for key in ("nuclear_charges", "coords", "energies", "forces"):
        if key not in data:
            raise ValueError(f"{path}: missing array '{key}' (has {sorted(data.keys())})")
    numbers = data["nuclear_charges"].astype(int)
    return [labelled_atoms(numbers, data["coords"][i], data["energies"][i] * KCAL_MOL_TO_EV,
                           data["forces"][i] * KCAL_MOL_TO_EV) for i in range(len(data["energies"]))]


def load_extxyz(path: Path) -> list[Atoms]:
    """All frames of an extended-XYZ file with energy and forces (eV, eV/Å), as read by ASE."""
    import ase.io

    if not path.exists():
        raise FileNotFoundError(f"extxyz file not found: {path} (set ALLEGRO_FAST_DATA to the shared data folder)")
    frames = ase.io.read(path, index=":", format="extxyz")
    for index, atoms in enumerate(frames):
        if atoms.calc is None or "energy" not in atoms.calc.results or "forces" not in atoms.calc.results:
            raise ValueError(f"{path}: frame {index} has no energy and forces")
    return frames


def split_indices(count: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint random subsets of range(count) with the given sizes (numpy default_rng(seed) permutation)."""
    if sum(sizes) > count:
        raise ValueError(f"cannot take {sum(sizes)} frames ({list(sizes)}) from {count}")
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[bounds[k]:bounds[k + 1]]) for k in range(len(sizes))]


def write_extxyz(frames: Sequence[Atoms], path: Path) -> None:
    """Frames with their energy/forces to an extended-XYZ file, atomically (temp file + os.replace)."""
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    ase.io.write(temporary, list(frames), format="extxyz")
    os.replace(temporary, path)


def labels(frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(energies (S,) eV, forces (N, 3) eV/Å concatenated over frames, atoms per frame (S,))."""
    energies = np.array([atoms.get_potential_energy() for atoms in frames])
    forces = np.concatenate([atoms.get_forces() for atoms in frames])
    return energies, forces, np.array([len(atoms) for atoms in frames])


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def error_metrics(pred_energy, pred_forces, ref_energy, ref_forces, atoms_per_frame) -> dict:
    """Energy and force errors of predictions against references, in meV, meV/atom and meV/Å.

    pred_energy, ref_energy: (S,) eV; pred_forces, ref_forces: (N, 3) eV/Å; atoms_per_frame: (S,).
    Force MAE/RMSE are over all N*3 Cartesian components (the rMD17 and nequip convention).
    """
    energy_shape = (len(atoms_per_frame),)
    force_shape = (int(np.sum(atoms_per_frame)), 3)
    for name, array, shape in (("predicted energy", pred_energy, energy_shape), ("reference energy", ref_energy,
                               energy_shape), ("predicted forces", pred_forces, force_shape),
                              ("reference forces", ref_forces, force_shape)):
        if np.shape(array) != shape:
            raise ValueError(f"{name} has shape {np.shape(array)}; {shape} expected, which does not match "
                             f"{energy_shape[0]} frames of {force_shape[0]} atoms in all")
    energy_error = np.asarray(pred_energy, dtype=float) - np.asarray(ref_energy, dtype=float)
    force_error = np.asarray(pred_forces, dtype=float) - np.asarray(ref_forces, dtype=float)
    per_atom = energy_error / np.asarray(atoms_per_frame, dtype=float)
    return {
        "num_frames": len(atoms_per_frame),
        "energy_mae_meV": 1e3 * float(np.mean(np.abs(energy_error))),
        "energy_rmse_meV": 1e3 * float(np.sqrt(np.mean(energy_error**2))),
        "energy_per_atom_mae_meV": 1e3 * float(np.mean(np.abs(per_atom))),
        "force_mae_meV_per_A": 1e3 * float(np.mean(np.abs(force_error))),
        "force_rmse_meV_per_A": 1e3 * float(np.sqrt(np.mean(force_error**2))),
    }


# --------------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------------
class LoadSampler:
    """Samples os.getloadavg() every `interval` seconds in a background thread while a benchmark runs."""

    def __init__(self, interval: float = 15.0):
        self.interval = interval
        self.samples: list[tuple[float, float, float, float]] = []  # (seconds since start, 1, 5, 15 min)
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self._start, *os.getloadavg()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._start, *os.getloadavg()))

    def summary(self) -> dict:
        one_minute = [sample[1] for sample in self.samples]
        return {
            "interval_s": self.interval,
            "loadavg_1min_mean": float(np.mean(one_minute)) if one_minute else None,
            "loadavg_1min_min": float(np.min(one_minute)) if one_minute else None,
            "loadavg_1min_max": float(np.max(one_minute)) if one_minute else None,
            "samples": [[round(value, 2) for value in sample] for sample in self.samples],
        }


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=False)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": git_commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def today() -> str:
    return datetime.date.today().isoformat()


def write_json(data: dict, path: Path) -> None:
    """JSON to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def single_thread_env() -> dict:
    """The environment for a benchmark subprocess pinned to one thread (OpenMP, MKL, OpenBLAS)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    return env


# --------------------------------------------------------------------------------------------------
# running trainings
# --------------------------------------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc/<pid>/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_all(processes: dict, timeout: float, start: float) -> dict:
    """Waits for every process (None entries are skipped). Returns {name: {"wall_s": seconds from `start` to
    its exit, "cpu_s": its CPU seconds at the last poll before the exit (polled every second)}}."""
    finished, cpu = {}, {}
    while len(finished) < sum(process is not None for process in processes.values()):
        for name, process in processes.items():
            if process is None or name in finished:
                continue
            seconds = process_cpu_seconds(process.pid)
            if process.poll() is not None:
                finished[name] = {"wall_s": time.perf_counter() - start, "cpu_s": cpu.get(name)}
            elif seconds is not None:
                cpu[name] = seconds
        if time.perf_counter() - start > timeout:
            for process in processes.values():
                if process is not None and process.poll() is None:
                    process.kill()
            raise TimeoutError(f"benchmark processes still running after {timeout:.0f} s; killed")
        time.sleep(1.0)
    return finished


def normalise_our_curve(records: list[dict]) -> list[dict]:
    """allegro-fast's metrics.jsonl records as {epoch, wall_s, val_force_mae_meV_per_A, val_energy_mae_meV,
    train_loss, lr} (the keys the plots and the nequip curve share)."""
    return [{
        "epoch": record["epoch"], "wall_s": record["wall_seconds"],
        "val_force_mae_meV_per_A": record.get("validation_forces_mae_meV_per_A"),
        "val_energy_mae_meV": record.get("validation_energy_mae_meV"),
        "train_loss": record.get("train_loss"), "lr": record.get("learning_rate"),
    } for record in records]
