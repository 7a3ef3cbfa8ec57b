"""The demo: a complete run that needs no data (`allegro-fast demo`).

1. Generates labelled frames of fcc silver with a vacancy near its melting point (31 atoms, 2x2x2 cubic cells,
   a = 4.09 Å): Langevin MD at 1200 K with ASE's EMT potential, one frame every few steps, energy, forces
   and stress from EMT. EMT is a cheap analytic potential: the model learns EMT, not DFT, which is enough to
   show the whole workflow. Frames go to data/ag_vacancy_emt_{train,test}.extxyz.
2. Writes a run configuration (run.yaml: a small model, float32, a time budget) and trains with it
   (`allegro_fast.training.train`): model.pt, metrics.jsonl, learning_curve.png, parity.png.
3. Evaluates model.pt on the test frames and runs a short NVE MD with it (`allegro_fast.md.run_md`),
   writing md.traj, and prints a one-screen summary.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
import yaml
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md import velocitydistribution
from ase.md.langevin import Langevin

__all__ = ["demo_run_config", "generate_silver_frames", "run_demo"]

# ASE 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta; accept both.
_thermalize = getattr(velocitydistribution, "thermalize_momenta", None) or velocitydistribution.MaxwellBoltzmannDistribution


def generate_silver_frames(count: int, seed: int = 0, temperature_K: float = 1200.0, steps_between: int = 5,
                           equilibration_steps: int = 50, timestep_fs: float = 4.0) -> list:
    """count frames of 31-atom fcc Ag with a vacancy from EMT Langevin MD at temperature_K (Ag melts at 1235 K).

    Each frame carries energy (eV), forces (eV/Å) and stress (eV/Å³) from EMT in a SinglePointCalculator.
    """
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2))
    del atoms[0]  # the vacancy
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    _thermalize(atoms, temperature_K=temperature_K, rng=rng)
    dynamics = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=0.02, fixcm=False,
                        rng=rng)
    dynamics.run(equilibration_steps)
    frames = []
    for _ in range(count):
        dynamics.run(steps_between)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           stress=atoms.get_stress())
        frames.append(frame)
    return frames


def demo_run_config(train_file: str, test_file: str, minutes: float, threads: int | None, seed: int = 0) -> dict:
    """The demo's run configuration (also written to run.yaml, as an example to edit)."""
    return {
        "seed": seed,
        "data": {"train_file": train_file, "energy_unit": "eV", "length_unit": "Å",
                 "n_train": 0.9, "n_val": 0.1, "test_file": test_file},
        # The size class of the paper's Ag model (one layer, l_max 1, small MLPs): on 1-2 CPU cores it takes about
        # half the time per step of the default 2-layer l_max 2 model, so a few minutes buy many more steps.
        "model": {"r_max": 4.0, "l_max": 1, "num_layers": 1, "num_scalar_features": 32, "num_tensor_features": 16,
                  "two_body_mlp_hidden": [32], "latent_mlp_hidden": [32], "readout_mlp_hidden": [32]},
        "training": {"energy_weight": 1.0, "force_weight": 1.0, "stress_weight": 0.0, "optimizer": "adam",
                     "learning_rate": 0.005, "batch_size": 5, "ema_decay": 0.99, "lr_patience": 10,
                     "lr_factor": 0.5, "max_epochs": 10000, "max_time_minutes": minutes,
                     "early_stopping_patience": 50, "min_lr": 1e-5, "grad_clip_norm": 10.0, "dtype": "float32",
                     "num_threads": threads, "device": "cpu"},
    }


def choose_threads(requested: int | None, wanted: int = 2) -> int:
    """requested if given; otherwise `wanted` threads, or 1 when the machine is already busy.

    On a machine whose load average is at least its number of cores, two torch threads fight other processes
    for the cores and each step waits for the slower thread: measured here, 5 to 25 times slower than one
    thread. Explicit --threads is always obeyed.
    """
    if requested:
        return requested
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= cores - 0.5:
        print(f"the machine is busy (load average {load:.1f} on {cores} cores): using 1 thread "
              f"(give --threads to choose)", flush=True)
        return 1
    return min(wanted, cores)


