"""Shared fixtures: small structures with odd sizes, and a model factory.

Tolerances live in one place, `allegro_fast.testing.TOLERANCE` (float64 1e-10, float32 1e-5, relative).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton runs kernels on CPU tensors only under its interpreter, chosen before triton is first imported: on a
# machine without CUDA the kernel tests use it (on a GPU machine they run compiled, on the device).
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from ase import Atoms
from ase.build import bulk, molecule

import allegro_fast as af
from allegro_fast.kernels._common import interpreter_enabled

SHARED_DATA = Path(os.environ.get("ALLEGRO_FAST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


# Where the Triton kernel tests run: the CPU under the interpreter, and CUDA where there is a device.
TRITON_DEVICES = [
    pytest.param("cpu", marks=[pytest.mark.interpreter, pytest.mark.skipif(
        not interpreter_enabled(), reason="CPU kernels need TRITON_INTERPRET=1 before triton is imported")]),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]


def requires_data(*parts: str):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"dataset not found at {path} (set ALLEGRO_FAST_DATA)")


def small_config(**overrides) -> af.AllegroConfig:
    """A small model (odd widths) that runs fast; overrides change any field."""
    values = dict(
        type_names=("H", "C", "O"), r_max=3.3, l_max=2, num_layers=2, num_scalar_features=13,
        num_tensor_features=5, num_bessels=7, two_body_mlp_hidden=(11,), latent_mlp_hidden=(9,),
        readout_mlp_hidden=(7,), avg_num_neighbors=7.3,
        per_species_energy_shift=(-0.7, -2.1, -3.3), per_species_energy_scale=(1.3, 0.9, 1.1),
    )
    values.update(overrides)
    return af.AllegroConfig(**values)


def randomize_edge_scale(model: torch.nn.Module, seed: int = 0) -> None:
    """Per-species-pair scales start at 1; make them non-trivial so tests see their effect."""
    if getattr(model, "edge_species_scale", None) is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            scale = 0.5 + torch.rand(model.edge_species_scale.shape, generator=generator, dtype=torch.float64)
            model.edge_species_scale.copy_(scale.to(model.edge_species_scale.dtype))


def ethanol(seed: int = 0) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def periodic_cho(seed: int = 0) -> Atoms:
    """A small triclinic periodic cell of 7 atoms (C, H, O) with a cell smaller than 2 r_max."""
    rng = np.random.default_rng(seed)
    cell = np.array([[3.1, 0.0, 0.0], [0.7, 2.9, 0.0], [-0.4, 0.5, 3.3]])
    while True:
        fractional = rng.random((7, 3))
        positions = fractional @ cell
        atoms = Atoms("C2H4O", positions=positions, cell=cell, pbc=True)
        if min(atoms.get_all_distances(mic=True)[np.triu_indices(7, 1)]) > 0.9:
            return atoms


def diamond(seed: int = 0) -> Atoms:
    atoms = bulk("C", "diamond", a=3.57)
    atoms.rattle(0.05, seed=seed)
    return atoms


def lonely_and_pair(seed: int = 0) -> Atoms:
    """An isolated atom (no neighbour) and a pair (each atom has exactly one neighbour)."""
    atoms = Atoms("OHC", positions=[[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [11.1, 0.3, 0.0]])
    atoms.rattle(0.02, seed=seed)
    return atoms


@pytest.fixture
def structures() -> list[Atoms]:
    return [ethanol(1), periodic_cho(2), diamond(3), lonely_and_pair()]
