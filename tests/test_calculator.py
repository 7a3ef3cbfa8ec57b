"""AllegroCalculator: the neighbour list reused with a Verlet skin gives exactly the results of a fresh one."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet
from conftest import ethanol, periodic_cho, small_config

import allegro_fast as af
from allegro_fast.calculator import AllegroCalculator


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return af.Allegro(small_config()).to(torch.float64)


def assert_same_graph(calculator: AllegroCalculator, atoms: Atoms) -> None:
    """The graph the calculator hands the model has exactly the edges, in order, of a fresh list."""
    graph = calculator._graph(atoms)
    fresh = af.AtomicGraph.from_ase(atoms, r_max=calculator.r_max)
    assert torch.equal(graph.edge_index, fresh.edge_index)
    assert torch.equal(graph.edge_shift, fresh.edge_shift)
    assert torch.equal(graph.center_ptr, fresh.center_ptr)
    for field in ("positions", "atomic_numbers", "cell", "pbc", "batch", "num_atoms"):
        assert torch.equal(getattr(graph, field), getattr(fresh, field)), field


def assert_same_results(with_skin: Atoms, without_skin: Atoms) -> None:
    np.testing.assert_allclose(with_skin.get_potential_energy(), without_skin.get_potential_energy(), rtol=1e-13, atol=0)
    np.testing.assert_allclose(with_skin.get_forces(), without_skin.get_forces(), rtol=1e-12, atol=1e-13)
    if with_skin.pbc.all():
        np.testing.assert_allclose(with_skin.get_stress(), without_skin.get_stress(), rtol=1e-12, atol=1e-13)


def test_skin_follows_an_md_trajectory_exactly(model):
    atoms = periodic_cho(4)
    atoms.calc = AllegroCalculator(model, skin=0.3)  # small skin: several rebuilds within the run
    plain = AllegroCalculator(model, skin=0.0)
    rng = np.random.default_rng(0)
    atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))
    # the untrained model heats the cell to thousands of K: a short time step, about one rebuild per 5 steps
    dynamics = VelocityVerlet(atoms, 0.25 * units.fs)
    for _ in range(12):
        dynamics.run(5)
        assert_same_graph(atoms.calc, atoms)
        copy = atoms.copy()
        copy.calc = plain
        assert_same_results(atoms, copy)
    assert atoms.calc.neighbor_list_builds >= 2, "the test should cross at least one rebuild"
    assert atoms.calc.neighbor_list_reuses > atoms.calc.neighbor_list_builds


@pytest.mark.parametrize("make_atoms", [periodic_cho, ethanol], ids=["periodic", "molecule"])
def test_skin_under_random_displacements(model, make_atoms):
    atoms = make_atoms(5)
    skin = 0.6
    calculator = AllegroCalculator(model, skin=skin)
    rng = np.random.default_rng(1)
    start = atoms.get_positions()
    calculator._graph(atoms)
    for scale in (0.01, 0.05, 0.1, 0.25, 0.5, 1.5, 0.02):
        builds = calculator.neighbor_list_builds
        atoms.positions = start + rng.normal(scale=scale, size=start.shape)
        assert_same_graph(calculator, atoms)
        moved = np.linalg.norm(atoms.positions - calculator._candidates.positions, axis=1).max()
        if calculator.neighbor_list_builds == builds:
            assert moved <= skin / 2  # reused only while it is exact
        atoms.calc = calculator
        copy = atoms.copy()
        copy.calc = AllegroCalculator(model, skin=0.0)
        assert_same_results(atoms, copy)
        start = atoms.get_positions()
    assert calculator.neighbor_list_builds >= 2


def test_rebuilds_when_the_structure_changes(model):
    atoms = periodic_cho(6)
    calculator = AllegroCalculator(model, skin=1.0)

    def check(changed: Atoms, expect_rebuild: bool) -> None:
        builds = calculator.neighbor_list_builds
        assert_same_graph(calculator, changed)
        assert calculator.neighbor_list_builds == builds + int(expect_rebuild)
        changed = changed.copy()
        changed.calc = calculator
        reference = changed.copy()
        reference.calc = AllegroCalculator(model, skin=0.0)
        assert_same_results(changed, reference)

    check(atoms, True)
    check(atoms, False)
    strained = atoms.copy()
    strained.set_cell(atoms.cell.array @ np.array([[1.02, 0.01, 0], [0, 0.99, 0], [0, 0, 1.0]]), scale_atoms=True)
    check(strained, True)
    same_cell_new_positions = strained.copy()
    same_cell_new_positions.positions += 0.01
    check(same_cell_new_positions, False)
    wrapped = same_cell_new_positions.copy()
    wrapped.positions[2] += wrapped.cell[0]  # the same structure, one atom moved by a lattice vector
    check(wrapped, True)
    fewer = wrapped.copy()
    del fewer[3]
    check(fewer, True)
    more = wrapped.copy()
    more.append("H")
    more.positions[-1] = more.positions[0] + [0.0, 0.0, 1.05]
    check(more, True)
    swapped = more.copy()
    swapped.numbers[[0, 2]] = swapped.numbers[[2, 0]]
    check(swapped, True)
    slab = swapped.copy()
    slab.pbc = [True, True, False]
    check(slab, True)


def test_coinciding_atoms_are_an_error_even_when_the_list_is_reused(model):
    atoms = periodic_cho(7)
    calculator = AllegroCalculator(model, skin=12.0)
    calculator._graph(atoms)
    bad = atoms.copy()
    bad.positions[1] = bad.positions[0] + 1e-8
    assert np.linalg.norm(bad.positions[1] - atoms.positions[1]) < 6.0  # within skin / 2: the list is valid
    with pytest.raises(ValueError, match="atoms 0 and 1 are at the same place"):
        calculator._graph(bad)


def test_bad_skin_is_an_error(model):
    for skin in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="skin must be a finite number"):
            AllegroCalculator(model, skin=skin)


@pytest.mark.slow
def test_compiled_calculator_matches_eager_along_md(model):
    """compile="aot_eager" (Dynamo + AOTAutograd, no code generation; inductor is tested in test_export):
    the compiled slot-layout program gives the eager results along a trajectory whose neighbour counts and
    list rebuilds change, without compiling again."""
    atoms = periodic_cho(4)
    atoms.calc = AllegroCalculator(model, skin=0.3, compile="aot_eager")
    eager = AllegroCalculator(model, skin=0.3)
    rng = np.random.default_rng(1)
    atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))
    dynamics = VelocityVerlet(atoms, 0.25 * units.fs)
    slot_counts = set()

    def step_and_compare() -> None:
        dynamics.run(5)
        graph = atoms.calc._graph(atoms)
        slot_counts.add(int((graph.center_ptr[1:] - graph.center_ptr[:-1]).max()))
        copy = atoms.copy()
        copy.calc = eager
        np.testing.assert_allclose(atoms.get_potential_energy(), copy.get_potential_energy(), rtol=1e-12, atol=0)
        np.testing.assert_allclose(atoms.get_forces(), copy.get_forces(), rtol=1e-10, atol=1e-11)
        np.testing.assert_allclose(atoms.get_stress(), copy.get_stress(), rtol=1e-10, atol=1e-11)

    step_and_compare()  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(5):
            step_and_compare()
    assert atoms.calc.neighbor_list_builds >= 2
    assert len(slot_counts) >= 2, f"the neighbour-slot count should change along the run, saw {slot_counts}"


def test_cuda_graphs_need_a_cuda_device_and_inductor(model):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, the model is on cpu"):
            AllegroCalculator(model, cuda_graphs=True)
    else:
        with pytest.raises(ValueError, match="cuda_graphs compiles with inductor, got compile='aot_eager'"):
            AllegroCalculator(model, device="cuda", cuda_graphs=True, compile="aot_eager")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cuda_graph_calculator_matches_eager_along_md():
    """cuda_graphs=True with the triton backend (float64): one CUDA graph replayed per MD step, edges padded; the
    energies and forces of the eager model along a trajectory whose edge count changes."""
    torch.manual_seed(0)
    triton_model = af.Allegro(small_config(num_layers=2, l_max=1, num_tensor_features=3), backend="triton").double()
    triton_model = triton_model.to("cuda")
    atoms = periodic_cho(4)
    atoms.calc = AllegroCalculator(triton_model, skin=0.3, cuda_graphs=True)
    eager = AllegroCalculator(triton_model, skin=0.3)
    rng = np.random.default_rng(1)
    atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))
    dynamics = VelocityVerlet(atoms, 0.25 * units.fs)
    edge_counts = set()
    for _ in range(6):
        dynamics.run(5)
        edge_counts.add(atoms.calc._graph(atoms).num_edges)
        copy = atoms.copy()
        copy.calc = eager
        np.testing.assert_allclose(atoms.get_potential_energy(), copy.get_potential_energy(), rtol=1e-12, atol=0)
        np.testing.assert_allclose(atoms.get_forces(), copy.get_forces(), rtol=1e-10, atol=1e-11)
    assert len(edge_counts) >= 2 and atoms.calc._compiled.padding.resizes == 1


def test_state_check_gives_ases_answer_and_computes_once_per_md_step(model, monkeypatch):
    """`check_state`'s shortcut (exact equality: nothing changed) agrees with ASE's compare_atoms on every kind of
    change, and an MD run evaluates the model once per step."""
    from ase.calculators.calculator import compare_atoms

    atoms = periodic_cho(2)
    calculator = AllegroCalculator(model)
    atoms.calc = calculator
    atoms.get_forces()
    changes = {
        "nothing": lambda a: None,
        "momenta only (not checked by ASE)": lambda a: a.set_momenta(np.ones((len(a), 3))),
        "a position": lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] + 1e-3),
        "a position, below ASE's tolerance": lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] * (1 + 1e-17)
                                                                               + 1e-16),
        "the cell": lambda a: a.set_cell(a.cell.array * 1.01, scale_atoms=False),
        "pbc": lambda a: a.set_pbc([True, True, False]),
        "an atomic number": lambda a: a.numbers.__setitem__(0, 1 if a.numbers[0] != 1 else 6),
        "initial charges added": lambda a: a.set_initial_charges(np.zeros(len(a))),
    }
    for label, change in changes.items():
        other = atoms.copy()
        change(other)
        assert calculator.check_state(other) == compare_atoms(calculator.atoms, other), label

    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *args, **kwargs: calls.append(1) or
                        forward(self, *args, **kwargs))
    atoms.set_velocities(np.random.default_rng(0).normal(scale=0.01, size=(len(atoms), 3)))
    VelocityVerlet(atoms, 0.25 * units.fs).run(6)
    assert len(calls) == 6


def test_from_file_loads_the_model_with_the_backend_asked_for(model, tmp_path):
    af.save(model, tmp_path / "model.pt")
    atoms = periodic_cho(2)
    atoms.calc = AllegroCalculator(model)
    for backend, kind in ((None, af.Allegro), ("reference", af.reference.ReferenceAllegro)):
        calculator = AllegroCalculator.from_file(tmp_path / "model.pt", backend=backend, skin=0.0)
        assert type(calculator.model) is kind and calculator.skin == 0.0
        copy = atoms.copy()
        copy.calc = calculator
        np.testing.assert_allclose(copy.get_forces(), atoms.get_forces(), rtol=1e-10, atol=1e-12)