def run_demo(workdir: str | os.PathLike = "allegro-fast-demo", minutes: float = 2.0, threads: int | None = None,
             num_frames: int = 240, md_steps: int = 500, seed: int = 0, progress: bool = True) -> dict:
    """Generate data, train for `minutes`, evaluate, run NVE MD; print and return a summary dict.

    Writes into workdir: data/ (extxyz), run.yaml, train/ (model.pt, metrics.jsonl, plots, checkpoint),
    md.traj, summary.json. A second call starts over (the previous run in workdir is replaced).
    """
    from .md import run_md
    from .serialization import load
    from .training import train

    started = time.perf_counter()
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    threads = choose_threads(threads)
    torch.set_num_threads(threads)

    num_test = max(num_frames // 6, 1)
    print(f"[1/4] generating {num_frames} frames of fcc Ag with a vacancy (31 atoms) by EMT Langevin MD at 1200 K ...",
          flush=True)
    frames = generate_silver_frames(num_frames, seed=seed)
    train_file, test_file = workdir / "data" / "ag_vacancy_emt_train.extxyz", workdir / "data" / "ag_vacancy_emt_test.extxyz"
    # The test frames come from the end of the trajectory, after every training frame.
    ase.io.write(train_file, frames[:-num_test], format="extxyz")
    ase.io.write(test_file, frames[-num_test:], format="extxyz")
    generated_seconds = time.perf_counter() - started

    config = demo_run_config(str(train_file.relative_to(workdir)), str(test_file.relative_to(workdir)), minutes,
                             threads, seed)
    config_path = workdir / "run.yaml"
    config_path.write_text("# Written by `allegro-fast demo`; edit and run `allegro-fast train run.yaml`.\n"
                           + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    print(f"[2/4] training for {minutes:g} min with {config_path} ...", flush=True)
    result = train(config_path, workdir / "train", resume=False, progress=progress)

    print("[3/4] test errors were computed on the held-out frames (above); running NVE MD with the model ...",
          flush=True)
    model = load(result.model_path)
    start = ase.io.read(test_file, index=-1)
    md = run_md(model, start, ensemble="nve", temperature_K=1200.0, timestep_fs=2.0, steps=md_steps,
                trajectory=str(workdir / "md.traj"), log_interval=10, seed=seed, progress=progress)

    test = result.test_metrics or {}
    summary = {
        "workdir": str(workdir), "frames": num_frames, "test_frames": num_test,
        "data_seconds": round(generated_seconds, 1), "training_seconds": round(result.wall_seconds, 1),
        "epochs": result.epochs, "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "test": {key: value for key, value in test.items() if key != "per_species"},
        "md": {"steps": md.steps, "timestep_fs": md.timestep_fs, "simulated_ps": md.simulated_ps,
               "ns_per_day": md.ns_per_day, "energy_drift_meV_per_atom": md.energy_drift_meV_per_atom,
               "temperature_K_mean": md.temperature_K_mean},
        "threads": torch.get_num_threads(), "total_seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("[4/4] done\n" + format_summary(summary, result, md))
    return summary


def format_summary(summary: dict, result, md) -> str:
    """The one-screen summary printed at the end of the demo."""
    test, workdir = summary["test"], Path(summary["workdir"])
    lines = [
        "=" * 78,
        (f"allegro-fast demo finished in {summary['total_seconds']:.0f} s ({summary['threads']} threads); "
         f"everything is in {workdir}/"),
        (f"  data    {summary['frames']} EMT frames of Ag31 (fcc + vacancy, 1200 K): data/*.extxyz "
         f"({summary['data_seconds']:.0f} s)"),
        (f"  model   {result.model_path}: {summary['num_parameters']} parameters, EMA weights of epoch "
         f"{result.best_epoch} of {result.epochs} ({result.stop_reason} after {result.wall_seconds:.0f} s)"),
    ]
    if test:
        lines.append(f"  test    {summary['test_frames']} frames: energy MAE {test['energy_per_atom_mae_meV_per_atom']:.2f} "
                     f"meV/atom, force MAE {test['forces_mae_meV_per_A']:.1f} meV/Å "
                     f"(RMSE {test['forces_rmse_meV_per_A']:.1f})"
                     + (f", stress MAE {test['stress_mae_meV_per_A3']:.1f} meV/Å³ (stress not in the loss)"
                        if "stress_mae_meV_per_A3" in test else ""))
    lines += [
        f"  plots   {', '.join(str(p) for p in result.plot_paths)}",
        f"  metrics {result.metrics_path} (one line per epoch)",
        (f"  MD      NVE {md.steps} steps x {md.timestep_fs:g} fs = {md.simulated_ps:.2f} ps, "
         f"T = {md.temperature_K_mean:.0f} K: {md.ns_per_day:.2f} ns/day, "
         f"energy drift {md.energy_drift_meV_per_atom:+.3f} meV/atom; trajectory {workdir / 'md.traj'}"),
        f"  next    allegro-fast evaluate {result.model_path} {workdir}/data/ag_vacancy_emt_test.extxyz",
        f"          allegro-fast md {result.model_path} {workdir}/data/ag_vacancy_emt_test.extxyz --steps 2000",
        f"          edit {workdir}/run.yaml, then: allegro-fast train {workdir}/run.yaml",
        "  (the model learns EMT, a cheap analytic potential, standing in for DFT labels)",
        "=" * 78,
    ]
    return "\n".join(lines)
