"""LAMMPS ML-IAP unified interface: pair energies/forces equal our own evaluation, in and out of LAMMPS.

Without LAMMPS: a stand-in for LAMMPS's MLIAPDataPy (the fields and methods of
src/ML-IAP/mliap_unified_couple.pyx, 4Feb2025, and the force/virial tally of update_pair_forces in
mliap_unified.cpp) splits a periodic structure over one or two fake ranks with ghost atoms.
With the LAMMPS that scripts/build_lammps.sh builds (found at $ALLEGRO_FAST_LAMMPS or
~/.cache/allegro-fast/lammps; skipped with the reason otherwise): energies, per-atom energies, forces and
the virial pressure from LAMMPS on 1 and 2 MPI ranks equal ours (float64, 1e-8 relative), and NVE conserves
energy; the example input runs with the lmp executable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import TRITON_DEVICES, randomize_edge_scale

import allegro_fast as af
from allegro_fast.lammps import (
    LOCAL_RANK_VARIABLES,
    AllegroMLIAPUnified,
    evaluate_pairs,
    lammps_python_path,
    local_rank,
    main,
    rank_device,
    write_lammps_model,
)
from allegro_fast.testing import TOLERANCE, assert_close

REPO = Path(__file__).resolve().parents[1]
LAMMPS_TOLERANCE = TOLERANCE[torch.float64]  # 1e-10 (issue: 1e-8); measured ~3e-14 for forces
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")

# LAMMPS type order (Ag = type 1, Cu = type 2) deliberately differs from the model's type order.
LAMMPS_ELEMENTS = ("Ag", "Cu")
MASSES = {"Ag": 107.8682, "Cu": 63.546}


def alloy_config(**overrides) -> af.AllegroConfig:
    values = {
        "type_names": ("Cu", "Ag"), "r_max": 4.5, "l_max": 2, "num_layers": 2, "num_scalar_features": 15,
        "num_tensor_features": 5, "num_bessels": 7, "two_body_mlp_hidden": (13,), "latent_mlp_hidden": (11,),
        "readout_mlp_hidden": (7,), "avg_num_neighbors": 41.0,
        "per_species_energy_shift": (-3.1, -2.7), "per_species_energy_scale": (0.6, 0.8),
    }
    values.update(overrides)
    return af.AllegroConfig(**values)


def alloy_model(dtype=torch.float64, seed: int = 0) -> af.Allegro:
    torch.manual_seed(seed)
    model = af.Allegro(alloy_config()).to(dtype)
    randomize_edge_scale(model, seed)
    return model.eval()


def sheared_alloy(repeat: int = 3, seed: int = 0):
    """fcc Ag with a quarter of the atoms Cu, rattled, in a slightly sheared cell that is lower triangular
    (the form LAMMPS keeps its triclinic boxes in), so no rotation is needed between the two codes."""
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat(repeat)
    rng = np.random.default_rng(seed)
    symbols = np.array(atoms.get_chemical_symbols())
    symbols[rng.permutation(len(atoms))[: len(atoms) // 4]] = "Cu"
    atoms.set_chemical_symbols(symbols.tolist())
    shear = np.array([[1.0, 0.0, 0.0], [0.04, 1.0, 0.0], [-0.03, 0.05, 1.0]])
    atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    atoms.wrap()
    return atoms


# ----------------------------------------------------------------------------------------------------------
# A stand-in for LAMMPS's MLIAPDataPy
# ----------------------------------------------------------------------------------------------------------
class FakeMLIAPData:
    """The MLIAPDataPy fields a unified model reads, and its write-only eatoms / energy and update_pair_forces.

    Like the Cython original, eatoms and fij must be float64 buffers of the exact shape (a memoryview
    double[:] / double[:, ::1] assignment). update_pair_forces tallies as mliap_unified.cpp does:
    f[i] += fij, f[j] -= fij, virial += -rij (x) fij.
    """

    def __init__(self, rij, pair_i, pair_j, elems, nlocal):
        self.ntotal = len(elems)
        self.nlocal = self.nlistatoms = self.natomneigh = nlocal
        self.npairs = len(pair_i)
        self.rij = np.ascontiguousarray(rij, dtype=np.float64)
        self.pair_i = np.asarray(pair_i, dtype=np.int32)
        self.jatoms = np.asarray(pair_j, dtype=np.int32)
        self.elems = np.asarray(elems, dtype=np.int32)
        self.iatoms = np.arange(nlocal, dtype=np.int32)
        self.eflag = self.vflag = 1
        self.f = np.zeros((self.ntotal, 3))
        self.virial = np.zeros((3, 3))
        self.written_eatoms = None
        self.written_energy = None

    @property
    def pair_j(self):
        return self.jatoms

    def _set_eatoms(self, value):
        assert isinstance(value, np.ndarray) and value.dtype == np.float64 and value.shape == (self.nlistatoms,)
        self.written_eatoms = value.copy()

    def _set_energy(self, value):
        self.written_energy = float(value)

    eatoms = property(fset=_set_eatoms)
    energy = property(fset=_set_energy)

    def update_pair_forces(self, fij):
        assert fij.dtype == np.float64 and fij.shape == (self.npairs, 3) and fij.flags.c_contiguous
        np.add.at(self.f, self.pair_i, fij)
        np.subtract.at(self.f, self.jatoms, fij)
        self.virial -= np.einsum("pa,pb->ab", self.rij, fij)


def fake_rank(graph: af.AtomicGraph, species: np.ndarray, owned: np.ndarray):
    """The data one rank would get for its owned atoms: local atoms first, then a ghost for every other
    (atom, periodic shift) among their neighbours. Returns the data and each local/ghost atom's owner."""
    centers, neighbours = graph.edge_index.numpy()
    shifts = graph.edge_shift.numpy()
    vectors = graph.edge_vectors().numpy()
    local_index = {(int(atom), (0, 0, 0)): k for k, atom in enumerate(owned)}
    owner = list(owned)
    keep = np.flatnonzero(np.isin(centers, owned))
    pair_i, pair_j = [], []
    for edge in keep:
        key = (int(neighbours[edge]), tuple(int(s) for s in shifts[edge]))
        if key not in local_index:
            local_index[key] = len(owner)
            owner.append(key[0])
        pair_i.append(local_index[(int(centers[edge]), (0, 0, 0))])
        pair_j.append(local_index[key])
    owner = np.array(owner)
    data = FakeMLIAPData(vectors[keep], pair_i, pair_j, species[owner], nlocal=len(owned))
    return data, owner


