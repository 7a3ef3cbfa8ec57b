"""run_md: energy conservation, every ensemble, thermostat temperature, trajectories, bad input."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk

import allegro_fast as af
from allegro_fast.calculator import AllegroCalculator
from allegro_fast.md import ENSEMBLES, MDResult, run_md


def silver_with_vacancy():
    """The demo's structure: 2 x 2 x 2 cubic fcc Ag (31 atoms after removing one)."""
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2))
    del atoms[0]
    return atoms


def tiny_silver_model(energy_scale: float = 0.3, dtype=torch.float64) -> af.Allegro:
    torch.manual_seed(0)
    config = af.AllegroConfig(
        type_names=["Ag"], r_max=4.5, l_max=1, num_layers=1, num_scalar_features=9, num_tensor_features=3,
        num_bessels=5, two_body_mlp_hidden=(9,), latent_mlp_hidden=(9,), readout_mlp_hidden=(5,),
        avg_num_neighbors=14.0, per_species_energy_scale=(energy_scale,),
    )
    return af.Allegro(config).to(dtype)


def conserved_energy_spread(result: MDResult) -> float:
    """max - min of the conserved energy over the run, meV/atom."""
    energies = np.array([r.conserved_energy for r in result.records]) * 1000.0 / result.num_atoms
    return float(energies.max() - energies.min())


def test_nve_conserves_energy_with_second_order_error():
    model, atoms = tiny_silver_model(), silver_with_vacancy()
    common = {"ensemble": "nve", "temperature_K": 300.0, "log_interval": 2, "progress": False}
    coarse = run_md(model, atoms, timestep_fs=4.0, steps=30, **common)
    fine = run_md(model, atoms, timestep_fs=2.0, steps=60, **common)
    # stated tolerance: over 0.12 ps at 300 K the total energy stays within 0.2 meV/atom
    assert abs(fine.energy_drift_meV_per_atom) < 0.2
    assert conserved_energy_spread(fine) < 0.2
    # velocity Verlet's energy error is O(dt^2): halving dt divides it by about 4 (only if forces = -dE/dr)
    assert conserved_energy_spread(coarse) / conserved_energy_spread(fine) > 3.0
    assert fine.steps == 60 and fine.simulated_ps == pytest.approx(0.12)
    assert fine.ns_per_day > 0 and fine.wall_seconds > 0
    assert [r.step for r in fine.records] == list(range(0, 61, 2))


@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_every_ensemble_runs_and_writes_a_trajectory(tmp_path, ensemble):
    model, atoms = tiny_silver_model(dtype=torch.float32), silver_with_vacancy()
    original = atoms.copy()
    suffix = ".xyz" if ensemble == "nve" else ".traj"
    path = tmp_path / f"md{suffix}"
    result = run_md(model, atoms, ensemble=ensemble, temperature_K=400.0, timestep_fs=2.0, steps=13,
                    trajectory=path, log_interval=5, seed=3, progress=True)
    assert atoms == original and atoms.calc is None  # the caller's atoms are untouched
    assert [r.step for r in result.records] == [0, 5, 10, 13]  # the last step is always recorded
    frames = ase.io.read(path, ":")
    assert len(frames) == 4
    assert frames[-1].get_potential_energy() == pytest.approx(result.records[-1].potential_energy, rel=1e-6)
    np.testing.assert_allclose(frames[-1].positions, result.final_atoms.positions, atol=1e-6)
    assert result.final_atoms.constraints == []
    assert isinstance(result.final_atoms.calc, AllegroCalculator)
    text = result.summary()
    assert "ns/day" in text and ensemble in text and str(path) in text
    if ensemble != "langevin":
        assert abs(result.energy_drift_meV_per_atom) < 0.5


def test_same_seed_same_run():
    model, atoms = tiny_silver_model(), silver_with_vacancy()
    first = run_md(model, atoms, ensemble="langevin", steps=6, seed=7, progress=False)
    second = run_md(model, atoms, ensemble="langevin", steps=6, seed=7, progress=False)
    other = run_md(model, atoms, ensemble="langevin", steps=6, seed=8, progress=False)
    assert np.array_equal(first.final_atoms.positions, second.final_atoms.positions)
    assert not np.array_equal(first.final_atoms.positions, other.final_atoms.positions)


@pytest.mark.slow
def test_langevin_reaches_the_target_temperature():
    # a nearly flat potential (an ideal gas on a lattice) started at rest: only the thermostat can heat it
    model, atoms = tiny_silver_model(energy_scale=1e-3, dtype=torch.float32), silver_with_vacancy()
    result = run_md(model, atoms, ensemble="langevin", temperature_K=500.0, initial_temperature_K=0.0,
                    timestep_fs=4.0, steps=150, friction_per_fs=0.05, log_interval=5, progress=False)
    assert result.records[0].temperature_K == 0.0
    late = [r.temperature_K for r in result.records if r.time_ps > 0.2]  # after 10 friction times
    assert np.mean(late) == pytest.approx(500.0, rel=0.2)


def test_model_from_a_file(tmp_path):
    model = tiny_silver_model()
    af.save(model, tmp_path / "model.pt")
    result = run_md(tmp_path / "model.pt", silver_with_vacancy(), steps=3, progress=False)
    assert result.steps == 3 and len(result.records) == 2


def test_interrupted_run_leaves_a_readable_trajectory(tmp_path, monkeypatch):
    calls = []
    original = AllegroCalculator.calculate

    def interrupt_after_25_calls(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 25:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AllegroCalculator, "calculate", interrupt_after_25_calls)
    for suffix in (".traj", ".xyz"):
        calls.clear()
        path = tmp_path / f"interrupted{suffix}"
        with pytest.raises(KeyboardInterrupt):
            run_md(tiny_silver_model(), silver_with_vacancy(), steps=100, trajectory=path, log_interval=10,
                   progress=False)
        frames = ase.io.read(path, ":")
        assert len(frames) == 3  # steps 0, 10, 20


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"ensemble": "npt"}, "unknown ensemble 'npt'; choose one of \\['nve', 'langevin', 'nose-hoover'\\]"),
        ({"ensemble": "NVE"}, "unknown ensemble 'NVE'"),
        ({"timestep_fs": 0.0}, "timestep_fs must be > 0"),
        ({"steps": -1}, "steps must be an integer >= 0"),
        ({"log_interval": 0}, "log_interval must be an integer >= 1"),
        ({"temperature_K": -5.0}, "temperature_K must be >= 0"),
        ({"ensemble": "langevin", "friction_per_fs": 0.0}, "friction_per_fs must be > 0"),
        ({"ensemble": "nose-hoover", "thermostat_time_fs": -1.0}, "thermostat_time_fs must be > 0"),
        ({"ensemble": "langevin", "temperature_K": 0.0}, "needs temperature_K > 0"),
    ],
)
def test_bad_arguments_are_clear_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        run_md(tiny_silver_model(), silver_with_vacancy(), progress=False, **arguments)


def test_unknown_trajectory_format_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown format; use a .traj"):
        run_md(tiny_silver_model(), silver_with_vacancy(), steps=1, trajectory=tmp_path / "md.pdb", progress=False)
