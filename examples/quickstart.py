"""Quickstart: generate data, train a small Allegro model, run MD with it. Needs no dataset.

1. Labels frames of fcc Ag with a vacancy near its melting point using ASE's EMT potential
   (Langevin MD at 1200 K, one frame every few steps).
2. Fits avg_num_neighbors, per-species shift and scale from the training frames.
3. Trains the torch backend on a per-atom energy + force MSE for a fixed wall-clock budget.
4. Reports test energy and force MAE against EMT, then runs 200 steps of NVE MD with the model
   through the ASE calculator and reports the energy drift.

Run: python examples/quickstart.py [--minutes 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md import velocitydistribution
from ase.md.verlet import VelocityVerlet

import allegro_fast as af
from allegro_fast.calculator import AllegroCalculator
from allegro_fast.statistics import fit_statistics

# ASE >= 3.29 renamed MaxwellBoltzmannDistribution; accept both.
thermalize = getattr(velocitydistribution, "thermalize_momenta", None) or velocitydistribution.MaxwellBoltzmannDistribution


def generate_frames(count: int, seed: int) -> list:
    atoms = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2))
    del atoms[0]  # a vacancy
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature_K=1200, rng=rng)
    dynamics = Langevin(atoms, 4 * units.fs, temperature_K=1200, friction=0.02, fixcm=False, rng=rng)
    frames = []
    for _ in range(count):
        dynamics.run(5)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames


def labels(frames: list) -> tuple[torch.Tensor, torch.Tensor]:
    energies = torch.tensor([f.get_potential_energy() for f in frames])
    forces = torch.as_tensor(np.concatenate([f.get_forces() for f in frames]))
    return energies, forces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget in minutes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    frames = generate_frames(120, args.seed)
    train, test = frames[:100], frames[100:]
    print(f"generated {len(frames)} EMT frames of {len(frames[0])}-atom Ag with a vacancy in {time.perf_counter() - t0:.1f} s")

    config = af.AllegroConfig(type_names=["Ag"], r_max=4.5, num_scalar_features=32, num_tensor_features=8,
                              two_body_mlp_hidden=(32,), latent_mlp_hidden=(32,), readout_mlp_hidden=(16,))
    config = fit_statistics(train, config).apply(config)
    print(f"statistics: avg_num_neighbors {config.avg_num_neighbors:.2f}, shift {config.per_species_energy_shift[0]:.4f} eV, "
          f"scale {config.per_species_energy_scale[0]:.4f} eV/Å")
    model = af.Allegro(config, backend="torch")
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch_size = 5
    graphs = [af.AtomicGraph.from_ase(train[k:k + batch_size], r_max=config.r_max, dtype=torch.float32)
              for k in range(0, len(train), batch_size)]
    targets = [labels(train[k:k + batch_size]) for k in range(0, len(train), batch_size)]

    deadline = time.perf_counter() + 60 * args.minutes
    epoch = 0
    while time.perf_counter() < deadline:
        epoch += 1
        total = 0.0
        for graph, (energy, forces) in zip(graphs, targets):
            out = model.train()(graph, compute_stress=False)
            natoms = graph.num_atoms.to(out["energy"].dtype)
            loss = ((out["energy"] - energy.float()) / natoms).pow(2).mean() + (out["forces"] - forces.float()).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"epoch {epoch:3d}  loss {total / len(graphs):.5f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    model.eval()
    test_graph = af.AtomicGraph.from_ase(test, r_max=config.r_max, dtype=torch.float32)
    out = {key: value.detach() for key, value in model(test_graph, compute_stress=False).items()}
    energy, forces = labels(test)
    energy_mae = float(((out["energy"].double() - energy) / test_graph.num_atoms).abs().mean())
    force_mae = float((out["forces"].double() - forces).abs().mean())
    print(f"test: energy MAE {1000 * energy_mae:.2f} meV/atom, force MAE {1000 * force_mae:.1f} meV/Å")

    atoms = test[-1].copy()
    atoms.calc = AllegroCalculator(model)
    thermalize(atoms, temperature_K=600, rng=np.random.default_rng(args.seed))
    dynamics = VelocityVerlet(atoms, 2 * units.fs)
    start = atoms.get_total_energy()
    t_md = time.perf_counter()
    dynamics.run(200)
    elapsed = time.perf_counter() - t_md
    drift = (atoms.get_total_energy() - start) / len(atoms)
    ns_per_day = 200 * 2e-6 / (elapsed / 86400)
    print(f"NVE MD: 200 steps of 2 fs in {elapsed:.1f} s ({ns_per_day:.2f} ns/day), "
          f"energy drift {1000 * drift:.3f} meV/atom over 0.4 ps")


if __name__ == "__main__":
    main()
