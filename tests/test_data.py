"""Reading labelled frames (extxyz, rMD17 npz), units, bad input, splits and batches."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import SHARED_DATA, diamond, ethanol, periodic_cho, requires_data

import allegro_fast as af
from allegro_fast.data import (
    DataError,
    LabelledDataset,
    collate,
    read_frames,
    species_of,
    split_frames,
)
from allegro_fast.evaluation import evaluate

KCAL_PER_MOL_IN_EV = 0.0433641


def labelled(atoms: Atoms, seed: int, stress: bool = False) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    results = {"energy": float(rng.normal()), "forces": rng.normal(size=(len(atoms), 3))}
    if stress:
        results["stress"] = rng.normal(size=6)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def write_extxyz(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


def test_extxyz_labels_and_length_units(tmp_path):
    frames = [labelled(ethanol(1), 1), labelled(periodic_cho(2), 2, stress=True), labelled(diamond(3), 3, stress=True)]
    path = write_extxyz(tmp_path / "frames.extxyz", frames)
    read = read_frames(path)
    assert len(read) == 3
    for original, copy in zip(frames, read):
        assert np.allclose(copy.get_potential_energy(), original.get_potential_energy())
        assert np.allclose(copy.get_forces(), original.get_forces())
        assert np.allclose(copy.positions, original.positions)
    assert np.allclose(read[1].get_stress(), frames[1].get_stress())

    # The same file read as if it were in Bohr and Hartree: lengths, energies, forces and stress converted.
    bohr = read_frames(path, energy_unit="Hartree", length_unit="Bohr")
    hartree, bohr_length = 27.211386, 0.52917721
    assert np.allclose(bohr[2].positions, frames[2].positions * bohr_length)
    assert np.allclose(bohr[2].cell.array, frames[2].cell.array * bohr_length)
    assert np.isclose(bohr[2].get_potential_energy(), frames[2].get_potential_energy() * hartree, rtol=1e-6)
    assert np.allclose(bohr[2].get_forces(), frames[2].get_forces() * hartree / bohr_length, rtol=1e-6)
    assert np.allclose(bohr[2].get_stress(), frames[2].get_stress() * hartree / bohr_length**3, rtol=1e-6)


def test_npz_in_kcal_per_mol(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "molecule.npz"
    coords = rng.normal(size=(4, 5, 3)) * 2
    np.savez(path, nuclear_charges=np.array([6, 1, 1, 1, 8], dtype=np.uint8), coords=coords,
             energies=rng.normal(size=4) * 100, forces=rng.normal(size=(4, 5, 3)))
    frames = read_frames(path, energy_unit="kcal/mol")
    data = np.load(path)
    assert frames[0].get_chemical_symbols() == ["C", "H", "H", "H", "O"]
    assert np.allclose(frames[2].positions, coords[2])
    assert np.isclose(frames[3].get_potential_energy(), data["energies"][3] * KCAL_PER_MOL_IN_EV, rtol=1e-6)
    assert np.allclose(frames[1].get_forces(), data["forces"][1] * KCAL_PER_MOL_IN_EV, rtol=1e-6)
    assert species_of(frames) == ["H", "C", "O"]


@requires_data("rmd17", "rmd17_ethanol_test_01.npz")
def test_rmd17_file():
    frames = read_frames(SHARED_DATA / "rmd17" / "rmd17_ethanol_test_01.npz", energy_unit="kcal/mol")
    assert len(frames) == 1000 and len(frames[0]) == 9
    # rMD17 ethanol energies are about -97,000 kcal/mol
    assert -4300 < frames[0].get_potential_energy() < -4100


def test_truncated_extxyz_names_file_and_frame(tmp_path):
    frames = [labelled(ethanol(k), k) for k in range(3)]
    path = write_extxyz(tmp_path / "full.extxyz", frames)
    lines = path.read_text().splitlines()
    truncated = tmp_path / "truncated.extxyz"
    truncated.write_text("\n".join(lines[: 2 * (len(frames[0]) + 2) + 5]) + "\n")  # frame 2 cut after 3 atoms
    with pytest.raises(DataError, match=r"truncated.extxyz, frame 2: cannot read the frame"):
        read_frames(truncated)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("3\nenergy=1.0 Properties=species:S:1:pos:R:3\nC 0 0 zero\nH 1 0 0\nH 0 1 0\n")
    with pytest.raises(DataError, match=r"garbage.extxyz, frame 0"):
        read_frames(garbage)


def test_missing_labels_name_frame_and_field(tmp_path):
    good, no_energy, no_forces = labelled(ethanol(1), 1), ethanol(2), ethanol(3)
    no_energy.arrays["forces"] = np.ones((len(no_energy), 3))
    no_forces.info["energy"] = -1.0
    path = write_extxyz(tmp_path / "a.extxyz", [good, no_energy])
    with pytest.raises(DataError, match=r"a.extxyz, frame 1: field 'energy' is missing"):
        read_frames(path)
    path = write_extxyz(tmp_path / "b.extxyz", [good, good, no_forces])
    with pytest.raises(DataError, match=r"b.extxyz, frame 2: field 'forces' is missing"):
        read_frames(path)
    # a custom energy key that a frame lacks
    path = write_extxyz(tmp_path / "c.extxyz", [good])
    with pytest.raises(DataError, match=r"c.extxyz, frame 0: field 'energy' is missing"):
        read_frames(path, energy_key="REF_energy")
    nan_forces = labelled(ethanol(4), 4)
    nan_forces.calc.results["forces"][3, 1] = np.nan
    path = write_extxyz(tmp_path / "d.extxyz", [good, nan_forces])
    with pytest.raises(DataError, match=r"d.extxyz, frame 1: field 'forces' is not finite on atom 3"):
        read_frames(path)


def test_bad_npz_names_the_field(tmp_path):
    rng = np.random.default_rng(1)
    good = {"nuclear_charges": np.array([1, 8, 1]), "coords": rng.normal(size=(2, 3, 3)),
            "energies": rng.normal(size=2), "forces": rng.normal(size=(2, 3, 3))}
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in good.items() if k != "forces"})
    with pytest.raises(DataError, match=r"missing.npz: field 'forces' is missing"):
        read_frames(tmp_path / "missing.npz")
    np.savez(tmp_path / "shape.npz", **{**good, "energies": rng.normal(size=3)})
    with pytest.raises(DataError, match=r"shape.npz: field 'energies' must have shape \(2,\)"):
        read_frames(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", **{**good, "energies": np.array([1.0, np.nan])})
    with pytest.raises(DataError, match=r"nan.npz, frame 1: field 'energy' is not finite"):
        read_frames(tmp_path / "nan.npz")
    (tmp_path / "broken.npz").write_bytes((tmp_path / "shape.npz").read_bytes()[:200])
    with pytest.raises(DataError, match=r"broken.npz"):
        read_frames(tmp_path / "broken.npz")
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "nowhere.npz")


def test_species_not_in_model_at_evaluation(tmp_path):
    model = af.Allegro(af.AllegroConfig(type_names=["H", "C"], r_max=3.0, num_layers=1, l_max=1,
                                        num_scalar_features=8, num_tensor_features=4))
    path = write_extxyz(tmp_path / "cho.extxyz", [labelled(Atoms("CH4", positions=np.eye(5, 3) * 1.1), 0),
                                                  labelled(ethanol(1), 1)])
    with pytest.raises(DataError, match=r"cho.extxyz, frame 1: species \['O'\] not in the model's type_names"):
        evaluate(model, path)


def test_splits_by_count_and_fraction_are_seeded_and_disjoint():
    frames = [labelled(ethanol(k), k) for k in range(20)]
    split = split_frames(frames, 10, 0.25, n_test=None, seed=4)
    assert (len(split.train), len(split.validation), len(split.test)) == (10, 5, 5)
    ids = [id(f) for part in (split.train, split.validation, split.test) for f in part]
    assert len(set(ids)) == 20
    again = split_frames(frames, 10, 0.25, n_test=None, seed=4)
    assert [id(f) for f in again.train] == [id(f) for f in split.train]
    assert [id(f) for f in split_frames(frames, 10, 5, seed=5).train] != [id(f) for f in split.train]
    with pytest.raises(DataError, match="has 20 frames, fewer than n_train 18 \\+ n_val 5"):
        split_frames(frames, 18, 5)


def test_batches_of_different_sizes_equal_a_graph_of_the_whole_batch():
    frames = [labelled(ethanol(1), 1), labelled(periodic_cho(2), 2, stress=True), labelled(diamond(3), 3)]
    dataset = LabelledDataset(frames, r_max=3.3, dtype=torch.float64)
    batch = dataset.batch([2, 0, 1])
    direct = af.AtomicGraph.from_ase([frames[2], frames[0], frames[1]], r_max=3.3)
    for field in ("positions", "atomic_numbers", "edge_index", "edge_shift", "cell", "pbc", "batch", "num_atoms",
                  "center_ptr"):
        assert torch.equal(getattr(batch.graph, field), getattr(direct, field)), field
    assert torch.allclose(batch.energy, torch.tensor([f.get_potential_energy() for f in (frames[2], frames[0], frames[1])],
                                                     dtype=torch.float64))
    assert batch.has_stress.tolist() == [False, False, True]
    voigt = frames[1].get_stress()
    assert torch.allclose(batch.stress[2], torch.tensor([[voigt[0], voigt[5], voigt[4]], [voigt[5], voigt[1], voigt[3]],
                                                         [voigt[4], voigt[3], voigt[2]]], dtype=torch.float64))
    assert collate([dataset.graphs[1]]) is dataset.graphs[1]
    assert [b.num_structures for b in dataset.batches(2)] == [2, 1]