def run_fake_ranks(unified, atoms, num_ranks: int):
    """Energy, per-atom energies, forces and virial summed over fake ranks (split along x)."""
    graph = af.AtomicGraph.from_ase([atoms], r_max=unified.model.config.r_max)
    species = unified.model.species_of(graph).numpy()
    fractional_x = atoms.get_scaled_positions()[:, 0]
    num_atoms = len(atoms)
    energy, atomic_energy = 0.0, np.zeros(num_atoms)
    forces, virial = np.zeros((num_atoms, 3)), np.zeros((3, 3))
    for rank in range(num_ranks):
        owned = np.flatnonzero((fractional_x * num_ranks).astype(int) == rank)
        data, owner = fake_rank(graph, species, owned)
        unified.compute_descriptors(data)
        unified.compute_gradients(data)
        unified.compute_forces(data)
        energy += data.written_energy
        atomic_energy[owned] = data.written_eatoms
        np.add.at(forces, owner, data.f)  # reverse communication: ghost forces go to their owners
        virial += data.virial
    return energy, atomic_energy, forces, virial


def float64(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def ase_path(model, atoms):
    out = model(af.AtomicGraph.from_ase([atoms], r_max=model.config.r_max), create_graph=False)
    return {key: value.detach() for key, value in out.items()}


@pytest.mark.parametrize("num_ranks", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pairs_reproduce_the_model_on_fake_ranks(num_ranks, dtype):
    model = alloy_model(dtype)
    atoms = sheared_alloy(repeat=2, seed=num_ranks)
    expected = ase_path(model, atoms)
    energy, atomic_energy, forces, virial = run_fake_ranks(AllegroMLIAPUnified(model), atoms, num_ranks)
    tolerance = TOLERANCE[dtype]
    assert_close(float64([energy]), expected["energy"], "energy", tolerance)
    assert_close(float64(atomic_energy), expected["atomic_energy"], "per-atom energy", tolerance)
    assert_close(float64(forces), expected["forces"], "forces", tolerance)
    # LAMMPS's virial W = -sum rij (x) dE/drij is -V times our stress.
    stress = -virial / atoms.get_volume()
    assert_close(float64(stress), expected["stress"][0], "stress from the virial", tolerance)


def test_pair_order_and_isolated_atoms():
    """Pairs need not come sorted by center; atoms with no neighbour get their shift, edge-free ranks work."""
    model = alloy_model()
    atoms = sheared_alloy(repeat=2, seed=5)
    graph = af.AtomicGraph.from_ase([atoms], r_max=model.config.r_max)
    species = model.species_of(graph).numpy()
    data, _ = fake_rank(graph, species, np.arange(len(atoms)))
    energies, gradients = evaluate_pairs(model, data.rij, data.pair_i, data.pair_j, data.elems, data.iatoms)
    permutation = np.random.default_rng(0).permutation(data.npairs)
    shuffled_energies, shuffled_gradients = evaluate_pairs(
        model, data.rij[permutation], data.pair_i[permutation], data.pair_j[permutation], data.elems, data.iatoms
    )
    np.testing.assert_allclose(shuffled_energies, energies, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(shuffled_gradients, gradients[permutation], rtol=1e-10, atol=1e-12)

    lonely = FakeMLIAPData(np.zeros((0, 3)), [], [], [1, 0, 1], nlocal=3)
    AllegroMLIAPUnified(model).compute_forces(lonely)
    shift = model.per_species_energy_shift
    np.testing.assert_allclose(lonely.written_eatoms, shift[[1, 0, 1]].numpy(), rtol=1e-14)
    assert lonely.written_energy == pytest.approx(float(shift[[1, 0, 1]].sum()), rel=1e-14)


def test_unknown_element_is_named():
    model = alloy_model()
    data = FakeMLIAPData(np.array([[1.0, 2.0, 0.5]]), [0], [1], [0, 5], nlocal=1)
    with pytest.raises(ValueError, match=r"LAMMPS atom 1 .*element index 5,.*pair_coeff"):
        AllegroMLIAPUnified(model).compute_forces(data)


def test_written_file_rebuilds_the_same_model(tmp_path, capsys):
    model = alloy_model()
    atoms = sheared_alloy(repeat=2, seed=3)
    af.save(model, tmp_path / "model.pt", metadata={"note": "lammps"})
    assert main([str(tmp_path / "model.pt"), str(tmp_path / "model.mliap.pkl")]) == 0
    printed = capsys.readouterr().out
    assert f"pair_style mliap unified {tmp_path / 'model.mliap.pkl'} 0" in printed
    assert "pair_coeff * * Cu Ag" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mliap.pkl", "model.pt"]  # no temporary left

    with open(tmp_path / "model.mliap.pkl", "rb") as stream:  # what LAMMPS does for a non-.pt file
        unified = pickle.load(stream)
    assert unified.element_types == ["Cu", "Ag"] and unified.rcutfac == pytest.approx(2.25)
    assert unified.ndescriptors == 1 and unified.nparams == 1
    assert unified.model.metadata["note"] == "lammps" and unified.model.dtype == torch.float64
    expected = run_fake_ranks(AllegroMLIAPUnified(model), atoms, 1)
    for got, want in zip(run_fake_ranks(unified, atoms, 1), expected):
        np.testing.assert_array_equal(got, want)

    single = write_lammps_model(tmp_path / "model.pt", tmp_path / "single.pkl", dtype="float32")
    assert single.model.dtype == torch.float32


@pytest.mark.slow
def test_compiled_pairs_match_eager_without_recompiling(tmp_path):
    """compile=True (inductor, dynamic shapes): one program serves ranks with other pair and atom counts, equal to
    the eager evaluation to float64 round-off; a call with fewer than two pairs runs eagerly; the option survives
    the pickle LAMMPS loads."""
    model = alloy_model()
    af.save(model, tmp_path / "model.pt")
    assert main([str(tmp_path / "model.pt"), str(tmp_path / "model.mliap.pkl"), "--compile"]) == 0
    with open(tmp_path / "model.mliap.pkl", "rb") as stream:
        compiled = pickle.load(stream)
    assert compiled.compile is True and compiled._compiled is not None
    eager = AllegroMLIAPUnified(model)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed, num_ranks in ((1, 1), (2, 2), (3, 2)):
        atoms = sheared_alloy(repeat=2, seed=seed)
        expected = run_fake_ranks(eager, atoms, num_ranks)
        for got, want, what in zip(run_fake_ranks(compiled, atoms, num_ranks), expected,
                                   ("energy", "per-atom energy", "forces", "virial")):
            assert_close(float64(np.atleast_1d(got)), float64(np.atleast_1d(want)), f"{num_ranks} rank(s): {what}",
                         1e-12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1

    single = FakeMLIAPData(np.array([[1.0, 2.0, 0.5]]), [0], [1], [0, 1], nlocal=2)
    reference = FakeMLIAPData(np.array([[1.0, 2.0, 0.5]]), [0], [1], [0, 1], nlocal=2)
    compiled.compute_forces(single)
    eager.compute_forces(reference)
    np.testing.assert_array_equal(single.f, reference.f)
    np.testing.assert_array_equal(single.written_eatoms, reference.written_eatoms)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_on_fake_ranks_eager_and_compiled(device):
    """The triton backend through the pair interface (the graph of local atoms plus one node per species), eager
    and compiled (CPU: the interpreter under aot_eager; CUDA: inductor), against the torch backend's ASE path."""
    torch.manual_seed(0)
    model = af.Allegro(alloy_config(l_max=1, num_tensor_features=3), backend="triton").double()
    randomize_edge_scale(model, 0)
    reference = af.Allegro(model.config).double()  # the torch backend with the same weights
    reference.load_state_dict(model.state_dict())
    atoms = sheared_alloy(repeat=1, seed=11)
    expected = ase_path(reference, atoms)
    model = model.to(device).eval()
    compile = "aot_eager" if device == "cpu" else True
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for unified in (AllegroMLIAPUnified(model), AllegroMLIAPUnified(model, compile=compile)):
        how = "compiled" if unified.compile else "eager"
        for num_ranks in (1, 2):
            energy, atomic_energy, forces, virial = run_fake_ranks(unified, atoms, num_ranks)
            label = f"{how}, {num_ranks} rank(s)"
            assert_close(float64([energy]), expected["energy"], f"{label}: energy", TOLERANCE[torch.float64])
            assert_close(float64(forces), expected["forces"], f"{label}: forces", TOLERANCE[torch.float64])
            assert_close(float64(-virial / atoms.get_volume()), expected["stress"][0], f"{label}: stress",
                         TOLERANCE[torch.float64])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # one program for both splits


def test_ranks_of_a_node_spread_over_its_gpus(tmp_path, monkeypatch):
    """--device cuda: the file keeps "cuda" (written without a GPU), and each rank takes the GPU of its node-local
    rank, from the launcher's environment; an explicit index and the CPU stay as they are."""
    for name in LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")  # the earlier entry of LOCAL_RANK_VARIABLES wins
    assert local_rank() == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("cuda") == torch.device("cuda", 1)
    assert rank_device("cuda:0") == torch.device("cuda", 0)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert rank_device("cuda") == torch.device("cuda")

    af.save(alloy_model(), tmp_path / "model.pt")
    unified = write_lammps_model(tmp_path / "model.pt", tmp_path / "gpu.mliap.pkl", device="cuda")
    assert unified.device == "cuda" and next(unified.model.parameters()).device.type == "cpu"
    with open(tmp_path / "gpu.mliap.pkl", "rb") as stream:
        state = pickle.load(stream).__getstate__() if torch.cuda.is_available() else None
    if state is not None:
        assert state["device"] == "cuda"
    else:
        with open(tmp_path / "gpu.mliap.pkl", "rb") as stream, pytest.raises(RuntimeError, match="for device cuda, but"):
            pickle.load(stream)
    with pytest.raises(RuntimeError, match="device"):
        write_lammps_model(tmp_path / "model.pt", tmp_path / "bad.mliap.pkl", device="cdua")
    assert not (tmp_path / "bad.mliap.pkl").exists()


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_the_launcher_gives_each_rank_its_local_rank():
    """Under a real mpiexec (the mpich wheel's Hydra), the ranks of this node read local ranks 0 and 1."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for name in LOCAL_RANK_VARIABLES:
        environment.pop(name, None)
    command = [MPIEXEC, "-n", "2", sys.executable, "-c",
               "from allegro_fast.lammps import local_rank; print(local_rank())"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert sorted(completed.stdout.split()) == ["0", "1"]


@pytest.mark.slow
def test_command_line_writes_an_importable_class(tmp_path):
    """`python -m allegro_fast.lammps` must pickle allegro_fast.lammps.AllegroMLIAPUnified, not __main__'s copy."""
    af.save(alloy_model(), tmp_path / "model.pt")
    completed = subprocess.run(
        [sys.executable, "-m", "allegro_fast.lammps", str(tmp_path / "model.pt"), str(tmp_path / "model.mliap.pkl")],
        capture_output=True, text=True, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "model.mliap.pkl", "rb") as stream:
        assert type(pickle.load(stream)) is AllegroMLIAPUnified


def test_bad_arguments_are_explained(tmp_path, capsys):
    af.save(alloy_model(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"torch.load.*\.mliap\.pkl"):
        write_lammps_model(tmp_path / "model.pt", tmp_path / "out.pt")
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "out.pkl")]) == 2
    assert "no model file" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile backend name, got 3"):
        AllegroMLIAPUnified(alloy_model(), compile=3)
    state = pickle.dumps(AllegroMLIAPUnified(alloy_model()))
    with pytest.raises(ValueError, match="format"):
        pickle.loads(state.replace(b"allegro-fast-lammps-mliap", b"allegro-fast-lammps-mliaq"))


# ----------------------------------------------------------------------------------------------------------
# A real LAMMPS
# ----------------------------------------------------------------------------------------------------------
LAMMPS_PYTHON = lammps_python_path()
requires_lammps = pytest.mark.skipif(
    LAMMPS_PYTHON is None or MPIEXEC is None,
    reason="no LAMMPS with ML-IAP Python support at $ALLEGRO_FAST_LAMMPS or ~/.cache/allegro-fast/lammps "
    "(build it with scripts/build_lammps.sh)" if LAMMPS_PYTHON is None else "no mpiexec (pip install mpich)",
)


def lammps_environment() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LAMMPS_PYTHON), str(REPO), os.environ.get("PYTHONPATH")]))
    return environment


