"""Side-by-side CPU benchmark of the torch backend, the reference and nequip-allegro (issue 4's targets).

    python bench/bench_cpu.py                       # all cases, writes bench/results/cpu-<date>-<time>.json
    python bench/bench_cpu.py --cases ag256 --repeats 5

Cases (DESIGN section 6): fcc Ag (a = 4.09 Å, cubic cell x4 = 256 atoms and x8 = 2048 atoms, rattled
0.05 Å with seed 0), default model (2 layers, l_max 2, 64 scalar / 16 tensor features, r_max 5 Å),
float32, energy + forces; and one training step (energy + force loss with double backward, Adam) on a
batch of rMD17 aspirin frames. nequip-allegro runs in its own subprocess (it changes global torch
defaults) through bench/nequip_runner.py with the interpreter given by --nequip-python (default
$NEQUIP_PYTHON or /work/venv-nequip/bin/python); it is skipped with a reason where that is absent.

Timing: warm-up calls, then `repeats` timed calls; median, min and max are reported. Peak memory is the
process's maximum resident set size, each provider measured in its own fresh subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RMD17 = REPO.parent / "shared" / "data" / "rmd17" / "rmd17_aspirin_train_01.npz"
KCAL_MOL_TO_EV = 0.0433641


def build_case(case: str, batch_size: int):
    import numpy as np
    from ase import Atoms
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    if case in ("ag256", "ag2048"):
        repeat = 4 if case == "ag256" else 8
        atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((repeat,) * 3)
        atoms.rattle(0.05, seed=0)
        return ["Ag"], [atoms]
    data = np.load(RMD17)
    frames = []
    for k in range(batch_size):
        atoms = Atoms(numbers=data["nuclear_charges"], positions=data["coords"][k])
        atoms.calc = SinglePointCalculator(atoms, energy=float(data["energies"][k]) * KCAL_MOL_TO_EV,
                                           forces=data["forces"][k] * KCAL_MOL_TO_EV)
        frames.append(atoms)
    return ["H", "C", "O"], frames


def run_ours(provider: str, case: str, task: str, repeats: int, batch_size: int, threads: int) -> dict:
    """Runs in a subprocess (see main): one provider, one case, one task."""
    import torch

    import allegro_fast as af

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    type_names, frames = build_case(case, batch_size)
    graph = af.AtomicGraph.from_ase(frames, r_max=5.0, dtype=torch.float32)
    config = af.AllegroConfig(type_names=type_names, avg_num_neighbors=graph.num_edges / graph.num_nodes)
    model = af.reference.ReferenceAllegro(config) if provider == "reference" else af.Allegro(config, backend=provider)

    if task == "inference":
        model.eval()

        def step():
            out = model(graph, compute_stress=False)
            return out["forces"]
    else:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        energy = torch.tensor([f.get_potential_energy() if f.calc else 0.0 for f in frames], dtype=torch.float32)
        forces = torch.cat([torch.as_tensor(f.get_forces() if f.calc else 0 * f.positions, dtype=torch.float32) for f in frames])

        def step():
            out = model(graph, compute_stress=False)
            loss = ((out["energy"] - energy) / graph.num_atoms).pow(2).mean() + (out["forces"] - forces).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return {
        "provider": provider, "case": case, "task": task, "dtype": "float32",
        "num_atoms": graph.num_nodes, "num_edges": graph.num_edges, "threads": threads,
        "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "times_ms": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def subprocess_json(command: list[str], timeout: float) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def versions() -> dict:
    import e3nn
    import torch

    out = {"torch": torch.__version__, "e3nn": e3nn.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["ag256", "ag2048", "aspirin"])
    parser.add_argument("--providers", nargs="+", default=["torch", "reference", "nequip"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nequip-python", default=os.environ.get("NEQUIP_PYTHON", "/work/venv-nequip/bin/python"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--_worker", nargs=3, metavar=("PROVIDER", "CASE", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        print(json.dumps(run_ours(*args._worker, args.repeats, args.batch_size, args.threads)))
        return

    rows = []
    for case in args.cases:
        if case == "aspirin" and not RMD17.exists():
            print(f"skip aspirin: {RMD17} not found", file=sys.stderr)
            continue
        task = "train" if case == "aspirin" else "inference"
        for provider in args.providers:
            if provider == "nequip":
                if not Path(args.nequip_python).exists():
                    rows.append({"provider": "nequip", "case": case, "task": task, "skipped": f"{args.nequip_python} not found"})
                    continue
                command = [args.nequip_python, "bench/nequip_runner.py", "--case", case, "--task", task, "--dtype", "float32",
                           "--repeats", str(args.repeats), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
            else:
                command = [sys.executable, __file__, "--_worker", provider, case, task, "--repeats", str(args.repeats),
                           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            row = subprocess_json(command, timeout=1800)
            if "timings" in row:  # nequip_runner nests its figures
                row.update({key: row["timings"][key] for key in ("median_ms", "min_ms", "max_ms") if key in row["timings"]})
                row["peak_rss_mib"] = row.get("memory", {}).get("ru_maxrss_mib")  # same measure as ours
            row.setdefault("provider", provider)
            row.setdefault("case", case)
            row.setdefault("task", task)
            rows.append(row)
            print(f"{case:8s} {task:9s} {provider:10s} median {row.get('median_ms') or float('nan'):9.1f} ms  "
                  f"min {row.get('min_ms') or float('nan'):9.1f} ms  peak RSS {row.get('peak_rss_mib') or float('nan'):7.0f} MiB  "
                  f"{row.get('error', row.get('skipped', ''))}", flush=True)

    def median(provider, case):
        return next((r.get("median_ms") for r in rows if r.get("provider") == provider and r.get("case") == case), None)

    ratios = {}
    for case in args.cases:
        ours = median("torch", case)
        for other in ("nequip", "reference"):
            theirs = median(other, case)
            if ours and theirs:
                ratios[f"{case}: {other} / torch"] = theirs / ours
    for key, value in ratios.items():
        print(f"speedup {key}: {value:.2f}x")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "commit": git_commit(), "versions": versions(), "rows": rows, "speedups": ratios,
    }
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    output = Path(args.output or REPO / "bench" / "results" / f"cpu-{stamp}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
