"""Pure-PyTorch ops of the fast backend: the compact channel-wise tensor product and channel mixing.

Layouts (internal to this backend; parameters keep the reference's layout). Channels are the last,
contiguous axis everywhere, so that every contraction over channels (channel mixing, the MLP inputs) is
one plain matmul over a view, with no transposed copies:
- Equivariant edge features are (E, D, n): the irrep blocks of `irreps` concatenated along axis 1
  (D = sum of 2l+1), channel c last. Only the irreps some later computation needs are kept.
- The environment A is (E, (l_max+1)^2, n), spherical-harmonic order.
- Tensor-product outputs are (E, P, n) with the needed paths grouped by output irrep (sorted), so each
  output irrep is one contiguous row block (`irrep_blocks`). Inside the block of an irrep of dimension
  2l+1 reached by paths j = 0..J-1, component m of path j is row m * J + j, so the block viewed as
  (E (2l+1), J n) is the channel-mixing input and the scalar block (E, J n) is path-major, the reference's
  latent-MLP input order.

The product T = sum_{m1,m2} cg[path] V_{l1} A_{l2} is evaluated for the needed paths only, with a few large
ops (never one per path), in three specialisations:

- `RankOneTensorProduct` (first layer): V^{ij,0}_{l1 m1, c} = w_{l1, c} Y_{l1 m1}(r_ij) has rank one in m,
  so the Clebsch-Gordan contraction with Y is channel-independent and done once per edge:
      M[e, row, (l2, m2)] = sum_{m1} cg[m1, m2, row] Y_{l1(row), m1}     (E, P, (l_max+1)^2), matmuls
      T[e, row, c] = w_{l1(row), c} * (M[e] @ A[e])[row, c]              batched matmuls
  one of each per output irrep, so that each output block is contiguous.
- `ScalarPathsProduct` (last layer): only (l, p) x (l, p) -> 0e paths, cg = delta / sqrt(2l + 1), so
      T[e, path, c] = sum_m V[e, l m, c] A[e, l m, c] / sqrt(2l + 1)   one product, one sum per path
- `CompactTensorProduct` (middle layers): per l2,
      outer_{l2}[e, (a, m2), c] = V[e, a, c] * A[e, l2 m2, c]             (E, D (2 l2 + 1), n)
      T += cg_{l2} @ outer_{l2}                                          cg_{l2}: (P, D (2 l2 + 1))

Channel mixing is one matmul per output irrep over all its paths and channels. In the neighbour-slot layout
`FoldedScalarPaths` replaces the penultimate layer's non-scalar paths, its mixing and the last layer's product
by one per-atom matrix (see its docstring).

Every product also takes `slots` = K (the model's neighbour-slot layout): rows are then K slots per atom and
the environment is given per atom, (N, (l_max+1)^2, n), and broadcast over the atom's slots instead of being
gathered per edge. The first layer then contracts the environment with the Clebsch-Gordan coefficients once
per atom, G_i = cg . A_i, and multiplies it by the slots' harmonics, Y (K, (l_max+1)^2) @ G_i.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .tensor_product import Irrep, LayerTensorProduct, irrep_offsets

# Stands for the neighbour-slot count of traced programs, where it is symbolic, in `batched_matmul`'s choice
# (and in `FoldedScalarPaths.pays_off`).
TYPICAL_SLOTS = 16


def _broadcast_environment(per_edge: torch.Tensor, environment: torch.Tensor, slots: int | None, op):
    """op(per_edge, environment) with the environment per edge (same rows) or, with `slots` = K, per atom:
    per-edge rows are then K neighbour slots per atom and the atom's environment is broadcast over them."""
    if slots is None:
        return op(per_edge, environment)
    num_atoms = environment.shape[0]
    result = op(per_edge.view(num_atoms, slots, *per_edge.shape[1:]), environment.unsqueeze(1))
    return result.view(per_edge.shape[0], *result.shape[2:])