def run_lammps(tmp_path, model_file, atoms, num_ranks: int, **run) -> dict:
    type_of = {element: k + 1 for k, element in enumerate(LAMMPS_ELEMENTS)}
    job = {
        "model_file": str(model_file), "elements": list(LAMMPS_ELEMENTS),
        "masses": [MASSES[e] for e in LAMMPS_ELEMENTS], "cell": atoms.cell.array.tolist(),
        "positions": atoms.positions.tolist(), "types": [type_of[s] for s in atoms.get_chemical_symbols()], **run,
    }
    job_path, result_path = tmp_path / f"job{num_ranks}.json", tmp_path / f"result{num_ranks}.json"
    job_path.write_text(json.dumps(job))
    command = [MPIEXEC, "-n", str(num_ranks), sys.executable, str(REPO / "tests" / "lammps_driver.py"), str(job_path),
               str(result_path)]
    completed = subprocess.run(command, check=False, env=lammps_environment(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"LAMMPS failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    result = json.loads(result_path.read_text())
    assert result["nprocs"] == num_ranks
    return result


@pytest.fixture(scope="module")
def lammps_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lammps_model")
    model = alloy_model()
    af.save(model, folder / "model.pt")
    write_lammps_model(folder / "model.pt", folder / "model.mliap.pkl")
    return model, folder / "model.mliap.pkl"


@requires_lammps
@pytest.mark.slow
def test_lammps_matches_our_evaluation_on_one_and_two_ranks(tmp_path, lammps_model):
    model, model_file = lammps_model
    atoms = sheared_alloy(repeat=3, seed=7)
    expected = ase_path(model, atoms)
    results = {ranks: run_lammps(tmp_path, model_file, atoms, ranks) for ranks in (1, 2)}
    for ranks, result in results.items():
        what = f"LAMMPS on {ranks} rank(s)"
        assert_close(float64([result["energy"]]), expected["energy"], f"{what}: energy", LAMMPS_TOLERANCE)
        assert_close(float64(result["atomic_energy"]), expected["atomic_energy"], f"{what}: per-atom energy",
                     LAMMPS_TOLERANCE)
        assert_close(float64(result["forces"]), expected["forces"], f"{what}: forces", LAMMPS_TOLERANCE)
        xx, yy, zz, xy, xz, yz = result["pressure_virial"]
        pressure = float64([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        # compute pressure NULL virial = W / V in bar; W = -V * stress.
        assert_close(-pressure / result["nktv2p"], expected["stress"][0], f"{what}: virial stress", LAMMPS_TOLERANCE)
        assert result["volume"] == pytest.approx(atoms.get_volume(), rel=1e-12)
    one, two = results[1], results[2]
    assert_close(float64(two["forces"]), float64(one["forces"]), "2 ranks vs 1: forces", 1e-10)
    assert two["energy"] == pytest.approx(one["energy"], rel=1e-12)


@requires_lammps
@pytest.mark.slow
def test_lammps_nve_conserves_energy(tmp_path, lammps_model):
    _, model_file = lammps_model
    atoms = sheared_alloy(repeat=3, seed=8)
    steps = 100
    result = run_lammps(tmp_path, model_file, atoms, 2, steps=steps, timestep=0.001, temperature=600.0, seed=4,
                        thermo_every=10)
    thermo = np.array(result["thermo"])
    assert thermo.shape == (steps // 10 + 1, 4)
    kinetic, total = thermo[:, 2], thermo[:, 3]
    exchanged = np.ptp(kinetic)
    drift = np.abs(total - total[0]).max()
    # Several eV flow from potential to kinetic energy (random weights: far from a minimum), while the total
    # stays put to 1e-3 of that (measured: 1.6e-4 eV of 11 eV over 200 steps of 1 fs).
    assert exchanged > 0.2 * kinetic[0]
    assert drift < 1e-3 * exchanged, f"total energy moved by {drift:.2e} eV while {exchanged:.2f} eV were exchanged"


@requires_lammps
@pytest.mark.slow
def test_compiled_model_in_lammps_matches_the_eager_one(tmp_path, lammps_model):
    """A model file written with compile=True, on 2 ranks: the same energy, forces and virial as the eager file,
    and the same 20 NVE steps (float64 round-off)."""
    model, model_file = lammps_model
    compiled_file = tmp_path / "compiled.mliap.pkl"
    write_lammps_model(model_file.with_name("model.pt"), compiled_file, compile=True)
    atoms = sheared_alloy(repeat=3, seed=9)
    run = {"steps": 20, "timestep": 0.001, "temperature": 600.0, "seed": 5, "thermo_every": 10}
    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    eager = run_lammps(tmp_path / "eager", model_file, atoms, 2, **run)
    compiled = run_lammps(tmp_path / "compiled", compiled_file, atoms, 2, **run)
    assert compiled["energy"] == pytest.approx(eager["energy"], rel=1e-12)
    for key in ("atomic_energy", "forces", "pressure_virial", "thermo", "positions"):
        assert_close(float64(compiled[key]), float64(eager[key]), f"compiled vs eager LAMMPS: {key}", 1e-10)


def thermo_rows(output: str) -> np.ndarray:
    """The thermo table LAMMPS printed (the rows after the 'Step' header, up to 'Loop time')."""
    lines = output.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:1] == ["Step"])
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(value) for value in line.split()])
    return np.array(rows)


@requires_lammps
@pytest.mark.slow
def test_example_input_runs_with_run_py_and_with_lmp(tmp_path):
    """examples/lammps/in.allegro on 2 ranks, through run.py and through the lmp executable: same thermo."""
    torch.manual_seed(1)
    config = af.AllegroConfig(type_names=("Ag",), r_max=4.5, num_scalar_features=16, num_tensor_features=4,
                              two_body_mlp_hidden=(16,), latent_mlp_hidden=(16,), readout_mlp_hidden=(8,),
                              avg_num_neighbors=18.0)
    af.save(af.Allegro(config), tmp_path / "ag.pt")
    write_lammps_model(tmp_path / "ag.pt", tmp_path / "ag.mliap.pkl")
    example = REPO / "examples" / "lammps" / "in.allegro"
    arguments = ["-in", str(example), "-var", "model", str(tmp_path / "ag.mliap.pkl"), "-var", "steps", "10",
                 "-log", "none"]
    environment = lammps_environment()
    # The lmp executable's embedded Python finds this environment through `python3` on PATH (pyvenv.cfg).
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    commands = {
        "run.py": [MPIEXEC, "-n", "2", sys.executable, str(example.parent / "run.py"), *arguments[1:]],
        "lmp": [MPIEXEC, "-n", "2", str(LAMMPS_PYTHON.parent / "bin" / "lmp"), *arguments],
    }
    tables = {}
    for launcher, command in commands.items():
        completed = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, check=False,
                                   timeout=600)
        assert completed.returncode == 0, f"{launcher} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        assert "Created 256 atoms" in completed.stdout and "by 2 MPI processor grid" in completed.stdout
        tables[launcher] = thermo_rows(completed.stdout)
    table = tables["lmp"]
    assert table[:, 0].tolist() == [0, 10] and np.isfinite(table).all()
    np.testing.assert_allclose(tables["run.py"], table, rtol=1e-12)
