"""The reference model: symmetries, derivatives, locality, extensivity and precision (DESIGN section 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

import allegro_fast as af
from allegro_fast.testing import TOLERANCE, assert_close, assert_equivariant

from conftest import ethanol, lonely_and_pair, periodic_cho, randomize_edge_scale, small_config

F64 = TOLERANCE[torch.float64]


def reference(seed: int = 0, dtype=torch.float64, **overrides) -> af.reference.ReferenceAllegro:
    torch.manual_seed(seed)
    model = af.reference.ReferenceAllegro(small_config(**overrides)).to(dtype)
    randomize_edge_scale(model, seed)
    return model


def evaluate(model, atoms, **kwargs):
    return model(af.AtomicGraph.from_ase(atoms, r_max=model.config.r_max), **kwargs)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(l_max=1, num_layers=1),
        dict(l_max=3, num_layers=3),
        dict(parity=False),
        dict(l_max=3, parity=False, num_layers=1),
        dict(per_edge_species_scale=False, bessel_trainable=True),
    ],
    ids=["default", "l1-1layer", "l3-3layers", "se3", "se3-l3-1layer", "no-pair-scale"],
)
def test_equivariance(overrides, structures):
    model = reference(**overrides)
    errors = assert_equivariant(model, structures, trials=4, seed=7)
    assert set(errors) == {"energy", "forces", "stress"}
    assert max(errors.values()) <= F64


def test_se3_model_is_not_required_to_be_reflection_invariant():
    """Sanity check that the reflection test can fail: an SE(3) model of a chiral structure."""
    model = reference(parity=False, l_max=3, seed=3)
    atoms = periodic_cho(5)
    reflected = atoms.copy()
    reflected.positions = -atoms.positions
    reflected.cell = -np.asarray(atoms.cell)
    e1 = evaluate(model, atoms)["energy"].detach()
    e2 = evaluate(model, reflected)["energy"].detach()
    assert float((e1 - e2).abs()) > 1e-6
    with pytest.raises(AssertionError, match="energy under reflection"):
        assert_equivariant(model, atoms, trials=2, reflections=True)


def finite_difference_forces(model, atoms: Atoms, step: float = 1e-4) -> np.ndarray:
    forces = np.zeros((len(atoms), 3))
    for atom in range(len(atoms)):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[atom, axis] += sign * step
                energies.append(float(evaluate(model, moved, compute_forces=False, compute_stress=False)["energy"].detach()))
            forces[atom, axis] = -(energies[0] - energies[1]) / (2 * step)
    return forces


@pytest.mark.parametrize("make", [ethanol, periodic_cho, lonely_and_pair], ids=["molecule", "triclinic", "lonely"])
def test_forces_match_finite_differences(make):
    model = reference(seed=1)
    atoms = make(4)
    forces = evaluate(model, atoms)["forces"]
    assert_close(forces, torch.as_tensor(finite_difference_forces(model, atoms)), "forces vs finite differences", 1e-6)


def test_stress_matches_finite_strain():
    model = reference(seed=2)
    atoms = periodic_cho(6)
    stress = evaluate(model, atoms)["stress"][0]
    step = 1e-5
    expected = np.zeros((3, 3))
    volume = atoms.get_volume()
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * step / 2
                strain[b, a] += sign * step / 2
                strained = atoms.copy()
                strained.set_cell(np.asarray(atoms.cell) @ strain, scale_atoms=True)
                energies.append(float(evaluate(model, strained, compute_forces=False, compute_stress=False)["energy"].detach()))
            expected[a, b] = (energies[0] - energies[1]) / (2 * step) / volume
    assert_close(stress, torch.as_tensor(expected), "stress vs finite strain", 1e-6)
    assert_close(stress, stress.T, "stress symmetry", F64)


def test_extensive_under_replication():
    model = reference(seed=3)
    atoms = periodic_cho(8)
    one = evaluate(model, atoms)
    replicated = evaluate(model, atoms.repeat((2, 1, 3)))
    assert_close(replicated["energy"], 6 * one["energy"], "energy of a 2x1x3 supercell", F64)
    assert_close(replicated["forces"][: len(atoms)], one["forces"], "forces in the supercell", F64)
    assert_close(replicated["stress"], one["stress"], "stress of the supercell", F64)


def test_locality_far_atom_changes_nothing_else():
    model = reference(seed=4)
    base = ethanol(9)
    first = base + Atoms("O", positions=[[20.0, 0.0, 0.0]])
    second = base + Atoms("O", positions=[[0.0, -25.0, 7.0]])
    near = base + Atoms("O", positions=[[base.positions[0, 0] + model.config.r_max * 0.9, base.positions[0, 1], base.positions[0, 2]]])
    out1, out2, out3 = ({k: v.detach() for k, v in evaluate(model, atoms).items()} for atoms in (first, second, near))
    n = len(base)
    assert torch.equal(out1["atomic_energy"][:n], out2["atomic_energy"][:n])
    assert torch.equal(out1["forces"][:n], out2["forces"][:n])
    assert float(out1["forces"][n].abs().max()) == 0.0
    # Inside the cutoff the same atom does change its neighbours: the test can fail.
    assert float((out3["atomic_energy"][:n] - out1["atomic_energy"][:n]).abs().max()) > 1e-8


def test_edge_order_does_not_matter():
    model = reference(seed=5)
    graph = af.AtomicGraph.from_ase([periodic_cho(1), ethanol(2)], r_max=model.config.r_max)
    expected = model(graph)
    order = torch.randperm(graph.num_edges, generator=torch.Generator().manual_seed(0))
    shuffled = af.AtomicGraph(**{**graph.__dict__, "edge_index": graph.edge_index[:, order], "edge_shift": graph.edge_shift[order]})
    out = model(shuffled)
    for key in ("energy", "forces", "stress"):
        assert_close(out[key], expected[key], f"{key} with shuffled edges", F64)


def test_float32_agrees_with_float64(structures):
    model64 = reference(seed=6)
    model32 = reference(seed=6, dtype=torch.float32)
    model32.load_state_dict(model64.state_dict())
    graph = af.AtomicGraph.from_ase(structures, r_max=model64.config.r_max)
    out64, out32 = model64(graph), model32(graph)
    assert out32["energy"].dtype == torch.float64 and out32["forces"].dtype == torch.float32
    for key in ("energy", "forces", "stress"):
        assert_close(out32[key], out64[key], f"float32 {key}", TOLERANCE[torch.float32])


def test_float32_float64_round_trip_keeps_constants_exact():
    model = reference(seed=7)
    atoms = periodic_cho(3)
    before = evaluate(model, atoms)["energy"]
    after = evaluate(model.float().double(), atoms)["energy"]
    # Weights lose float32 precision in the round trip, constants (Clebsch-Gordan) must not: compare with
    # a float64 model that holds the same rounded weights.
    rounded = reference(seed=7)
    parameters = dict(rounded.named_parameters())
    with torch.no_grad():
        for parameter in parameters.values():
            parameter.copy_(parameter.float().double())
    assert_close(after, evaluate(rounded, atoms)["energy"], "energy after float32 round trip", F64)
    assert torch.isfinite(before).all()


def test_isolated_atom_gets_its_species_shift():
    model = reference(seed=8)
    out = {k: v.detach() for k, v in evaluate(model, lonely_and_pair()).items()}
    shift_o = model.config.per_species_energy_shift[2]
    assert float(out["atomic_energy"][0]) == pytest.approx(shift_o, abs=1e-14)
    assert float(out["forces"][0].abs().max()) == 0.0
    assert float(out["forces"][1:].abs().max()) > 0.0


def test_unknown_species_is_named():
    model = reference()
    atoms = ethanol(0)
    atoms.numbers[4] = 29
    with pytest.raises(ValueError, match=r"atom 4 of structure 1 has atomic number 29.*type_names \['H', 'C', 'O'\]"):
        model(af.AtomicGraph.from_ase([ethanol(1), atoms], r_max=model.config.r_max))


def test_outputs_have_documented_shapes(structures):
    model = reference()
    graph = af.AtomicGraph.from_ase(structures, r_max=model.config.r_max)
    out = model(graph)
    assert out["energy"].shape == (len(structures),)
    assert out["atomic_energy"].shape == (graph.num_nodes,)
    assert out["forces"].shape == (graph.num_nodes, 3)
    assert out["stress"].shape == (len(structures), 3, 3)
    # a molecule has no volume: its stress is zero
    assert float(out["stress"][0].detach().abs().max()) == 0.0