class _GroupedPaths(nn.Module):
    """Row bookkeeping shared by the products: needed paths grouped by output irrep, components interleaved."""

    def __init__(self, description: LayerTensorProduct, needed_paths: tuple[int, ...]) -> None:
        super().__init__()
        self.description = description
        self._path_rows: dict[int, tuple[int, int, int]] = {}  # path -> (block start, position j, paths J)
        self.irrep_blocks: dict[Irrep, tuple[int, int, tuple[int, ...]]] = {}
        row = 0
        for irrep in sorted({description.paths[i].irrep_out for i in needed_paths}):
            paths = tuple(i for i in needed_paths if description.paths[i].irrep_out == irrep)
            for position, index in enumerate(paths):
                self._path_rows[index] = (row, position, len(paths))
            stop = row + len(paths) * (2 * irrep[0] + 1)
            self.irrep_blocks[irrep] = (row, stop, paths)
            row = stop
        self.output_dim = row

    @property
    def path_indices(self) -> tuple[int, ...]:
        """The computed paths, in row order (grouped by output irrep)."""
        return tuple(index for _, _, paths in self.irrep_blocks.values() for index in paths)

    def output_row(self, path_index: int, m: int) -> int:
        """Row of T holding component m of path `path_index`."""
        start, position, count = self._path_rows[path_index]
        return start + m * count + position

    def split(self, paths: torch.Tensor) -> dict[Irrep, torch.Tensor]:
        """(E, P, n) -> one (E, paths * (2l+1), n) block per output irrep (split, whose backward is a cat)."""
        sizes = [stop - start for start, stop, _ in self.irrep_blocks.values()]
        return dict(zip(self.irrep_blocks, paths.split(sizes, dim=1)))

    @staticmethod
    def scalars(blocks: dict[Irrep, torch.Tensor]) -> torch.Tensor:
        """The (0, +1) block as (E, S n), path-major (the reference's latent-MLP input order)."""
        return blocks[(0, 1)].flatten(1)


