"""Radial functions of DESIGN section 1, item 1: the Bessel basis and the polynomial envelope.

    B_b(r) = sqrt(2 / r_c) * sin(w_b r / r_c) / r,   w_b = b * pi (b = 1..N_b, optionally trainable)
    u(r)   = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)   for x = r / r_c < 1, else 0

u is 1 at r = 0 and goes to zero at r_c with its first p derivatives, so energies and forces are smooth
when an atom crosses the cutoff.
"""

from __future__ import annotations

import math

import torch


def bessel_basis(lengths: torch.Tensor, frequencies: torch.Tensor, r_max: float) -> torch.Tensor:
    """(E,) edge lengths, (N_b,) frequencies w_b -> (E, N_b) Bessel basis values."""
    scaled = lengths.unsqueeze(-1) / r_max
    return math.sqrt(2.0 / r_max) * torch.sin(frequencies * scaled) / lengths.unsqueeze(-1)


def envelope_coefficients(p: int) -> tuple[float, float, float]:
    """(a, b, c) of the envelope u(s) = 1 - a s^p + b s^(p+1) - c s^(p+2)."""
    return (p + 1.0) * (p + 2.0) / 2.0, p * (p + 2.0), p * (p + 1.0) / 2.0


def polynomial_envelope(lengths: torch.Tensor, r_max: float, p: int) -> torch.Tensor:
    """(E,) edge lengths -> (E,) smooth cutoff u(r), exactly zero at and beyond r_max."""
    x = lengths / r_max
    a, b, c = envelope_coefficients(p)
    envelope = 1.0 - a * x.pow(p) + b * x.pow(p + 1) - c * x.pow(p + 2)
    return torch.where(x < 1.0, envelope, torch.zeros_like(envelope))


def initial_bessel_frequencies(num_bessels: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return math.pi * torch.arange(1, num_bessels + 1, dtype=dtype or torch.get_default_dtype())
