"""Molecular dynamics with an Allegro model through ASE's integrators.

    result = run_md(model, atoms, ensemble="nve", temperature_K=300, timestep_fs=1.0, steps=1000,
                    trajectory="md.traj")
    print(result.summary())

Ensembles (``ENSEMBLES``):

* ``"nve"``: velocity Verlet (``ase.md.verlet.VelocityVerlet``); the total energy E = E_pot + E_kin is
  conserved up to the integration error, so its drift measures the quality of the forces and time step.
* ``"langevin"``: Langevin dynamics (``ase.md.langevin.Langevin``) at ``temperature_K`` with friction
  ``friction_per_fs`` (1/fs); the centre of mass is kept fixed.
* ``"nose-hoover"``: a Nosé–Hoover chain thermostat (``ase.md.nose_hoover_chain.NoseHooverChainNVT``,
  chain length 3) with relaxation time ``thermostat_time_fs``. Its conserved quantity is
  E_pot + E_kin + thermostat energy.

Initial velocities are drawn from the Maxwell–Boltzmann distribution at ``temperature_K`` with a numpy
generator seeded with ``seed``, and the centre-of-mass momentum is removed (so the instantaneous
temperature starts slightly below temperature_K: 3N - 3 of the 3N degrees of freedom carry energy).

Energies are recorded every ``log_interval`` steps (step 0 included) as ``MDRecord``s; the same frames go
to ``trajectory`` if given: an ASE ``.traj`` file, or extended XYZ for ``.xyz`` / ``.extxyz``. Each frame
is written and flushed as it is produced, so an interrupted run leaves a readable file with the frames up
to the interruption.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

import ase.io
import numpy as np
from ase import units
from ase.constraints import FixCom
from ase.md import velocitydistribution
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet

from .calculator import AllegroCalculator

__all__ = ["ENSEMBLES", "MDRecord", "MDResult", "run_md"]

ENSEMBLES = ("nve", "langevin", "nose-hoover")

_EXTXYZ_SUFFIXES = (".xyz", ".extxyz")

# ASE 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta; accept both.
_thermalize = getattr(velocitydistribution, "thermalize_momenta", None) or velocitydistribution.MaxwellBoltzmannDistribution


@dataclasses.dataclass(frozen=True)
class MDRecord:
    """One logged MD step. Energies in eV for the whole system, time in ps, temperature in K."""

    step: int
    time_ps: float
    potential_energy: float
    kinetic_energy: float
    conserved_energy: float  # E_pot + E_kin (+ thermostat energy for Nosé–Hoover)
    temperature_K: float


@dataclasses.dataclass
class MDResult:
    """What an MD run did and how fast.

    energy_drift_meV_per_atom: change of the conserved energy (see MDRecord) from the first to the last
    record, per atom; energy_drift_slope_meV_per_atom_per_ps: slope of a least-squares line through all
    records. Both measure integration error for "nve" and "nose-hoover"; under Langevin the energy is not
    conserved (the thermostat exchanges heat), so they only describe the run.
    ns_per_day: simulated time per wall-clock day, the wall time including force evaluations, integration,
    logging and trajectory output (first force call included).
    """

    ensemble: str
    steps: int
    timestep_fs: float
    num_atoms: int
    simulated_ps: float
    wall_seconds: float
    ns_per_day: float
    energy_drift_meV_per_atom: float
    energy_drift_slope_meV_per_atom_per_ps: float
    temperature_K_mean: float
    temperature_K_std: float
    target_temperature_K: float
    records: list[MDRecord]
    final_atoms: object  # ase.Atoms, with the calculator attached
    neighbor_list_builds: int
    trajectory: str | None
    model: str = ""  # what ran: the model class, backend, dtype, how it ran and on which device

    def summary(self) -> str:
        drift_name = {
            "nve": "energy drift",
            "nose-hoover": "conserved-energy drift (incl. thermostat)",
            "langevin": "energy change (not conserved)",
        }[self.ensemble]
        lines = [
            (f"MD ({self.ensemble}): {self.steps} steps of {self.timestep_fs:g} fs = {self.simulated_ps:.4g} ps, "
             f"{self.num_atoms} atoms, {self.wall_seconds:.1f} s wall, {self.ns_per_day:.3g} ns/day"),
            (f"  temperature {self.temperature_K_mean:.1f} ± {self.temperature_K_std:.1f} K "
             f"(target {self.target_temperature_K:g} K)"),
            (f"  {drift_name} {self.energy_drift_meV_per_atom:+.3f} meV/atom over the run, "
             f"slope {self.energy_drift_slope_meV_per_atom_per_ps:+.3f} meV/atom/ps"),
            f"  neighbour list built {self.neighbor_list_builds} times in {self.steps + 1} force evaluations",
        ]
        if self.model:
            lines.insert(1, f"  model: {self.model}")
        if self.trajectory:
            lines.append(f"  trajectory: {self.trajectory} ({len(self.records)} frames)")
        return "\n".join(lines)


class _TrajectoryWriter:
    """Frames to an ASE .traj (ase.io.Trajectory writes and syncs each frame) or extended XYZ file."""

    def __init__(self, path: str | os.PathLike, atoms) -> None:
        self.path = Path(path)
        self.extxyz = self.path.suffix.lower() in _EXTXYZ_SUFFIXES
        if self.extxyz:
            self._file = open(self.path, "w")  # noqa: SIM115 (closed by close())
        else:
            if self.path.suffix.lower() != ".traj":
                raise ValueError(
                    f"trajectory {str(self.path)!r}: unknown format; use a .traj (ASE) or .xyz / .extxyz file"
                )
            self._file = ase.io.Trajectory(str(self.path), "w", atoms)

    def write(self, atoms) -> None:
        if self.extxyz:
            # format the whole frame first, so the file only ever ends in a complete frame (or a write cut short)
            buffer = io.StringIO()
            ase.io.write(buffer, atoms, format="extxyz")
            self._file.write(buffer.getvalue())
            self._file.flush()
        else:
            self._file.write(atoms)

    def close(self) -> None:
        self._file.close()


def _check_arguments(ensemble, temperature_K, timestep_fs, steps, friction_per_fs, thermostat_time_fs, log_interval):
    if ensemble not in ENSEMBLES:
        raise ValueError(f"run_md: unknown ensemble {ensemble!r}; choose one of {list(ENSEMBLES)}")
    if not (np.isfinite(temperature_K) and temperature_K >= 0):
        raise ValueError(f"run_md: temperature_K must be >= 0, got {temperature_K!r}")
    if not (np.isfinite(timestep_fs) and timestep_fs > 0):
        raise ValueError(f"run_md: timestep_fs must be > 0, got {timestep_fs!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"run_md: steps must be an integer >= 0, got {steps!r}")
    if int(log_interval) != log_interval or log_interval < 1:
        raise ValueError(f"run_md: log_interval must be an integer >= 1, got {log_interval!r}")
    if ensemble == "langevin" and not (np.isfinite(friction_per_fs) and friction_per_fs > 0):
        raise ValueError(f"run_md: friction_per_fs must be > 0 for Langevin, got {friction_per_fs!r}")
    if ensemble == "nose-hoover" and not (np.isfinite(thermostat_time_fs) and thermostat_time_fs > 0):
        raise ValueError(f"run_md: thermostat_time_fs must be > 0 for Nosé–Hoover, got {thermostat_time_fs!r}")
    if ensemble != "nve" and temperature_K == 0:
        raise ValueError(f"run_md: a thermostat ({ensemble}) needs temperature_K > 0")


def _integrator(ensemble, atoms, timestep, temperature_K, friction_per_fs, thermostat_time_fs, rng):
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep)
    if ensemble == "langevin":
        # the centre of mass is held by a FixCom constraint (ASE >= 3.28 deprecates Langevin's fixcm)
        atoms.set_constraint([*atoms.constraints, FixCom()])
        return Langevin(atoms, timestep, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                        fixcm=False, rng=rng)
    try:
        from ase.md.nose_hoover_chain import NoseHooverChainNVT
    except ImportError:
        import ase

        raise ImportError(
            f"run_md: ensemble 'nose-hoover' needs ase.md.nose_hoover_chain (ASE >= 3.24), this is ASE {ase.__version__}"
        ) from None
    return NoseHooverChainNVT(atoms, timestep, temperature_K=temperature_K, tdamp=thermostat_time_fs * units.fs)


def run_md(
    model,
    atoms,
    *,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 1000,
    friction_per_fs: float = 0.01,
    thermostat_time_fs: float = 100.0,
    trajectory: str | os.PathLike | None = None,
    log_interval: int = 10,
    seed: int = 0,
    progress: bool = True,
    skin: float = 1.0,
    device=None,
    initial_temperature_K: float | None = None,
    compile: bool | str = False,
    cuda_graphs: bool = False,
) -> MDResult:
    """Run ``steps`` MD steps of ``atoms`` (copied, never modified) with ``model`` and return an MDResult.

    model: an Allegro model (any backend, the reference, or ``allegro_fast.load(path)``'s result) or the
    path of a saved model. skin (Å), device, compile and cuda_graphs go to the AllegroCalculator. progress shows a tqdm bar with
    the current temperature and conserved energy. initial_temperature_K (default: temperature_K) is the
    temperature of the initial Maxwell–Boltzmann velocities. With the triton backend on CUDA the kernels are
    first compiled in parallel processes (`kernels.precompile`).
    """
    _check_arguments(ensemble, temperature_K, timestep_fs, steps, friction_per_fs, thermostat_time_fs, log_interval)
    if isinstance(model, (str, os.PathLike)):
        from .serialization import load

        model = load(model)
    steps, log_interval = int(steps), int(log_interval)
    atoms = atoms.copy()
    num_atoms = len(atoms)
    if num_atoms == 0:
        raise ValueError("run_md: the structure has no atoms")
    calculator = AllegroCalculator(model, device=device, skin=skin, compile=compile, cuda_graphs=cuda_graphs)
    if getattr(calculator.model, "backend", None) == "triton" and calculator.device.type == "cuda":
        from .kernels.precompile import precompile  # in parallel processes, not one by one in the first step

        precompile(calculator.model)
    atoms.calc = calculator

    rng = np.random.default_rng(seed)
    if initial_temperature_K is None:
        initial_temperature_K = temperature_K
    if not (np.isfinite(initial_temperature_K) and initial_temperature_K >= 0):
        raise ValueError(f"run_md: initial_temperature_K must be >= 0, got {initial_temperature_K!r}")
    _thermalize(atoms, temperature_K=initial_temperature_K, rng=rng)
    velocitydistribution.Stationary(atoms)
    timestep = timestep_fs * units.fs
    dynamics = _integrator(ensemble, atoms, timestep, temperature_K, friction_per_fs, thermostat_time_fs, rng)

    def conserved_energy() -> float:
        if ensemble == "nose-hoover":
            return dynamics.get_conserved_energy()
        return atoms.get_potential_energy() + atoms.get_kinetic_energy()

    records: list[MDRecord] = []
    writer = _TrajectoryWriter(trajectory, atoms) if trajectory is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"MD {ensemble}", unit="step", dynamic_ncols=True)

    def record() -> None:
        step = dynamics.nsteps
        entry = MDRecord(
            step=step, time_ps=step * timestep_fs * 1e-3, potential_energy=atoms.get_potential_energy(),
            kinetic_energy=atoms.get_kinetic_energy(), conserved_energy=conserved_energy(),
            temperature_K=atoms.get_temperature(),
        )
        records.append(entry)
        if writer is not None:
            writer.write(atoms)
        if bar is not None:
            bar.set_postfix(T=f"{entry.temperature_K:.0f} K", E=f"{entry.conserved_energy:.4f} eV", refresh=False)

    def advance_bar() -> None:
        if dynamics.nsteps > 0:
            bar.update(1)

    dynamics.attach(record, interval=log_interval)
    if bar is not None:
        dynamics.attach(advance_bar, interval=1)
    start = time.perf_counter()
    try:
        dynamics.run(steps)
        wall_seconds = time.perf_counter() - start
        if records[-1].step != steps:  # the last step is always recorded
            record()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if ensemble == "langevin":  # final_atoms keeps only the caller's constraints
            atoms.set_constraint([c for c in atoms.constraints if not isinstance(c, FixCom)])

    simulated_ps = steps * timestep_fs * 1e-3
    times = np.array([r.time_ps for r in records])
    energies_meV_per_atom = np.array([r.conserved_energy for r in records]) * 1000.0 / num_atoms
    temperatures = np.array([r.temperature_K for r in records])
    slope = float(np.polyfit(times, energies_meV_per_atom, 1)[0]) if len(records) > 1 else 0.0
    return MDResult(
        ensemble=ensemble, steps=steps, timestep_fs=float(timestep_fs), num_atoms=num_atoms,
        simulated_ps=simulated_ps, wall_seconds=wall_seconds,
        ns_per_day=simulated_ps * 1e-3 / (wall_seconds / 86400.0) if wall_seconds > 0 else float("inf"),
        energy_drift_meV_per_atom=float(energies_meV_per_atom[-1] - energies_meV_per_atom[0]),
        energy_drift_slope_meV_per_atom_per_ps=slope,
        temperature_K_mean=float(temperatures.mean()), temperature_K_std=float(temperatures.std()),
        target_temperature_K=float(temperature_K), records=records, final_atoms=atoms,
        neighbor_list_builds=calculator.neighbor_list_builds,
        trajectory=str(trajectory) if trajectory is not None else None,
        model=_describe(calculator.model, calculator.device, compile, cuda_graphs),
    )


def _describe(model, device, compile: bool | str, cuda_graphs: bool) -> str:
    """E.g. "Allegro, triton backend, float32, CUDA graphs, on cuda:0"."""
    backend = getattr(model, "backend", None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    how = "CUDA graphs" if cuda_graphs else "torch.compile" if compile else "eager"
    return ", ".join([type(model).__name__, *([f"{backend} backend"] if backend else []), dtype, how, f"on {device}"])
