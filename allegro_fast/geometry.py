"""Edge geometry of the torch backend: lengths, Bessel basis, envelope and spherical harmonics in few ops.

Same functions as `radial` and e3nn's component-normalised `spherical_harmonics` (DESIGN section 1, items 1
and 2), written for the CPU's per-op costs: on a few thousand edges an elementwise op costs microseconds when
it runs over one contiguous (E,) vector, but a hundred or more when its innermost axis has 3 to 9 entries
((E, 3) norms, (E, 3, 1) * (E, 1, 3) outer products, (E, 1) broadcasts). So every per-edge quantity here is
a contiguous (E,) vector or a component-major (k, E) matrix, and the results are transposed once at the end.
Autograd differentiates these ops (force training differentiates them twice), so fewer ops also means a
shorter backward and double backward.

Y_l is a homogeneous polynomial of degree l in the unit vector u; `harmonic_polynomials` fits its monomial
coefficients to e3nn's own `spherical_harmonics` (an exact linear solve in float64), and the Triton kernels
are generated from the same coefficients.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from .radial import envelope_coefficients


def monomials(degree: int) -> list[tuple[int, int, int]]:
    """Exponents (a, b, c) of the monomials x^a y^b z^c of one degree, in a fixed order."""
    return [(a, b, degree - a - b) for a in range(degree, -1, -1) for b in range(degree - a, -1, -1)]


@cache
def harmonic_polynomials(l_max: int) -> tuple[tuple[tuple[tuple[int, int, int], float], ...], ...]:
    """Per spherical-harmonic column (l, m), its monomials x^a y^b z^c of the unit vector with coefficients."""
    from e3nn.o3 import spherical_harmonics

    rng = np.random.default_rng(0)
    points = rng.normal(size=(64, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    columns = []
    for l in range(l_max + 1):
        values = spherical_harmonics(l, torch.as_tensor(points), normalize=True, normalization="component").numpy()
        exponents = monomials(l)
        design = np.stack([points[:, 0] ** a * points[:, 1] ** b * points[:, 2] ** c for a, b, c in exponents], 1)
        coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
        assert np.abs(design @ coefficients - values).max() < 1e-12, "spherical-harmonic fit failed"
        for m in range(2 * l + 1):
            columns.append(tuple((mono, float(c)) for mono, c in zip(exponents, coefficients[:, m]) if abs(c) > 1e-12))
    return tuple(columns)


@cache
def harmonic_matrix(l_max: int) -> np.ndarray:
    """Coefficients ((l_max+1)^2 - 1, 3 + 9 + ... + 3^l_max) of the columns l >= 1 (Y_00 = 1) over all ordered
    products u_a u_b ... of 1..l_max unit-vector components (the order `spherical_harmonics_of_units` stacks
    them in); each monomial's coefficient goes to its first product."""
    products = [[(a,) for a in range(3)]]
    for _ in range(2, l_max + 1):
        products.append([factors + (a,) for factors in products[-1] for a in range(3)])
    flat = [factors for degree in products for factors in degree]
    column_of = {}
    for index, factors in enumerate(flat):
        column_of.setdefault(tuple(factors.count(axis) for axis in range(3)), index)
    columns = harmonic_polynomials(l_max)[1:]
    matrix = np.zeros((len(columns), len(flat)))
    for row, column in enumerate(columns):
        for powers, coefficient in column:
            matrix[row, column_of[powers]] = coefficient
    return matrix


def spherical_harmonics_of_units(units: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Component-major harmonics ((l_max+1)^2, E) of component-major unit vectors (3, E), with `coefficients`
    the tensor of `harmonic_matrix(l_max)`: the products of degree d are one broadcast multiply of those of
    degree d-1 with u, (3^(d-1), 1, E) * (1, 3, E), and the harmonics one matmul of all of them."""
    ones = torch.ones_like(units[:1])
    l_max = math.isqrt(coefficients.shape[0] + 1) - 1
    if l_max == 0:
        return ones
    degrees = [units]
    for _ in range(2, l_max + 1):
        degrees.append((degrees[-1].unsqueeze(1) * units.unsqueeze(0)).flatten(0, 1))
    return torch.cat([ones, coefficients @ torch.cat(degrees)])


def edge_geometry(vectors: torch.Tensor, frequencies: torch.Tensor, r_max: float, p: int,
                  harmonic_coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, 3) edge vectors -> Bessel basis (E, N_b), envelope (E, 1), harmonics (E, (l_max+1)^2).

    `harmonic_coefficients` is `harmonic_matrix(l_max)` as a tensor of the vectors' dtype and device (a model
    keeps it as a buffer, so that compiled and exported programs see a constant).

    The Bessel basis comes transposed, a (E, N_b) view of a (N_b, E) tensor (a matmul reads it as is); the
    harmonics are contiguous. The envelope is zero from r_max on (edges of a list built with a skin)."""
    columns = vectors.t().contiguous()  # (3, E); a no-op for `AtomicGraph.edge_vectors`, a transposed view
    lengths = (columns * columns).sum(0).sqrt()
    inverse = lengths.reciprocal()
    harmonics = spherical_harmonics_of_units(columns * inverse, harmonic_coefficients).t().contiguous()

    # B_b = sqrt(2 / r_c) sin(w_b r / r_c) / r, component-major (N_b, E).
    scaled = (lengths * (1.0 / r_max)).unsqueeze(0)
    bessel = torch.sin(frequencies.unsqueeze(1) * scaled) * (inverse * math.sqrt(2.0 / r_max)).unsqueeze(0)

    # u(s) = 1 - a s^p + b s^(p+1) - c s^(p+2), Horner form in s = r / r_c.
    a, b, c = envelope_coefficients(p)
    s = scaled.squeeze(0)
    envelope = (1.0 - s.pow(p) * (a - s * (b - c * s))).masked_fill(s >= 1.0, 0.0)
    return bessel.t(), envelope.unsqueeze(1), harmonics