class RankOneTensorProduct(_GroupedPaths):
    """The first layer's product, for V = w (x) Y; see the module docstring.

    forward(w (E, l_max+1, n), harmonics (E, (l_max+1)^2), environment (E, (l_max+1)^2, n)) -> (E, P, n).
    """

    def __init__(self, description: LayerTensorProduct, needed_paths: tuple[int, ...]) -> None:
        super().__init__(description, needed_paths)
        sh_dim = (description.l_max + 1) ** 2
        # The degree l1 of every path, in row-block order (one gather of the weights serves all blocks).
        degrees = [description.paths[index].l1 for index in self.path_indices]
        self.path_degree_readers = column_readers(degrees, description.l_max + 1)
        self.register_buffer("path_degree", torch.tensor(degrees), persistent=False)
        self.paths_per_block = [len(paths) for _, _, paths in self.irrep_blocks.values()]
        # The same per block, for calls that compute some blocks only.
        self.block_degrees = []
        for block_index, (_, _, paths) in enumerate(self.irrep_blocks.values()):
            block = [description.paths[index].l1 for index in paths]
            self.register_buffer(f"path_degree_{block_index}", torch.tensor(block), persistent=False)
            self.block_degrees.append(column_readers(block, description.l_max + 1))
        # Per output irrep: the contraction with Y (sh_dim, rows * sh_dim).
        for block_index, (irrep, (start, stop, paths)) in enumerate(self.irrep_blocks.items()):
            contraction = np.zeros((sh_dim, stop - start, sh_dim))
            for index in paths:
                path = description.paths[index]
                cg = description.clebsch_gordan[index]  # (2l1+1, 2l2+1, 2l_out+1)
                for m in range(2 * path.l_out + 1):
                    row = self.output_row(index, m) - start
                    contraction[path.l1 ** 2:(path.l1 + 1) ** 2, row, path.l2 ** 2:(path.l2 + 1) ** 2] = cg[:, :, m]
            self.register_buffer(f"clebsch_gordan_{block_index}", torch.as_tensor(contraction.reshape(sh_dim, -1)),
                                 persistent=False)

    def forward(self, weights: torch.Tensor, harmonics: torch.Tensor, environment: torch.Tensor,
                slots: int | None = None, irreps: tuple[Irrep, ...] | None = None) -> dict[Irrep, torch.Tensor]:
        """-> the output blocks (E, 2l+1, J, n), one per irrep (`split` gives the same as (E, (2l+1) J, n)).

        With `slots` = K, rows are K neighbour slots per atom and `environment` is per atom (N, D2, n):
        the environment is contracted with the Clebsch-Gordan coefficients once per atom,
            G[i, (l1 m1), (row, c)] = sum_{(l2 m2)} cg[(l1 m1), row, (l2 m2)] A[i, (l2 m2), c],
        and each atom's K slots take one matmul, Y (K, D2) @ G[i] (D2, rows n). ``irreps``: only these output
        blocks (default all).
        """
        num_rows, sh_dim = harmonics.shape
        channels = environment.shape[2]
        if irreps is None:
            all_path_weights = repeat_columns(weights, self.path_degree, self.path_degree_readers).split(
                self.paths_per_block, dim=1)
        blocks = {}
        for block_index, (irrep, (start, stop, paths)) in enumerate(self.irrep_blocks.items()):
            if irreps is not None and irrep not in irreps:
                continue
            contraction = self.get_buffer(f"clebsch_gordan_{block_index}")
            if slots is None:
                contracted = (harmonics @ contraction).view(num_rows, stop - start, sh_dim)
                product = torch.bmm(contracted, environment)
            else:
                num_atoms = environment.shape[0]
                per_atom = torch.matmul(contraction.view(sh_dim * (stop - start), sh_dim), environment)
                columns = (stop - start) * channels
                product = batched_matmul(harmonics.view(num_atoms, slots, sh_dim),
                                         per_atom.view(num_atoms, sh_dim, columns),
                                         (TYPICAL_SLOTS if traced(harmonics) else slots, sh_dim, columns))
            product = product.reshape(num_rows, 2 * irrep[0] + 1, len(paths), channels)
            # kept (E, 2l+1, J, n): a traced program's reshape for the mixing then merges axes only (through
            # an (E, (2l+1) J, n) view, inductor's dynamic-shape code copied the block with integer divisions)
            if irreps is None:
                path_weights = all_path_weights[block_index]
            else:
                path_weights = repeat_columns(weights, self.get_buffer(f"path_degree_{block_index}"),
                                              self.block_degrees[block_index])
            blocks[irrep] = product * path_weights.unsqueeze(1)
        return blocks


class ScalarPathsProduct(_GroupedPaths):
    """The last layer's product: only the scalar paths; see the module docstring.

    forward(features (E, D_in, n), environment (E, (l_max+1)^2, n)) -> (E, number of scalar paths, n).
    """

    def __init__(self, description: LayerTensorProduct, input_irreps: tuple[Irrep, ...]) -> None:
        super().__init__(description, description.scalar_paths)
        in_offsets = irrep_offsets(input_irreps)
        env_rows = np.zeros(in_offsets[-1], dtype=np.int64)
        # Per scalar path, in output order: its rows of V (a contiguous irrep block) and cg = 1/sqrt(2l+1).
        self.sums: list[tuple[int, int, float]] = []
        for index in description.scalar_paths:
            path = description.paths[index]
            start = in_offsets[input_irreps.index(description.irreps_in1[path.in1])]
            cg = description.clebsch_gordan[index]  # (2l+1, 2l+1, 1), diagonal, all equal
            # Each V row takes part in at most one scalar path, so one gather of A lines up with V.
            env_rows[start:start + 2 * path.l1 + 1] = path.l2 ** 2 + np.arange(2 * path.l1 + 1)
            assert self.output_row(index, 0) == len(self.sums)
            self.sums.append((start, start + 2 * path.l1 + 1, float(cg[0, 0, 0])))
        self.identity_rows = bool(np.array_equal(env_rows, np.arange(len(env_rows))))
        self.register_buffer("environment_rows", torch.as_tensor(env_rows), persistent=False)
        # The product is split into all irrep blocks of V (split's backward is one cat, where slicing
        # would fill a zero tensor per block); the scalar paths sum their blocks.
        self.block_sizes = [2 * l + 1 for l, _ in input_irreps]
        self.block_of_sum = [in_offsets.index(start) for start, _, _ in self.sums]

    def forward(self, features: torch.Tensor, environment: torch.Tensor, slots: int | None = None) -> torch.Tensor:
        if self.identity_rows:
            environment = environment[:, : features.shape[1]]
        else:
            environment = environment.index_select(1, self.environment_rows)
        product = _broadcast_environment(features, environment, slots, torch.mul).split(self.block_sizes, dim=1)
        return torch.stack([product[block].sum(1) * cg for block, (_, _, cg) in zip(self.block_of_sum, self.sums)],
                           dim=1)


