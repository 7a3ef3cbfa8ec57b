"""The channel-wise tensor product of each Allegro layer, described once as data.

Every backend (the e3nn reference, the torch backend, the Triton kernels) builds its layer from the
`LayerTensorProduct` objects returned by `describe_layers`, so the conventions below are decided here
and nowhere else:

- An irrep is a pair (l, p), p = +1 (even) or -1 (odd). With parity the spherical harmonic of degree l
  has parity (-1)^l; without parity (SE(3) model) every irrep is even.
- Input 1 is V^{ij,L-1}: n channels of each irrep in `irreps_in1`. Input 2 is the embedded environment
  A^{i,L}: n channels of each spherical-harmonic irrep l2 = 0..l_max (`irreps_in2`).
- Paths are enumerated in the order (in1 irrep, in2 irrep, l_out ascending) for every
  |l1 - l2| <= l_out <= min(l1 + l2, l_max), p_out = p1 p2. Each path has its own output block
      T_{c, path, m} = sum_{m1, m2} cg[path][m1, m2, m] V_{c, l1, m1} A_{c, l2, m2},
  where cg = sqrt(2 l_out + 1) * wigner_3j(l1, l2, l_out) (e3nn's "uuu" TensorProduct without weights,
  component normalisation, one instruction per output block).
- The scalar paths (l_out, p_out) = (0, +1) feed the latent MLP, in path order.
- Channel mixing (all layers but the last) maps the path blocks to V^{ij,L} with irreps `irreps_out`:
  every irrep some path produces, in e3nn's sorted order ((l, p) ascending, odd before even).
- Feature layout follows e3nn: a tensor of irreps [(l_a, p_a), ...] with n channels each is the
  concatenation over irreps of (n, 2 l_a + 1) blocks, flattened channel-major.

`needed_paths` marks the paths whose output can still reach the energy (the scalar paths of every layer,
and paths feeding irreps that later layers use); backends may skip the others, the function is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import numpy as np
import torch
from e3nn import o3

Irrep = tuple[int, int]


def irrep_name(irrep: Irrep) -> str:
    l, p = irrep
    return f"{l}{'e' if p == 1 else 'o'}"


def irreps_string(irreps: tuple[Irrep, ...], multiplicity: int) -> str:
    """e3nn Irreps string, e.g. '16x0e+16x1o', for n channels of each irrep."""
    return "+".join(f"{multiplicity}x{irrep_name(irrep)}" for irrep in irreps)


def irrep_offsets(irreps: tuple[Irrep, ...], channels: int = 1) -> list[int]:
    """Start of each irrep block (and the total size) for `channels` copies of each irrep."""
    offsets = [0]
    for l, _ in irreps:
        offsets.append(offsets[-1] + channels * (2 * l + 1))
    return offsets


def spherical_harmonic_irreps(l_max: int, parity: bool) -> tuple[Irrep, ...]:
    return tuple((l, (-1) ** l if parity else 1) for l in range(l_max + 1))


def _sort_irreps(irreps: set[Irrep]) -> tuple[Irrep, ...]:
    # e3nn's order: by l, then odd (-1) before even (+1).
    return tuple(sorted(irreps))


@dataclasses.dataclass(frozen=True)
class TensorPath:
    """One output block of the channel-wise tensor product."""

    index: int
    in1: int  # position in irreps_in1
    in2: int  # position in irreps_in2 (equals l2)
    l1: int
    p1: int
    l2: int
    p2: int
    l_out: int
    p_out: int

    @property
    def irrep_out(self) -> Irrep:
        return (self.l_out, self.p_out)

    @property
    def is_scalar(self) -> bool:
        return self.irrep_out == (0, 1)


@dataclasses.dataclass(frozen=True)
class LayerTensorProduct:
    """The tensor product (and channel mixing) of one Allegro layer; see the module docstring."""

    num_channels: int
    l_max: int
    irreps_in1: tuple[Irrep, ...]
    irreps_in2: tuple[Irrep, ...]
    paths: tuple[TensorPath, ...]
    irreps_out: tuple[Irrep, ...]  # after channel mixing; () in the last layer
    needed_paths: tuple[int, ...]

    @property
    def is_last(self) -> bool:
        return len(self.irreps_out) == 0

    @property
    def scalar_paths(self) -> tuple[int, ...]:
        return tuple(path.index for path in self.paths if path.is_scalar)

    @property
    def num_scalar_features(self) -> int:
        """Width of the scalar output block that goes to the latent MLP."""
        return self.num_channels * len(self.scalar_paths)

    def paths_into(self, irrep: Irrep) -> tuple[int, ...]:
        return tuple(path.index for path in self.paths if path.irrep_out == irrep)

    @cached_property
    def clebsch_gordan(self) -> tuple[np.ndarray, ...]:
        """Per path, the dense float64 array sqrt(2 l_out + 1) * wigner_3j, shape (2l1+1, 2l2+1, 2l_out+1)."""
        blocks = []
        for path in self.paths:
            w3j = o3.wigner_3j(path.l1, path.l2, path.l_out, dtype=torch.float64).numpy()
            blocks.append(math.sqrt(2 * path.l_out + 1) * w3j)
        return tuple(blocks)

    def nonzeros(self, path_index: int, threshold: float = 1e-12) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The nonzero structure of one path: arrays (m1, m2, m_out, value), m indices from 0."""
        cg = self.clebsch_gordan[path_index]
        m1, m2, m_out = np.nonzero(np.abs(cg) > threshold)
        return m1, m2, m_out, cg[m1, m2, m_out]

    @property
    def path_irreps(self) -> tuple[Irrep, ...]:
        return tuple(path.irrep_out for path in self.paths)

    def flop(self, num_edges: int) -> int:
        """Multiply-adds of the contraction over all paths (nonzeros only), counted as 2 FLOPs each."""
        nonzero = sum(len(self.nonzeros(path.index)[0]) for path in self.paths)
        return 2 * nonzero * self.num_channels * num_edges

    def __call__(self, features1: np.ndarray, features2: np.ndarray) -> np.ndarray:
        """Numpy reference: (E, n*dim(in1)), (E, n*dim(in2)) -> (E, n*sum of path dims), all path blocks."""
        n = self.num_channels
        offsets1 = irrep_offsets(self.irreps_in1, n)
        offsets2 = irrep_offsets(self.irreps_in2, n)
        blocks = []
        for path in self.paths:
            v = features1[:, offsets1[path.in1]:offsets1[path.in1 + 1]].reshape(-1, n, 2 * path.l1 + 1)
            a = features2[:, offsets2[path.in2]:offsets2[path.in2 + 1]].reshape(-1, n, 2 * path.l2 + 1)
            out = np.einsum("ijk,eci,ecj->eck", self.clebsch_gordan[path.index], v, a)
            blocks.append(out.reshape(len(features1), -1))
        return np.concatenate(blocks, axis=1)


