"""Config validation, presets, and dataset statistics (avg_num_neighbors, shifts, scale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

import allegro_fast as af
from allegro_fast.statistics import fit_statistics

from conftest import ethanol, periodic_cho, requires_data, SHARED_DATA


def test_defaults_follow_design():
    config = af.AllegroConfig(type_names=["Ag"])
    assert (config.num_layers, config.l_max, config.num_scalar_features, config.num_tensor_features) == (2, 2, 64, 16)
    assert (config.r_max, config.num_bessels, config.polynomial_p, config.parity) == (5.0, 8, 6, True)
    assert config.type_names == ("Ag",)


@pytest.mark.parametrize("preset", sorted(af.PRESETS))
def test_presets_build_models(preset):
    config = af.AllegroConfig.preset(preset, ["H", "C", "O"])
    if preset == "rmd17":
        assert (config.num_layers, config.l_max, config.num_tensor_features) == (3, 3, 128)
        return  # large: building it takes long on CPU; the shapes are covered by the other presets
    model = af.Allegro(config)
    out = model(af.AtomicGraph.from_ase(ethanol(), r_max=config.r_max))
    assert torch.isfinite(out["forces"]).all()


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match="unknown key 'num_layer'; did you mean 'num_layers'"):
        af.AllegroConfig.from_dict({"type_names": ["H"], "num_layer": 3})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("l_max", 4, "l_max must be 1, 2 or 3"),
        ("r_max", -1.0, "r_max must be a positive"),
        ("num_tensor_features", 0, "num_tensor_features must be a positive integer"),
        ("type_names", ["H", "Xx"], "type name 'Xx' is not a chemical symbol"),
        ("type_names", ["H", "H"], "duplicates"),
        ("per_species_energy_shift", [1.0, 2.0], "has 2 entries but there are 1"),
    ],
)
def test_invalid_values_are_named(field, value, message):
    values = {"type_names": ["H"], field: value}
    with pytest.raises(ValueError, match=message):
        af.AllegroConfig.from_dict(values)


def test_round_trip_through_dict():
    config = af.AllegroConfig.preset("speed", ["Ag"], avg_num_neighbors=11.5)
    assert af.AllegroConfig.from_dict(config.to_dict()) == config


def labelled(atoms: Atoms, energy: float, forces: np.ndarray) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def test_statistics_recover_known_shifts_and_counts():
    config = af.AllegroConfig(type_names=["H", "C", "O"], r_max=3.3)
    true_shift = {1: -13.6, 6: -1029.0, 8: -2041.0}
    rng = np.random.default_rng(0)
    frames = []
    for k in range(9):
        atoms = periodic_cho(k) if k % 2 else ethanol(k)
        atoms = atoms[rng.permutation(len(atoms))[: 5 + k % 3]]  # vary compositions
        energy = sum(true_shift[z] for z in atoms.numbers)
        frames.append(labelled(atoms, energy, rng.normal(scale=0.7, size=(len(atoms), 3))))
    stats = fit_statistics(frames, config)
    np.testing.assert_allclose(stats.per_species_energy_shift, [true_shift[z] for z in config.atomic_numbers], atol=1e-8)
    graph = af.AtomicGraph.from_ase(frames, r_max=config.r_max)
    assert stats.avg_num_neighbors == pytest.approx(graph.num_edges / graph.num_nodes)
    all_forces = np.concatenate([f.get_forces() for f in frames])
    assert stats.force_rms == pytest.approx(np.sqrt(np.mean(all_forces**2)))
    applied = stats.apply(config)
    assert applied.per_species_energy_scale == (stats.force_rms,) * 3


def test_statistics_errors_name_the_structure():
    config = af.AllegroConfig(type_names=["H", "C"], r_max=3.0)
    with pytest.raises(ValueError, match="structure 0 has no energy"):
        fit_statistics([ethanol()], config)
    frame = labelled(ethanol(), -1.0, np.zeros((9, 3)))
    with pytest.raises(ValueError, match="atom 2 of structure 0 is O"):
        fit_statistics([frame], config)


@requires_data("rmd17", "rmd17_aspirin_train_01.npz")
def test_statistics_on_rmd17_aspirin():
    data = np.load(SHARED_DATA / "rmd17" / "rmd17_aspirin_train_01.npz")
    kcal_to_ev = 0.0433641
    frames = [
        labelled(Atoms(numbers=data["nuclear_charges"], positions=data["coords"][k]),
                 float(data["energies"][k]) * kcal_to_ev, data["forces"][k] * kcal_to_ev)
        for k in range(0, 1000, 50)
    ]
    config = af.AllegroConfig(type_names=["H", "C", "O"], r_max=5.0)
    stats = fit_statistics(frames, config)
    assert 12.0 < stats.avg_num_neighbors < 20.0  # a 21-atom molecule: most atoms see most others
    assert 0.3 < stats.force_rms < 3.0  # eV/Å, typical of rMD17 at 500 K
    per_atom = sum(stats.per_species_energy_shift[i] * c for i, c in enumerate([8, 9, 4])) / 21
    assert per_atom == pytest.approx(np.mean([f.get_potential_energy() for f in frames]) / 21, rel=1e-6)