class CompactTensorProduct(_GroupedPaths):
    """The needed paths of a middle layer; see the module docstring.

    forward(features (E, D_in, n), environment (E, (l_max+1)^2, n)) -> (E, P, n).
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
            block = np.zeros((self.output_dim, input_dim, 2 * l2 + 1))
            for index in paths:
                path = description.paths[index]
                start = in_offsets[input_irreps.index(description.irreps_in1[path.in1])]
                cg = description.clebsch_gordan[index]
                for m in range(2 * path.l_out + 1):
                    block[self.output_row(index, m), start:start + cg.shape[0], :] = cg[:, :, m]
            self.register_buffer(f"clebsch_gordan_{l2}", torch.as_tensor(block.reshape(self.output_dim, -1)), persistent=False)
            self.degrees.append(l2)

    def forward(self, features: torch.Tensor, environment: torch.Tensor, slots: int | None = None) -> torch.Tensor:
        num_edges, input_dim, channels = features.shape
        result = None
        for l2 in self.degrees:
            env = environment[:, l2 * l2:(l2 + 1) * (l2 + 1)]
            outer = _broadcast_environment(features.unsqueeze(2), env.unsqueeze(1), slots, torch.mul)
            outer = outer.reshape(num_edges, input_dim * env.shape[1], channels)
            term = torch.matmul(self.get_buffer(f"clebsch_gordan_{l2}"), outer)
            result = term if result is None else result + term
        return result


class ChannelMixing(nn.Module):
    """V_{(l,p), c'} = sum over paths into (l,p) and channels c of W[path][c, c'] T_{path, c} / sqrt(fan_in).

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

    def group_weight(self, group: int, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The normalised ((path, c_in), c_out) matrix of output irrep group `group` from the flat weight."""
        n = self.channels
        _, weight_rows, _, normalization = self.groups[group]
        return torch.cat([weight[row:row + n * n].view(n, n) for row in weight_rows]) * (normalization * scale)

    def forward(self, blocks: dict[Irrep, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        n = self.channels
        outputs = []
        for group, (irrep, weight_rows, dim, _) in enumerate(self.groups):
            # ((path, c_in), c_out): contracts the (E (2l+1), paths n) view of the block.
            block = blocks[irrep]
            w = self.group_weight(group, weight)
            outputs.append((block.reshape(block.shape[0] * dim, len(weight_rows) * n) @ w).view(block.shape[0], dim, n))
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


class FoldedScalarPaths(nn.Module):
    """The last layer's scalar paths composed with the penultimate layer's product and channel mixing, for the
    neighbour-slot layout: the penultimate layer's non-scalar path blocks and its mixed features V are never
    formed per edge.

    The last layer reads V only through s[e, k, c'] = cg_k sum_m A'_i[l_k m, c'] V[e, (l_k m), c'] (A' its
    environment, i the edge's center), V is the channel mixing of T, and T is bilinear in the penultimate layer's
    input U (rows a) and its environment A:
        T[e, (m, j), c] = sum_a U[e, a, c] G_i[a, (m, j), c],   G_i[a, (m, j), c] = sum_b cg_j[a, m, b] A_i[b, c].
    So s is one matmul per atom of U with a per-atom matrix,
        s[e, (k, c')] = sum_(a, c) U[e, a, c] S_i[(a, c), (k, c')],
        S_i[a, c, k, c'] = cg_k sum_(paths j into l_k) W_j[c, c'] sum_m A'_i[l_k m, c'] G_i[a, (m, j), c],
    where only the pairs (a, j) with a in path j's l1 block are nonzero. Per edge this is one (D n)-by-(L n)
    product (D rows of U, L scalar paths) in place of the penultimate layer's full product, its mixing and the
    last layer's contraction, which all write per-edge tensors several times larger.

    forward(features U (N K, D, n), environment A (N, (l_max+1)^2, n), next_environment A' (same), mixing weight
    (flat), slots K) -> (N K, L, n), the last layer's scalar-path block.
    """

    def __init__(self, description: LayerTensorProduct, product: _GroupedPaths, mixing: ChannelMixing,
                 last: LayerTensorProduct, input_offsets: list[int]) -> None:
        super().__init__()
        self.channels = description.num_channels
        env_dim = (description.l_max + 1) ** 2
        # The row blocks of U (one per irrep of the penultimate layer's input that it has), in row order.
        blocks = sorted({(input_offsets[in1], 2 * l + 1) for in1, (l, _) in enumerate(description.irreps_in1)
                         if input_offsets[in1] >= 0})
        self.input_dim = blocks[-1][0] + blocks[-1][1]
        group_of = {irrep: group for group, (irrep, _, _, _) in enumerate(mixing.groups)}
        # Per scalar path k of the last layer: (mixing group, first row of A' it reads, 2l+1, its Clebsch-Gordan
        # value, and per row block of U: (number of paths J into the term from that block, or 0, 2l1+1)).
        # The (a, j) pairs are ordered by block, then path, then a: the pairs of one block sum as a (J, 2l1+1) view.
        self.terms: list[tuple[int, int, int, float, tuple[tuple[int, int], ...]]] = []
        contraction_rows, pair_paths = [], []
        for index in last.scalar_paths:
            path = last.paths[index]
            irrep = last.irreps_in1[path.in1]
            _, _, paths = product.irrep_blocks[irrep]
            dim = 2 * irrep[0] + 1
            pairs, block_counts = [], []
            for offset, size in blocks:
                in_block = [(position, j) for position, j in enumerate(paths)
                            if input_offsets[description.paths[j].in1] == offset]
                pairs += [(position, j, m1) for position, j in in_block for m1 in range(size)]
                block_counts.append((len(in_block), size))
            rows = np.zeros((dim, len(pairs), env_dim))  # contraction rows in (m, pair) order
            for p, (_, j, m1) in enumerate(pairs):
                first = description.paths[j]
                rows[:, p, first.l2 ** 2:(first.l2 + 1) ** 2] = description.clebsch_gordan[j][m1].T
            contraction_rows.append(rows.reshape(-1, env_dim))
            pair_paths.append(torch.tensor([position for position, _, _ in pairs]))
            cg_last = float(last.clebsch_gordan[index][0, 0, 0])
            self.terms.append((group_of[irrep], path.l2 ** 2, dim, cg_last, tuple(block_counts)))
        # named for `AllegroPotential.remember_exact_constants` (float64 copies of Clebsch-Gordan tables)
        self.register_buffer("clebsch_gordan", torch.as_tensor(np.concatenate(contraction_rows)), persistent=False)
        for k, paths in enumerate(pair_paths):
            self.register_buffer(f"pair_path_{k}", paths, persistent=False)
        self._mixing = (mixing,)  # the penultimate layer's (parameter-free) module, not a submodule here
        # FLOPs per neighbour slot, folded (per-atom matrices over `slots` slots, then the per-slot product)
        # and not (the penultimate layer's product, its mixing into the irreps the last layer reads).
        n2 = 2 * self.channels**2
        self.per_atom_flop = n2 * sum(dim * sum(count * size for count, size in counts)
                                      for _, _, dim, _, counts in self.terms)
        self.per_slot_flop = n2 * self.input_dim * len(self.terms)
        mixed = sum((2 * mixing.groups[group][0][0] + 1) * len(mixing.groups[group][1]) for group, *_ in self.terms)
        self.unfolded_flop = description.flop(1) + n2 * mixed

    def pays_off(self, slots: int = TYPICAL_SLOTS) -> bool:
        """Whether folding saves work at `slots` neighbours per atom: it takes at most 0.85 of the unfolded FLOPs.
        The margin stands for the per-atom matrices' cost that FLOPs miss (n^2 per atom): with l_max 3 and
        n = 128 (the "rmd17" preset, aspirin) the fold estimated 1.03 of the FLOPs and ran 1.4x slower; the
        default model estimates 0.78 and runs 1.2x faster (Ag256, eager)."""
        return self.per_atom_flop / slots + self.per_slot_flop <= 0.85 * self.unfolded_flop

    def forward(self, features: torch.Tensor, environment: torch.Tensor, next_environment: torch.Tensor,
                weight: torch.Tensor, slots: int) -> torch.Tensor:
        n, num_atoms = self.channels, environment.shape[0]
        # G for every (m, pair) row of every term in one matmul: (N, rows, n)
        contracted = torch.matmul(self.clebsch_gordan, environment)
        num_pairs = [sum(count * size for count, size in counts) for _, _, _, _, counts in self.terms]
        per_term = contracted.split([pairs * dim for (_, _, dim, _, _), pairs in zip(self.terms, num_pairs)], dim=1)
        columns = []
        for k, ((group, env_start, dim, cg, counts), pairs, g) in enumerate(zip(self.terms, num_pairs, per_term)):
            # Q^T[i, c', (pair, c)] = sum_m A'_i[l m, c'] G_i[m, pair, c]: (N, n, m) @ (N, m, pairs n)
            q = torch.bmm(next_environment[:, env_start:env_start + dim].transpose(1, 2),
                          g.view(num_atoms, dim, pairs * n))
            w = self._mixing[0].group_weight(group, weight, cg).view(-1, n, n)  # (path, c, c')
            w = w.index_select(0, self.get_buffer(f"pair_path_{k}")).permute(2, 0, 1).reshape(n, pairs * n)
            weighted = (q * w).view(num_atoms, n, pairs, n).split([count * size for count, size in counts], dim=2)
            # the sum over the paths from each row block of U: (N, c', a, c)
            parts = [part.view(num_atoms, n, count, size, n).sum(2) if count
                     else q.new_zeros(num_atoms, n, size, n) for part, (count, size) in zip(weighted, counts)]
            columns.append(torch.cat(parts, dim=2))
        # S^T, (N, (k, c'), (a, c))
        folded = torch.stack(columns, dim=1).view(num_atoms, len(self.terms) * n, self.input_dim * n)
        width = len(self.terms) * n
        out = batched_matmul(features.view(num_atoms, slots, self.input_dim * n), folded.transpose(1, 2),
                             (TYPICAL_SLOTS if traced(features) else slots, self.input_dim * n, width))
        return out.reshape(features.shape[0], len(self.terms), n)  # a copy where K > L n (computed transposed)


class _BatchedMatmul(torch.autograd.Function):
    """torch.bmm whose gradients (and their gradients) go through `batched_matmul`."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, sizes: tuple[int, int, int]) -> torch.Tensor:
        return torch.bmm(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, b, ctx.sizes = inputs
        ctx.save_for_backward(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        m, k, p = ctx.sizes
        grad_a = batched_matmul(grad, b.transpose(1, 2), (m, p, k)) if ctx.needs_input_grad[0] else None
        grad_b = batched_matmul(a.transpose(1, 2), grad, (k, m, p)) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def batched_matmul(a: torch.Tensor, b: torch.Tensor, sizes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """a @ b for (B, M, K) @ (B, K, P). A result with fewer columns than rows is computed transposed,
    (b^T a^T)^T, and so are the gradients: the CPU's batched GEMM is slower when the result has few columns
    (a (K, 320) @ (320, 9) product per atom, the harmonics' gradient, took 1.6 to 4.5 times as long as its
    transpose here, depending on the operands' layout).

    ``sizes``: (M, K, P) as compared for that choice, by default the operands' own. In traced programs pass a
    typical value for a symbolic size (the neighbour count): comparing it would put a guard on it, and the
    program would be compiled again whenever it crossed the other size, for a choice that only affects speed.
    """
    m, k, p = (a.shape[1], a.shape[2], b.shape[2]) if sizes is None else sizes
    if p < m:
        return _BatchedMatmul.apply(b.transpose(1, 2), a.transpose(1, 2), (p, k, m)).transpose(1, 2)
    return _BatchedMatmul.apply(a, b, (m, k, p))


class _SelectUnique(torch.autograd.Function):
    """index_select along `dim` with an index without repeats; see `select_unique`."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(dim, index)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.dim, index = inputs
        ctx.size = x.shape[ctx.dim]
        ctx.save_for_backward(index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        shape = list(grad.shape)
        shape[ctx.dim] = ctx.size
        # index_copy (differentiable: its gradient is index_select again, for the double backward)
        return grad.new_zeros(shape).index_copy(ctx.dim, index, grad), None, None


def select_unique(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(dim, index) for an `index` without repeated entries (not checked). Its backward places the
    gradient with index_copy instead of index_add: the same values, but inductor's code for an index_add is
    a loop of atomic adds (it cannot know the entries are distinct). Eager calls use index_select itself:
    with this Function and `repeat_columns`, eager calls were 3 to 7% slower."""
    if not traced(x):
        return x.index_select(dim, index)
    return _SelectUnique.apply(x, dim, index)


class _RepeatColumns(torch.autograd.Function):
    """x.index_select(1, index) for a fixed index with repeats; see `repeat_columns`."""

    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor, readers: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        return x.index_select(1, index)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.readers = inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        columns = []
        for readers in ctx.readers:  # the gradient of column k: the sum of the output columns that read it
            if not readers:
                columns.append(torch.zeros_like(grad[:, 0]))
                continue
            total = grad[:, readers[0]]
            for j in readers[1:]:
                total = total + grad[:, j]
            columns.append(total)
        return torch.stack(columns, dim=1), None, None


def repeat_columns(x: torch.Tensor, index: torch.Tensor, readers: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """x.index_select(1, index) for a constant `index` whose entries repeat; ``readers`` = `column_readers(index)`.
    The backward sums the columns that read each input column, a few adds, instead of an index_add:
    inductor's code for an index_add is a loop of atomic adds. Eager calls use index_select itself (see
    `select_unique`)."""
    if not traced(x):
        return x.index_select(1, index)
    return _RepeatColumns.apply(x, index, readers)


def column_readers(index: list[int], num_columns: int) -> tuple[tuple[int, ...], ...]:
    """For each input column k, the output columns j with index[j] == k."""
    return tuple(tuple(j for j, k in enumerate(index) if k == column) for column in range(num_columns))


def traced(x: torch.Tensor) -> bool:
    """Whether `x` belongs to a traced program: torch.compile's Dynamo, or make_fx with symbolic shapes."""
    return torch.compiler.is_compiling() or any(isinstance(size, torch.SymInt) for size in x.shape)
