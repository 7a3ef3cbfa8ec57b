"""Pure-PyTorch ops of the fast backend: the compact channel-wise tensor product and channel mixing.

Layouts (internal to this backend; parameters keep the reference's layout):
- Equivariant edge features are (E, n, D): channel c first, then the irrep blocks of `irreps` concatenated
  along the last axis (D = sum of 2l+1). Only the irreps some later computation needs are kept.
- The environment A is (E, n, (l_max+1)^2), spherical-harmonic order.
- Tensor-product outputs are (E, n, P) with the needed paths grouped by output irrep (sorted), so each
  output irrep is one contiguous column block (`irrep_blocks`): scalars and channel-mixing inputs are
  slices, never gathers along an inner axis (slow on CPUs).

The product T = sum_{m1,m2} cg[path] V_{l1} A_{l2} is evaluated for the needed paths only, with a few large
ops (never one per path), in three specialisations:

- `RankOneTensorProduct` (first layer): V^{ij,0}_{c,l1,m1} = w_{c,l1} Y_{l1,m1}(r_ij) has rank one in m,
  so the Clebsch-Gordan contraction with Y is channel-independent and done once per edge:
      M[e, (l2, m2), col] = sum_{m1} cg[m1, m2, col] Y_{l1(col), m1}    (E, (l_max+1)^2, P), one matmul
      T[e, c, col] = w_{c, l1(col)} * (A[e, c, :] @ M[e])                 one batched matmul
- `ScalarPathsProduct` (last layer): only (l, p) x (l, p) -> 0e paths, cg = delta / sqrt(2l + 1), so
      T[e, c, path] = sum_m V[e, c, l m] A[e, c, l m] / sqrt(2l + 1)     one product, one matmul
- `CompactTensorProduct` (middle layers): per l2,
      outer_{l2}[e, c, (a, m2)] = V[e, c, a] * A[e, c, l2, m2]            (E, n, D (2 l2 + 1))
      T += outer_{l2} @ cg_{l2}                                           cg_{l2}: (D (2 l2 + 1), P)

Channel mixing is one batched matmul per output irrep over all its paths and channels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .tensor_product import Irrep, LayerTensorProduct, irrep_offsets


class _GroupedPaths(nn.Module):
    """Column bookkeeping shared by the products: needed paths grouped by output irrep."""

    def __init__(self, description: LayerTensorProduct, needed_paths: tuple[int, ...]) -> None:
        super().__init__()
        self.description = description
        self.path_columns: dict[int, tuple[int, int]] = {}
        self.irrep_blocks: dict[Irrep, tuple[int, int, tuple[int, ...]]] = {}
        column = 0
        for irrep in sorted({description.paths[i].irrep_out for i in needed_paths}):
            paths = tuple(i for i in needed_paths if description.paths[i].irrep_out == irrep)
            start = column
            for index in paths:
                self.path_columns[index] = (column, column + 2 * irrep[0] + 1)
                column += 2 * irrep[0] + 1
            self.irrep_blocks[irrep] = (start, column, paths)
        self.output_dim = column

    def split(self, paths: torch.Tensor) -> dict[Irrep, torch.Tensor]:
        """(E, n, P) -> one (E, n, paths * (2l+1)) block per output irrep (split, whose backward is a cat)."""
        sizes = [stop - start for start, stop, _ in self.irrep_blocks.values()]
        return dict(zip(self.irrep_blocks, paths.split(sizes, dim=2)))

    @staticmethod
    def scalars(blocks: dict[Irrep, torch.Tensor]) -> torch.Tensor:
        """The (0, +1) block as (E, S n), path-major (the reference's latent-MLP input order)."""
        block = blocks[(0, 1)]
        return block.transpose(1, 2).reshape(block.shape[0], block.shape[1] * block.shape[2])


class RankOneTensorProduct(_GroupedPaths):
    """The first layer's product, for V = w (x) Y; see the module docstring.

    forward(w (E, l_max+1, n), harmonics (E, (l_max+1)^2), environment (E, n, (l_max+1)^2)) -> (E, n, P).
    """

    def __init__(self, description: LayerTensorProduct, needed_paths: tuple[int, ...]) -> None:
        super().__init__(description, needed_paths)
        sh_dim = (description.l_max + 1) ** 2
        contraction = np.zeros((sh_dim, sh_dim, self.output_dim))
        degree_selection = np.zeros((description.l_max + 1, self.output_dim))
        for index, (start, stop) in self.path_columns.items():
            path = description.paths[index]
            contraction[path.l1 ** 2:(path.l1 + 1) ** 2, path.l2 ** 2:(path.l2 + 1) ** 2, start:stop] = (
                description.clebsch_gordan[index]
            )
            degree_selection[path.l1, start:stop] = 1.0
        self.register_buffer("clebsch_gordan_first", torch.as_tensor(contraction.reshape(sh_dim, -1)), persistent=False)
        self.register_buffer("degree_selection", torch.as_tensor(degree_selection), persistent=False)

    def forward(self, weights: torch.Tensor, harmonics: torch.Tensor, environment: torch.Tensor) -> torch.Tensor:
        num_edges, sh_dim = harmonics.shape
        contracted = (harmonics @ self.clebsch_gordan_first).view(num_edges, sh_dim, self.output_dim)
        product = torch.bmm(environment, contracted)  # (E, n, P)
        return product * (weights.transpose(1, 2) @ self.degree_selection)


class ScalarPathsProduct(_GroupedPaths):
    """The last layer's product: only the scalar paths; see the module docstring.

    forward(features (E, n, D_in), environment (E, n, (l_max+1)^2)) -> (E, n, number of scalar paths).
    """

    def __init__(self, description: LayerTensorProduct, input_irreps: tuple[Irrep, ...]) -> None:
        super().__init__(description, description.scalar_paths)
        in_offsets = irrep_offsets(input_irreps)
        env_columns = np.zeros(in_offsets[-1], dtype=np.int64)
        reduce = np.zeros((in_offsets[-1], self.output_dim))
        for index, (column, _) in self.path_columns.items():
            path = description.paths[index]
            start = in_offsets[input_irreps.index(description.irreps_in1[path.in1])]
            cg = description.clebsch_gordan[index]  # (2l+1, 2l+1, 1), diagonal
            for m in range(2 * path.l1 + 1):
                # Each V column takes part in at most one scalar path, so one gather of A lines up with V.
                env_columns[start + m] = path.l2 ** 2 + m
                reduce[start + m, column] = cg[m, m, 0]
        self.identity_columns = bool(np.array_equal(env_columns, np.arange(len(env_columns))))
        self.register_buffer("environment_columns", torch.as_tensor(env_columns), persistent=False)
        self.register_buffer("clebsch_gordan_scalar", torch.as_tensor(reduce), persistent=False)

    def forward(self, features: torch.Tensor, environment: torch.Tensor) -> torch.Tensor:
        if self.identity_columns:
            environment = environment[:, :, : features.shape[2]]
        else:
            environment = environment.index_select(2, self.environment_columns)
        return (features * environment) @ self.clebsch_gordan_scalar


class CompactTensorProduct(_GroupedPaths):
    """The needed paths of a middle layer; see the module docstring.

    forward(features (E, n, D_in), environment (E, n, (l_max+1)^2)) -> (E, n, P).
    """

    def __init__(self, description: LayerTensorProduct, input_irreps: tuple[Irrep, ...], needed_paths: tuple[int, ...]) -> None:
        super().__init__(description, needed_paths)
        in_offsets = irrep_offsets(input_irreps)
        input_dim = in_offsets[-1]
        self.degrees: list[int] = []
        for l2 in range(description.l_max + 1):
            paths = [i for i in needed_paths if description.paths[i].l2 == l2]
            if not paths:
                continue
            block = np.zeros((input_dim, 2 * l2 + 1, self.output_dim))
            for index in paths:
                path = description.paths[index]
                start = in_offsets[input_irreps.index(description.irreps_in1[path.in1])]
                cg = description.clebsch_gordan[index]
                block[start:start + cg.shape[0], :, slice(*self.path_columns[index])] = cg
            self.register_buffer(f"clebsch_gordan_{l2}", torch.as_tensor(block.reshape(-1, self.output_dim)), persistent=False)
            self.degrees.append(l2)

    def forward(self, features: torch.Tensor, environment: torch.Tensor) -> torch.Tensor:
        num_edges, channels, _ = features.shape
        result = None
        for l2 in self.degrees:
            env = environment[:, :, l2 * l2:(l2 + 1) * (l2 + 1)]
            outer = (features.unsqueeze(-1) * env.unsqueeze(-2)).reshape(num_edges, channels, features.shape[2] * env.shape[2])
            term = outer @ self.get_buffer(f"clebsch_gordan_{l2}")
            result = term if result is None else result + term
        return result


class ChannelMixing(nn.Module):
    """V_{c', (l,p)} = sum over paths into (l,p) and channels c of W[path][c, c'] T_{c, path} / sqrt(fan_in).

    Holds no parameters: the flat weight (e3nn o3.Linear layout, owned by the model) is passed in. Only the
    output irreps the next layer reads are computed; fan_in counts every path of the function.
    """

    def __init__(self, description: LayerTensorProduct, tensor_product: _GroupedPaths, output_irreps: tuple[Irrep, ...]) -> None:
        super().__init__()
        n = description.num_channels
        self.channels = n
        # e3nn Linear instruction order: for each input block (path), each output irrep equal to it.
        weight_offset = {}
        offset = 0
        for path in description.paths:
            for irrep in description.irreps_out:
                if irrep == path.irrep_out:
                    weight_offset[path.index] = offset
                    offset += n * n
        self.weight_numel = offset
        self.groups: list[tuple[Irrep, list[int], int, float]] = []
        for irrep in output_irreps:
            _, _, paths = tensor_product.irrep_blocks[irrep]
            fan_in = n * len(description.paths_into(irrep))
            self.groups.append((irrep, [weight_offset[p] for p in paths], 2 * irrep[0] + 1, fan_in**-0.5))

    def forward(self, blocks: dict[Irrep, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        n = self.channels
        outputs = []
        for irrep, weight_rows, dim, normalization in self.groups:
            num_paths = len(weight_rows)
            # (c_out, (c_in, path)) so that it contracts the (E, n * paths, 2l+1) view of the block.
            w = torch.stack([weight[row:row + n * n].view(n, n) for row in weight_rows], dim=1)  # (c_in, path, c_out)
            w = w.reshape(n * num_paths, n).t() * normalization
            block = blocks[irrep]
            block = block.reshape(block.shape[0], n * num_paths, dim)
            outputs.append(torch.matmul(w, block))  # (E, n, 2l+1)
        return torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
