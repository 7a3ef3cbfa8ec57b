"""Measure neighbour-list libraries for `allegro_fast.graph` on the CPU.

Candidates: vesin, matscipy, and ase.neighborlist.neighbor_list (baseline).
Every library is checked for correctness against a brute-force search over
periodic images on every case before its timing counts, and the results
(median wall time of repeated calls, correctness, versions, machine) are
written to bench/results/neighborlist_cpu.json.

Cases (r_max = 5.0 Å unless stated):
  fcc_ag_256 / fcc_ag_2048  bulk('Ag', 'fcc', a=4.09, cubic=True) * (4,4,4) / (8,8,8),
                            rattled 0.05 Å with seed 0
  triclinic_small_cell      3 atoms in a triclinic cell whose plane spacings are
                            below r_max (atoms see their own images, pairs appear
                            with several shifts)
  slab_mixed_pbc            fcc(111) Ag slab, pbc = (True, True, False), 8 Å vacuum
  slab_mixed_pbc_zero_c     same slab, third cell vector all zero (non-periodic)
  molecule_no_cell          random 40-atom cluster, cell all zero, pbc all False
  unwrapped_positions       fcc Ag 32 atoms, each atom moved by a random lattice
                            vector of up to +-20 cells (positions outside the cell)
  sparse_mixed_pbc_r1       10 atoms spread over 60 Å, pbc = (True, False, False),
                            r_max = 1.0: a case where vesin's mixed-pbc path is very
                            slow (seconds), which is why AtomicGraph always gives
                            vesin a fully periodic box (non-periodic directions padded)

Run from the repository root:  python bench/neighborlist.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import ase
import ase.build
import ase.neighborlist
import numpy as np

import vesin

try:
    import matscipy
    import matscipy.neighbours
except ImportError:  # matscipy is optional (bench extra)
    matscipy = None

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "neighborlist_cpu.json"
R_MAX = 5.0


# --------------------------------------------------------------------------------------
# Test structures
# --------------------------------------------------------------------------------------
def fcc_ag(repeat: int) -> ase.Atoms:
    atoms = ase.build.bulk("Ag", "fcc", a=4.09, cubic=True) * (repeat, repeat, repeat)
    atoms.rattle(0.05, seed=0)
    return atoms


def triclinic_small_cell() -> ase.Atoms:
    cell = np.array([[2.9, 0.0, 0.0], [0.8, 2.7, 0.0], [0.5, -0.6, 3.1]])
    fractional = np.array([[0.1, 0.2, 0.3], [0.6, 0.4, 0.9], [0.35, 0.8, 0.55]])
    return ase.Atoms("Ag3", scaled_positions=fractional, cell=cell, pbc=True)


def slab_mixed_pbc(zero_third_vector: bool = False) -> ase.Atoms:
    atoms = ase.build.fcc111("Ag", size=(3, 3, 4), a=4.09, vacuum=8.0)
    atoms.rattle(0.05, seed=0)
    if zero_third_vector:
        cell = atoms.cell.array.copy()
        cell[2] = 0.0
        atoms.set_cell(cell, scale_atoms=False)
    atoms.pbc = (True, True, False)
    return atoms


def molecule_no_cell() -> ase.Atoms:
    rng = np.random.default_rng(0)
    positions = rng.uniform(-6.0, 6.0, size=(40, 3))
    return ase.Atoms(numbers=np.full(40, 6), positions=positions)  # cell zero, pbc False


def unwrapped_positions() -> ase.Atoms:
    atoms = fcc_ag(2)
    rng = np.random.default_rng(0)
    lattice_offsets = rng.integers(-20, 21, size=(len(atoms), 3))
    atoms.positions = atoms.positions + lattice_offsets @ atoms.cell.array
    return atoms


def sparse_mixed_pbc() -> ase.Atoms:
    rng = np.random.default_rng(0)
    positions = rng.uniform(0.0, 60.0, size=(10, 3))
    return ase.Atoms("Ag10", positions=positions, cell=np.eye(3) * 60.0, pbc=(True, False, False))


# name: (structure builder, repeats, r_max)
CASES = {
    "fcc_ag_256": (lambda: fcc_ag(4), 21, R_MAX),
    "fcc_ag_2048": (lambda: fcc_ag(8), 11, R_MAX),
    "triclinic_small_cell": (triclinic_small_cell, 51, R_MAX),
    "slab_mixed_pbc": (slab_mixed_pbc, 51, R_MAX),
    "slab_mixed_pbc_zero_c": (lambda: slab_mixed_pbc(zero_third_vector=True), 51, R_MAX),
    "molecule_no_cell": (molecule_no_cell, 51, R_MAX),
    "unwrapped_positions": (unwrapped_positions, 51, R_MAX),
    "sparse_mixed_pbc_r1": (sparse_mixed_pbc, 3, 1.0),
}


# --------------------------------------------------------------------------------------
# Brute-force oracle
# --------------------------------------------------------------------------------------
def brute_force_pairs(positions, cell, pbc, r_max):
    """All (i, j, S) with 0 < |r_j - r_i + S @ cell| < r_max, by enumerating images.

    Atoms are first moved by whole lattice vectors next to the origin (the shifts are
    corrected back at the end, so they refer to the positions as given). For the
    periodic lattice vectors L (m x 3) and its pseudo-inverse L+ (3 x m),
    (d + n L) L+ = d L+ + n, hence |n_k + (d L+)_k| <= |d + n L| |L+[:, k]|, which bounds
    the shifts n_k that can give |d + n L| < r_max for every displacement d.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    n_atoms = len(positions)
    periodic = np.flatnonzero(pbc)
    shift_ranges = [np.zeros(1, dtype=np.int64)] * 3
    lattice_offsets = np.zeros((n_atoms, 3), dtype=np.int64)
    if len(periodic) > 0:
        lattice = cell[periodic]
        pseudo_inverse = np.linalg.pinv(lattice)
        lattice_offsets[:, periodic] = np.round(positions @ pseudo_inverse).astype(np.int64)
        positions = positions - lattice_offsets @ cell
        displacements = (positions[None, :, :] - positions[:, None, :]).reshape(-1, 3)
        fractional = displacements @ pseudo_inverse
        reach = r_max * np.linalg.norm(pseudo_inverse, axis=0)
        for column, direction in enumerate(periodic):
            low = int(np.floor(np.min(-fractional[:, column]) - reach[column])) - 1
            high = int(np.ceil(np.max(-fractional[:, column]) + reach[column])) + 1
            shift_ranges[direction] = np.arange(low, high + 1)
    shifts = np.stack(np.meshgrid(*shift_ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    shift_vectors = shifts @ cell

    found_i, found_j, found_shift, found_distance = [], [], [], []
    chunk = max(1, int(4e6 // max(1, n_atoms * len(shifts))))
    for start in range(0, n_atoms, chunk):
        centers = np.arange(start, min(n_atoms, start + chunk))
        # (centers, neighbours, shifts, 3)
        vectors = (
            positions[None, :, None, :]
            - positions[centers][:, None, None, :]
            + shift_vectors[None, None, :, :]
        )
        distances = np.linalg.norm(vectors, axis=-1)
        c, j, s = np.nonzero((distances < r_max) & (distances > 0.0))
        found_i.append(centers[c])
        found_j.append(j)
        found_shift.append(shifts[s])
        found_distance.append(distances[c, j, s])
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    # r_j' - r_i' + S' cell with r' = r - offset cell  =>  S = S' - offset_j + offset_i
    shift = np.concatenate(found_shift).reshape(-1, 3) - lattice_offsets[j] + lattice_offsets[i]
    return i, j, shift, np.concatenate(found_distance)


def canonical(i, j, shifts, distances):
    """Pairs sorted lexicographically by (i, j, S0, S1, S2)."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 3)
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    return i[order], j[order], shifts[order], np.asarray(distances)[order]


def compare_with_oracle(result, reference, positions, cell, r_max):
    """Return (correct: bool, detail: str)."""
    i, j, shifts, distances = canonical(*result)
    ref_i, ref_j, ref_shifts, ref_distances = reference
    # the libraries may keep pairs at exactly r_max; the spec is strict (<)
    keep = distances < r_max
    i, j, shifts, distances = i[keep], j[keep], shifts[keep], distances[keep]
    if len(i) != len(ref_i):
        return False, f"{len(i)} pairs, brute force has {len(ref_i)}"
    if not (
        np.array_equal(i, ref_i) and np.array_equal(j, ref_j) and np.array_equal(shifts, ref_shifts)
    ):
        return False, "different set of (i, j, S)"
    vectors = positions[j] - positions[i] + shifts @ cell
    if not np.allclose(np.linalg.norm(vectors, axis=1), ref_distances, atol=1e-9):
        return False, "shifts do not reproduce the distances with the given positions"
    if not np.allclose(distances, ref_distances, atol=1e-9):
        return False, "returned distances differ from brute force"
    return True, f"{len(i)} pairs, identical to brute force"


# --------------------------------------------------------------------------------------
# Candidates: each returns (i, j, S, d) for positions, cell, pbc, cutoff
# --------------------------------------------------------------------------------------
def run_vesin(positions, cell, pbc, cutoff, n_threads=0):
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=n_threads)
    return calculator.compute(positions, cell, pbc, quantities="ijSd", copy=True)


def run_matscipy(positions, cell, pbc, cutoff):
    return matscipy.neighbours.neighbour_list(
        "ijSd", positions=positions, cell=cell, pbc=pbc, cutoff=cutoff
    )


def run_ase(positions, cell, pbc, cutoff):
    atoms = ase.Atoms(positions=positions, cell=cell, pbc=pbc)
    return ase.neighborlist.neighbor_list("ijSd", atoms, cutoff)


CANDIDATES = {
    "vesin": lambda p, c, b, r: run_vesin(p, c, b, r, n_threads=0),
    "vesin_1thread": lambda p, c, b, r: run_vesin(p, c, b, r, n_threads=1),
    "matscipy": run_matscipy,
    "ase": run_ase,
}
if matscipy is None:
    del CANDIDATES["matscipy"]


def timings_ms(function, repeats):
    """(median, min) wall time in ms over `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def vesin_crash_probe():
    """Raw vesin on a box very thin along a and very wide along b, c (run in a subprocess:
    vesin 0.6.2 divides by zero there and the process dies with SIGFPE)."""
    import subprocess

    box = [[4.0, 0.0, 0.0], [0.0, 4000.0, 0.0], [0.0, 0.0, 4000.0]]
    code = (
        "import numpy as np, vesin\n"
        f"nl = vesin.NeighborList(cutoff={R_MAX}, full_list=True)\n"
        f"print(len(nl.compute(np.array([[0.5, 1.0, 2.0]]), np.array({box}), True, 'ij')[0]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    return {
        "box": box,
        "cutoff": R_MAX,
        "vesin_returncode": result.returncode,
        "note": "negative return code = killed by that signal (-8: SIGFPE, division by zero in "
        "vesin's cell-list sizing); AtomicGraph searches such boxes with a larger cutoff "
        "(graph._cutoff_safe_for_vesin), tested in tests/test_graph.py",
    }


def load_atomic_graph():
    """AtomicGraph from the repository (end-to-end timing), or None if not importable."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from allegro_fast.graph import AtomicGraph
    except Exception:
        try:  # the package __init__ may be mid-edit; load the module file directly
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "allegro_fast_graph", REPO_ROOT / "allegro_fast" / "graph.py"
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses looks the module up
            spec.loader.exec_module(module)
            AtomicGraph = module.AtomicGraph
        except Exception as error:  # noqa: BLE001
            print(f"AtomicGraph not importable ({error}); skipping end-to-end timing")
            return None
    return AtomicGraph


def machine_info():
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count_visible": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main():
    import torch

    AtomicGraph = load_atomic_graph()
    results = {
        "description": (
            "Neighbour-list libraries on the CPU: median (and min) wall time in ms over "
            "repeated calls "
            "returning i, j, S, d for a full (both directions) list, and correctness against "
            "a brute-force search over periodic images. 'vesin' uses all visible cores "
            "(n_threads=0), 'vesin_1thread' one. 'AtomicGraph.from_ase' is the end-to-end "
            "graph build (validation, neighbour list, filtering, sorting, tensors). Timings "
            "come from the machine described under 'machine'; see its load averages, as other "
            "jobs may share it."
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "r_max_default": R_MAX,
        "versions": {
            "vesin": vesin.__version__,
            "matscipy": getattr(matscipy, "__version__", None),
            "ase": ase.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "machine": machine_info(),
        "cases": {},
    }

    for case_name, (build, repeats, r_max) in CASES.items():
        atoms = build()
        positions = atoms.positions.copy()
        cell = atoms.cell.array.copy()
        pbc = atoms.pbc.copy()
        reference = canonical(*brute_force_pairs(positions, cell, pbc, r_max))
        case = {
            "r_max": r_max,
            "num_atoms": len(atoms),
            "pbc": pbc.tolist(),
            "num_pairs_brute_force": int(len(reference[0])),
            "repeats": repeats,
            "libraries": {},
        }
        for library, function in CANDIDATES.items():
            entry = {}
            try:
                result = function(positions, cell, pbc, r_max)
                correct, detail = compare_with_oracle(result, reference, positions, cell, r_max)
                entry["correct"] = correct
                entry["detail"] = detail
                entry["median_ms"], entry["min_ms"] = timings_ms(
                    lambda: function(positions, cell, pbc, r_max), repeats
                )
            except Exception as error:  # noqa: BLE001 -- recorded as a failure
                entry["correct"] = False
                entry["detail"] = f"error: {type(error).__name__}: {error}"
                entry["median_ms"] = None
            case["libraries"][library] = entry

        if AtomicGraph is not None:
            entry = {}
            try:
                graph = AtomicGraph.from_ase(atoms, r_max)
                result = (
                    graph.edge_index[0].numpy(),
                    graph.edge_index[1].numpy(),
                    graph.edge_shift.numpy(),
                    np.linalg.norm(
                        positions[graph.edge_index[1].numpy()]
                        - positions[graph.edge_index[0].numpy()]
                        + graph.edge_shift.numpy() @ cell,
                        axis=1,
                    ),
                )
                correct, detail = compare_with_oracle(result, reference, positions, cell, r_max)
                entry["correct"] = correct
                entry["detail"] = detail
                entry["median_ms"], entry["min_ms"] = timings_ms(
                    lambda: AtomicGraph.from_ase(atoms, r_max), repeats
                )
            except Exception as error:  # noqa: BLE001
                entry["correct"] = False
                entry["detail"] = f"error: {type(error).__name__}: {error}"
                entry["median_ms"] = None
            case["libraries"]["AtomicGraph.from_ase"] = entry
        results["cases"][case_name] = case

    # fastest library that is correct on every case
    libraries = list(CANDIDATES)
    all_correct = [
        name
        for name in libraries
        if all(case["libraries"][name]["correct"] for case in results["cases"].values())
    ]
    fastest_correct = {}
    for case_name, case in results["cases"].items():
        timed = {
            name: case["libraries"][name]["median_ms"]
            for name in libraries
            if case["libraries"][name]["correct"]
        }
        fastest_correct[case_name] = min(timed, key=timed.get) if timed else None
    results["correct_on_every_case"] = all_correct
    results["fastest_correct_per_case"] = fastest_correct
    bulk_cases = ["fcc_ag_256", "fcc_ag_2048"]
    bulk_time = {
        name: sum(results["cases"][c]["libraries"][name]["median_ms"] for c in bulk_cases)
        for name in all_correct
    }
    results["primary_choice"] = {
        "library": min(bulk_time, key=bulk_time.get) if bulk_time else None,
        "rule": "correct on every case, then least total median time on the bulk fcc Ag cases "
        "(the training/inference workload)",
        "bulk_total_median_ms": bulk_time,
    }
    results["vesin_crash_probe"] = vesin_crash_probe()
    results["machine"]["load_average_at_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")

    # table on stdout
    columns = libraries + (["AtomicGraph.from_ase"] if AtomicGraph is not None else [])
    header = f"{'case':<24}{'atoms':>6}{'pairs':>8}  " + "".join(f"{c:>22}" for c in columns)
    print(header)
    for case_name, case in results["cases"].items():
        cells = []
        for name in columns:
            entry = case["libraries"][name]
            if entry["median_ms"] is None:
                cells.append(f"{'error':>22}")
            else:
                mark = "" if entry["correct"] else " WRONG"
                cells.append(f"{entry['median_ms']:>16.3f} ms{mark:>4}")
        sizes = f"{case_name:<24}{case['num_atoms']:>6}{case['num_pairs_brute_force']:>8}  "
        print(sizes + "".join(cells))
    print("correct on every case:", all_correct)
    print("primary choice:", results["primary_choice"]["library"])
    for case_name, case in results["cases"].items():
        for name in columns:
            entry = case["libraries"][name]
            if not entry["correct"]:
                print(f"  {case_name} / {name}: {entry['detail']}")
    print("vesin crash probe:", results["vesin_crash_probe"]["vesin_returncode"])
    print(f"wrote {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