def _enumerate_paths(irreps_in1: tuple[Irrep, ...], irreps_in2: tuple[Irrep, ...], l_max: int) -> tuple[TensorPath, ...]:
    paths = []
    for in1, (l1, p1) in enumerate(irreps_in1):
        for in2, (l2, p2) in enumerate(irreps_in2):
            for l_out in range(abs(l1 - l2), min(l1 + l2, l_max) + 1):
                paths.append(TensorPath(len(paths), in1, in2, l1, p1, l2, p2, l_out, p1 * p2))
    return tuple(paths)


def describe_layers(num_layers: int, l_max: int, parity: bool, num_channels: int) -> tuple[LayerTensorProduct, ...]:
    """The tensor products of all layers of a model (layer 1 first)."""
    sh_irreps = spherical_harmonic_irreps(l_max, parity)
    irreps_in1 = sh_irreps  # V^{ij,0} has n channels of each spherical-harmonic irrep
    raw = []
    for layer in range(num_layers):
        paths = _enumerate_paths(irreps_in1, sh_irreps, l_max)
        is_last = layer == num_layers - 1
        irreps_out = () if is_last else _sort_irreps({path.irrep_out for path in paths})
        raw.append((irreps_in1, paths, irreps_out))
        irreps_in1 = irreps_out

    # Walk backwards: which irreps of V^{L-1} does layer L use to reach the energy?
    layers = []
    needed_in_next: set[Irrep] = set()
    for irreps_in1, paths, irreps_out in reversed(raw):
        needed = tuple(path.index for path in paths if path.is_scalar or path.irrep_out in needed_in_next)
        layers.append(LayerTensorProduct(num_channels, l_max, irreps_in1, sh_irreps, paths, irreps_out, needed))
        needed_in_next = {irreps_in1[paths[index].in1] for index in needed}
    return tuple(reversed(layers))
