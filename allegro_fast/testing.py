"""Checks that ship with the library, so users can verify their own models.

`assert_equivariant(model, atoms)` transforms structures by random rotations, reflections (E(3) models
only), translations and permutations of the atoms, and asserts that the energy is invariant and forces
and stress transform as vectors and rank-2 tensors. Tolerances are stated once, per dtype, in TOLERANCE:
the relative error max|a - b| / max|b| (the absolute error scaled to the magnitude of the values).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from .graph import AtomicGraph

TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute error where expected is all zero)."""
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    expected = torch.as_tensor(expected).detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    return error / scale if scale > 0 else error


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float) -> float:
    error = relative_error(actual, expected)
    if not error <= tolerance:  # also catches NaN
        raise AssertionError(f"{what}: relative error {error:.3e} exceeds tolerance {tolerance:.1e}")
    return error


def random_orthogonal(rng: np.random.Generator, reflect: bool) -> np.ndarray:
    """A uniformly random rotation (det +1), or rotation times inversion (det -1) when reflect is True."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return -q if reflect else q


def _transformed(atoms: Atoms, matrix: np.ndarray, translation: np.ndarray, permutation: np.ndarray) -> Atoms:
    moved = atoms[permutation]
    moved.positions = moved.positions @ matrix.T + translation
    moved.cell = np.asarray(atoms.cell) @ matrix.T
    return moved


def assert_equivariant(
    model: Callable[[AtomicGraph], dict[str, torch.Tensor]],
    atoms: Atoms | Sequence[Atoms],
    r_max: float | None = None,
    trials: int = 3,
    seed: int = 0,
    reflections: bool | None = None,
    tolerance: float | None = None,
) -> dict[str, float]:
    """Assert E(3)/SE(3) equivariance and permutation symmetry of a model on the given structures.

    model maps an AtomicGraph to a dict with "energy" and optionally "forces" and "stress" (an Allegro
    model or anything with the same call). r_max defaults to model.config.r_max. Reflections are tested
    when the model has parity (model.config.parity), or when reflections=True. Returns the largest
    relative error seen for each output; raises AssertionError naming the output and transformation.
    """
    structures = [atoms] if isinstance(atoms, Atoms) else list(atoms)
    config = getattr(model, "config", None)
    r_max = r_max if r_max is not None else config.r_max
    if reflections is None:
        reflections = bool(getattr(config, "parity", False))
    dtype = getattr(model, "dtype", torch.get_default_dtype())
    tolerance = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-5)
    rng = np.random.default_rng(seed)

    def evaluate(batch: list[Atoms]) -> dict[str, torch.Tensor]:
        out = model(AtomicGraph.from_ase(batch, r_max=r_max))
        return {key: value.detach() for key, value in out.items() if key in ("energy", "forces", "stress")}

    reference = evaluate(structures)
    worst: dict[str, float] = {}
    for trial in range(trials):
        reflect = reflections and trial % 2 == 1
        matrix = random_orthogonal(rng, reflect)
        translation = rng.normal(scale=3.0, size=3)
        permutations = [rng.permutation(len(a)) for a in structures]
        moved = [_transformed(a, matrix, translation, p) for a, p in zip(structures, permutations)]
        out = evaluate(moved)
        name = f"{'reflection' if reflect else 'rotation'} + translation + permutation (trial {trial})"
        rotation = torch.as_tensor(matrix, dtype=torch.float64)
        checks = {"energy": (out["energy"], reference["energy"])}
        if "forces" in reference:
            offsets = np.cumsum([0] + [len(a) for a in structures])[:-1]
            order = torch.as_tensor(np.concatenate([p + o for p, o in zip(permutations, offsets)]))
            checks["forces"] = (out["forces"], reference["forces"][order].double() @ rotation.T)
        if "stress" in reference:
            checks["stress"] = (out["stress"], rotation @ reference["stress"].double() @ rotation.T)
        for key, (actual, expected) in checks.items():
            error = assert_close(actual, expected, f"{key} under {name}", tolerance)
            worst[key] = max(worst.get(key, 0.0), error)
    return worst
