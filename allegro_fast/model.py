"""`allegro_fast.Allegro`: the Allegro model with a selectable backend.

backend="torch": pure PyTorch, CPU or CUDA. It computes exactly the reference's function with the same
parameter names and shapes (state dicts move both ways), but only what reaches the energy:
- the edge geometry (lengths, Bessel basis, envelope, spherical harmonics) runs over component-major
  (3, E) edge vectors in a few ops (`geometry`): per-edge ops over rows of three cost many times more on a
  CPU, and force training differentiates every op twice; the one-hot species part of the two-body MLP's
  first matmul is a row of a (type pair, width) table;
- the tensor product runs on the needed paths only (`torch_ops`): the first layer uses the rank-one
  structure of V^0 = w (x) Y, the last layer computes only the scalar paths, middle layers use one
  matmul per spherical-harmonic degree;
- channel mixing keeps only the irreps the next layer uses; channels are the last axis throughout;
- equivariant features live in the neighbour-slot layout (`NeighborSlots`): the edges of atom i are rows
  i K .. i K + K - 1 with zero rows as padding, so the environment sum and the first product are batched
  matmuls per atom and the environment is never gathered per edge. Traced programs whose caller does not
  fix K (torch.export, compiled training: the edge count is symbolic; `export.compile_model` fixes it) and
  graphs whose neighbour counts are so uneven that padding would more than double the edges use the
  edge-list layout instead: the environment sum is an index_add over edges sorted by center
  (segment_reduce has no double backward), then edges go in cache-sized chunks;
- in the slot layout the last layer reads the penultimate layer's mixed features only through its scalar
  paths, which are linear in them: both are folded into one per-atom matrix (`torch_ops.FoldedScalarPaths`),
  where its FLOP estimate says that pays off (the default model; not n = 128 with l_max 3). The
  penultimate layer's non-scalar paths and mixed features are then never formed per edge.
backend="triton": the same layers, with the edge geometry and, per layer, the environment sum, tensor product and
channel mixing in Triton kernels (`allegro_fast.kernels`, one fused kernel per layer); the MLPs stay torch. Its
sums to atoms and structures, and the gradients of its per-species-pair tables, are segment sums in a fixed order
(`kernels.segments`), not index_add (atomic on CUDA), so its energies, forces, stress and parameter gradients
repeat bitwise.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from e3nn.math import normalize2mom
from torch import nn

from .config import AllegroConfig
from .geometry import edge_geometry, harmonic_matrix
from .graph import AtomicGraph
from .potential import AllegroPotential
from .tensor_product import LayerTensorProduct, describe_layers, irrep_offsets
from .torch_ops import (
    ChannelMixing,
    CompactTensorProduct,
    FoldedScalarPaths,
    RankOneTensorProduct,
    ScalarPathsProduct,
    column_readers,
    repeat_columns,
    select_unique,
    traced,
)

BACKENDS = ("torch", "triton")
# Above this many tensor channels the Triton layer kernels (channel-tiled above 32) are very large. For sm_90
# (ptxas, Triton 3.6, 2-core CPU): the rMD17 preset's (128 channels, l_max 3) forward compiles in about 20 s per
# layer (40-224 B of spill per thread), its backward in about a minute (float32: 56-112 B of spill; float64
# see the README). Speed is unmeasured on a GPU.
TRITON_CHANNELS_LIMIT = 64


class _SiLU(torch.autograd.Function):
    """silu, whose derivative is `_SiLUDerivative`: force training differentiates the MLPs twice, and torch's own
    silu then keeps five (E, width) tensors per activation for the second derivative (sigmoid(x), 1 - sigmoid(x)
    and the products of its composite derivative); this keeps the incoming gradient only (x is the forward's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return nn.functional.silu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a backward without create_graph: torch's fused kernel
            return torch.ops.aten.silu_backward(grad, x)
        return _SiLUDerivative.apply(grad, x)


class _SiLUDerivative(torch.autograd.Function):
    """grad * silu'(x), differentiable in both (its backward is plain torch on the saved pair, so every further
    order follows): silu'(x) = s (1 + x (1 - s)), silu''(x) = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x)."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad, x)
        s = torch.sigmoid(x)  # not aten.silu_backward, which has no derivative in a traced graph (make_fx)
        return grad * (s * (1 + x * (1 - s)))

    @staticmethod
    def backward(ctx, grad_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad, x = ctx.saved_tensors
        s = torch.sigmoid(x)
        first = s * (1 + x * (1 - s))
        second = s * (1 - s) * (2 + x * (1 - 2 * s))
        return grad_grad * first, grad_grad * grad * second


class _MLPLayer(nn.Module):
    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_in, num_out))


class ScalarMLP(nn.Module):
    """Bias-free MLP with normalised SiLU, identical to e3nn's FullyConnectedNet (same parameter names)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.num_layers = len(widths) - 1
        for k in range(self.num_layers):
            setattr(self, f"layer{k}", _MLPLayer(widths[k], widths[k + 1]))
        self.activation_scale = normalize2mom(nn.functional.silu).cst

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """MLP of the concatenation of the inputs (the first matmul is split instead of concatenating)."""
        first = self.first_weight()
        if len(inputs) == 1:
            x = inputs[0] @ first
        else:
            parts = first.split([part.shape[1] for part in inputs])
            x = inputs[-1] @ parts[-1]
            for part, weight in zip(inputs[:-1], parts[:-1]):
                x = torch.addmm(x, part, weight)
        return self.after_first(x)

    def first_weight(self) -> torch.Tensor:
        """The first layer's weight with its 1/sqrt(fan_in) normalisation, (num_in, width)."""
        return self.layer0.weight / self.layer0.weight.shape[0] ** 0.5

    def after_first(self, x: torch.Tensor) -> torch.Tensor:
        """The layers after the first matmul. The activation's normalisation constant is folded into the next
        (small) weight matrix, not applied to the (E, width) activations."""
        for k in range(1, self.num_layers):
            weight = getattr(self, f"layer{k}").weight
            x = _SiLU.apply(x) @ (weight * (self.activation_scale / weight.shape[0] ** 0.5))
        return x


class _ScalarLinear(nn.Module):
    """Scalars-to-scalars e3nn o3.Linear: flat weight (num_in * num_out,), scaled by 1/sqrt(num_in)."""

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.num_in, self.num_out = num_in, num_out
        self.weight = nn.Parameter(torch.randn(num_in * num_out))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x @ (self.weight.view(self.num_in, self.num_out) * (scale / self.num_in**0.5))


class _MixingWeight(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(numel))


def spherical_harmonics(vectors: torch.Tensor, l_max: int) -> torch.Tensor:
    """e3nn's component-normalised real spherical harmonics of normalised vectors, (E, 3) -> (E, (l_max+1)^2)."""
    from e3nn.o3 import spherical_harmonics as e3nn_sh

    return e3nn_sh(list(range(l_max + 1)), vectors, normalize=True, normalization="component")


class TorchAllegroLayer(nn.Module):
    def __init__(self, description: LayerTensorProduct, input_irreps, output_irreps, config: AllegroConfig, is_first: bool) -> None:
        super().__init__()
        n = config.num_tensor_features
        self.is_first = is_first
        self.env_linear = _ScalarLinear(config.num_scalar_features, n * (config.l_max + 1))
        if is_first:
            self.tensor_product = RankOneTensorProduct(description, description.needed_paths)
        elif description.is_last:
            self.tensor_product = ScalarPathsProduct(description, input_irreps)
        else:
            self.tensor_product = CompactTensorProduct(description, input_irreps, description.needed_paths)
        self.latent_mlp = ScalarMLP(
            [config.num_scalar_features + description.num_scalar_features, *config.latent_mlp_hidden,
             config.num_scalar_features]
        )
        if description.is_last:
            self.mixing = None
            self.channel_mixing = None
        else:
            self.channel_mixing = ChannelMixing(description, self.tensor_product, output_irreps)
            self.mixing = _MixingWeight(self.channel_mixing.weight_numel)


@dataclasses.dataclass
class NeighborSlots:
    """The neighbour-slot layout of the torch backend: the K = `slots` neighbours of atom i (edges sorted by
    center) are rows i K .. i K + K - 1, and zero rows pad atoms with fewer than K neighbours. Per-atom sums
    over neighbours are then batched matmuls and the environment of an atom is broadcast over its slots,
    never gathered per edge. Zero rows stay zero through the products and never reach the energy."""

    slot: torch.Tensor  # (E,) row of each edge
    slots: int
    num_atoms: int
    harmonics: torch.Tensor  # (N K, (l_max+1)^2)
    harmonics_by_atom: torch.Tensor  # (N, (l_max+1)^2, K), a view

    @classmethod
    def build(cls, center: torch.Tensor, center_ptr: torch.Tensor, num_atoms: int, slots: int,
              harmonics: torch.Tensor) -> NeighborSlots:
        edge_in_atom = torch.arange(center.shape[0], device=center.device) - center_ptr[:-1].index_select(0, center)
        slot = center * slots + edge_in_atom
        padded = _scatter_rows(harmonics, slot, num_atoms * slots)
        return cls(slot, slots, num_atoms, padded, padded.view(num_atoms, slots, -1).transpose(1, 2))

    def to_slots(self, per_edge: torch.Tensor) -> torch.Tensor:
        return _scatter_rows(per_edge, self.slot, self.num_atoms * self.slots)


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Zeros with rows[k] placed at row index[k] (index_copy: its backward is a gather of rows)."""
    return rows.new_zeros((num_rows, *rows.shape[1:])).index_copy(0, index, rows)


def _atom_ptr(graph: AtomicGraph) -> torch.Tensor:
    """(B + 1,) pointers of each structure's atoms (atoms are stored structure after structure)."""
    return torch.nn.functional.pad(graph.num_atoms.cumsum(0), (1, 0))


class Allegro(AllegroPotential):
    """Allegro with a selectable backend ("torch" or "triton"); parameters as in the reference."""

    def __init__(self, config: AllegroConfig, backend: str = "torch") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}")
        if backend == "triton":
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                raise RuntimeError("backend 'triton' needs the triton package (pip install triton, Linux); "
                                   "use backend='torch' on machines without it")
        super().__init__(config)
        self.backend = backend
        if backend == "triton":
            self._triton_forms()  # now, not inside a traced call (make_fx cannot run e3nn's wigner_3j)
            if config.num_tensor_features > TRITON_CHANNELS_LIMIT:
                warnings.warn(
                    f"backend 'triton' with {config.num_tensor_features} tensor channels (above "
                    f"{TRITON_CHANNELS_LIMIT}) runs channel-tiled kernels that take minutes to compile on first use "
                    "(l_max 3, 128 channels: about 2 minutes per layer for the backward in float32; "
                    "allegro_fast.kernels.precompile compiles them in parallel) and spill "
                    "registers (0.6-0.7 KB per thread in that backward); their speed is not yet measured on "
                    "a GPU: compare with backend='torch' for this model", stacklevel=2)

    def build(self, config: AllegroConfig) -> None:
        n, width = config.num_tensor_features, config.num_scalar_features
        self.two_body_mlp = ScalarMLP([2 * config.num_types + config.num_bessels, *config.two_body_mlp_hidden, width])
        self.two_body_env_linear = _ScalarLinear(width, n * (config.l_max + 1))

        descriptions = describe_layers(config.num_layers, config.l_max, config.parity, n)
        # Irreps of V that each layer reads: those of its needed paths, in the description's order.
        input_irreps = [
            tuple(irrep for irrep in d.irreps_in1 if any(d.paths[i].in1 == d.irreps_in1.index(irrep) for i in d.needed_paths))
            for d in descriptions
        ]
        self.input_irreps = input_irreps
        self.layers = nn.ModuleList(
            TorchAllegroLayer(d, input_irreps[k], input_irreps[k + 1] if k + 1 < len(descriptions) else (), config, k == 0)
            for k, d in enumerate(descriptions)
        )
        self.readout_mlp = ScalarMLP([width, *config.readout_mlp_hidden, 1])
        # The slot layout folds the penultimate layer's product and mixing into the last layer's scalar paths.
        self.folded_scalars = self.penultimate_scalars = None
        if len(descriptions) >= 2:
            k = len(descriptions) - 2
            penultimate = self.layers[k]
            if penultimate.is_first:  # its input is V^0 = w (x) Y, in spherical-harmonic rows
                offsets = [l * l for l, _ in descriptions[k].irreps_in1]
            else:
                starts = irrep_offsets(input_irreps[k])
                offsets = [starts[input_irreps[k].index(irrep)] if irrep in input_irreps[k] else -1
                           for irrep in descriptions[k].irreps_in1]
            folded = FoldedScalarPaths(descriptions[k], penultimate.tensor_product, penultimate.channel_mixing,
                                       descriptions[-1], offsets)
            if folded.pays_off():
                self.folded_scalars = folded
                if not penultimate.is_first:  # a middle layer computes its scalar paths only
                    self.penultimate_scalars = ScalarPathsProduct(descriptions[k], input_irreps[k])
        # Entries of the (N, (l_max+1)^2 (l_max+1) n) environment pairs that hold the l = l' blocks, in (l m, c) order.
        entries = [(l * l + m) * (config.l_max + 1) * n + l * n + c
                   for l in range(config.l_max + 1) for m in range(2 * l + 1) for c in range(n)]
        self.register_buffer("environment_entries", torch.tensor(entries), persistent=False)
        sh_degree = torch.tensor([l for l in range(config.l_max + 1) for _ in range(2 * l + 1)])
        self.register_buffer("sh_degree", sh_degree, persistent=False)
        self.sh_degree_readers = column_readers(sh_degree.tolist(), config.l_max + 1)
        # The same blocks as a 0/1 mask over the pairs' l' axis, ((l_max+1)^2, l_max+1, 1), for traced programs.
        mask = torch.zeros(len(sh_degree), config.l_max + 1, 1)
        mask[torch.arange(len(sh_degree)), sh_degree] = 1.0
        self.register_buffer("environment_mask", mask, persistent=False)
        self.register_buffer("harmonic_coefficients", torch.as_tensor(harmonic_matrix(config.l_max)), persistent=False)

    edge_chunk_size: int = 1024

    def _chunk_sizes(self, num_edges: int) -> list[int]:
        # A traced program (torch.compile, torch.export) sees a symbolic edge count: one chunk.
        if torch.compiler.is_compiling() or isinstance(num_edges, torch.SymInt):
            return [num_edges]
        if num_edges == 0:
            return [0]
        count = max(1, round(num_edges / self.edge_chunk_size))
        base, extra = divmod(num_edges, count)
        return [base + 1] * extra + [base] * (count - extra)

    # The neighbour-slot layout is used while it pads the edges by at most this factor.
    max_slot_padding: float = 2.0

    # The triton backend's sums to atoms and structures: segment sums in a fixed order (kernels.segments), so its
    # energies, forces and stress are bitwise the same on every call on CUDA too (index_add adds atomically there).
    def edge_vectors(self, graph: AtomicGraph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        if self.backend != "triton":
            return super().edge_vectors(graph, positions, cell)
        from .kernels.segments import gather_rows, segment_expand, sorted_order

        centers, neighbours = graph.edge_index
        num_atoms, num_edges = positions.shape[0], neighbours.shape[0]
        _, inverse, neighbour_ptr, sorted_neighbours = sorted_order(neighbours, num_atoms)
        differences = (gather_rows(positions, inverse, neighbour_ptr, sorted_neighbours)
                       - segment_expand(positions, graph.center_ptr, centers))
        shifts = graph.edge_shift.to(positions.dtype)
        if cell.shape[0] == 1:
            return differences + shifts @ cell[0]
        edge_cell = segment_expand(self.per_atom(cell, graph).reshape(num_atoms, 9), graph.center_ptr, centers)
        return differences + torch.bmm(shifts.unsqueeze(1), edge_cell.view(num_edges, 3, 3)).squeeze(1)

    def sum_to_centers(self, per_edge: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        if self.backend != "triton":
            return super().sum_to_centers(per_edge, graph)
        from .kernels.segments import segment_sum

        return segment_sum(per_edge.unsqueeze(1), graph.center_ptr, graph.edge_index[0]).squeeze(1)

    def sum_to_structures(self, per_atom: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        if self.backend != "triton":
            return super().sum_to_structures(per_atom, graph)
        from .kernels.segments import segment_sum

        return segment_sum(per_atom.unsqueeze(1), _atom_ptr(graph), graph.batch).squeeze(1)

    def per_atom(self, per_structure: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        if self.backend != "triton":
            return super().per_atom(per_structure, graph)
        from .kernels.segments import segment_expand

        flat = per_structure.reshape(per_structure.shape[0], -1)
        return segment_expand(flat, _atom_ptr(graph), graph.batch).view(-1, *per_structure.shape[1:])

    def per_edge_pair(self, table: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        if self.backend != "triton":
            return super().per_edge_pair(table, species, graph)
        from .kernels.segments import gather_rows, sorted_order

        flat = self.pair_table(table)
        _, inverse, ptr, sorted_types = sorted_order(self.edge_pair_types(species, graph), flat.shape[0])
        return gather_rows(flat.reshape(flat.shape[0], -1), inverse, ptr, sorted_types).view(-1, *flat.shape[1:])

    def edge_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        if self.backend == "triton":
            return self._triton_edge_energies(edge_vectors, species, graph)
        return self._torch_edge_energies(edge_vectors, species, graph)

    def _two_body(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph):
        """Per-edge geometry and the two-body latent: (x, envelope, sh, w0), shared by both torch layouts."""
        config = self.config
        radial, envelope, sh = edge_geometry(edge_vectors, self.bessel_frequencies, config.r_max,
                                             config.polynomial_p, self.harmonic_coefficients)
        x, w0 = self._two_body_latent(radial, envelope, species, graph)
        return x, envelope, sh, w0

    def _two_body_latent(self, radial: torch.Tensor, envelope: torch.Tensor, species: torch.Tensor,
                         graph: AtomicGraph) -> tuple[torch.Tensor, torch.Tensor]:
        """x^{ij,0} (E, F) and w^0 (E, l_max+1, n) from the Bessel basis (E, num_bessels) and envelope (E, 1)."""
        config = self.config
        center, neighbor = graph.edge_index
        # MLP_2b(onehot(Z_i) | onehot(Z_j) | B(r_ij)): the one-hot part of the first matmul is a row of a
        # (type pair, width) table, picked per edge instead of multiplied.
        num_types = config.num_types
        center_rows, neighbor_rows, radial_rows = self.two_body_mlp.first_weight().split(
            [num_types, num_types, config.num_bessels])
        pair_rows = (center_rows.unsqueeze(1) + neighbor_rows.unsqueeze(0)).view(num_types * num_types, -1)
        if num_types > 1:
            pair_rows = self.per_edge_pair(pair_rows, species, graph)
        hidden = torch.addmm(pair_rows, radial, radial_rows)  # one species: the single row is broadcast
        x = self.two_body_mlp.after_first(hidden) * envelope
        # V^{ij,0}_{(l,m),c} = w_{l,c} Y_{l,m} stays factored: the first layer's product uses w and Y.
        w0 = self.two_body_env_linear(x).view(radial.shape[0], config.l_max + 1, config.num_tensor_features)
        return x, w0

    def neighbor_slots(self, graph: AtomicGraph) -> int | None:
        """K for the neighbour-slot layout (the largest neighbour count), or None for the edge-list layout.
        A traced program uses the K its caller fixed (`AtomicGraph.fixed_slots`, see `export.ForceField`; 0: the
        edge-list layout), or else the edge-list layout (its edge count is symbolic); eager calls choose with
        `slot_count`."""
        if graph.fixed_slots is not None:
            return graph.fixed_slots or None
        num_edges = graph.edge_index.shape[1]
        if torch.compiler.is_compiling() or isinstance(num_edges, torch.SymInt):
            return None
        return self.slot_count(graph.center_ptr[1:] - graph.center_ptr[:-1], num_edges)

    def slot_count(self, neighbor_counts: torch.Tensor, num_edges: int) -> int | None:
        """K = the largest of the atoms' `neighbor_counts`, or None (edge-list layout) for the triton backend,
        graphs without edges, and where N K would pad the E edges by more than `max_slot_padding`."""
        if self.backend != "torch" or num_edges == 0:
            return None
        slots = int(neighbor_counts.max())
        return slots if neighbor_counts.shape[0] * slots <= self.max_slot_padding * num_edges else None

    def _torch_edge_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        slots = self.neighbor_slots(graph)
        if slots is not None:
            return self._slot_edge_energies(edge_vectors, species, graph, slots)
        return self._edge_list_energies(edge_vectors, species, graph)

    def _slot_edge_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph,
                            slots: int) -> torch.Tensor:
        """The torch backend in the neighbour-slot layout (see `NeighborSlots`)."""
        x, envelope, sh, w0 = self._two_body(edge_vectors, species, graph)
        layout = NeighborSlots.build(graph.edge_index[0], graph.center_ptr, graph.num_nodes, slots, sh)
        v = layout.to_slots(w0)  # the first layer reads w0 and Y
        folded = self.folded_scalars is not None and not self.unfolded
        for layer in self.layers[:-2] if folded else self.layers:
            x, v = self.slot_layer(layer, layout, x, v, envelope)
        if folded:
            x = self._folded_last_layers(layout, x, v, envelope)
        return self.readout_mlp(x).squeeze(-1)

    # True: the slot layout runs the last two layers as written (the folded form's test oracle).
    unfolded: bool = False

    def _folded_last_layers(self, layout: NeighborSlots, x: torch.Tensor, v: torch.Tensor,
                            envelope: torch.Tensor) -> torch.Tensor:
        """The last two layers in the slot layout with `FoldedScalarPaths`: the penultimate layer computes its
        scalar paths only; the last layer's scalars are one per-atom matmul of the penultimate layer's input."""
        penultimate, last = self.layers[-2:]
        environment = self.slot_environment(penultimate, layout, x)
        if penultimate.is_first:
            blocks = penultimate.tensor_product(v, layout.harmonics, environment, slots=layout.slots,
                                                irreps=((0, 1),))
            scalars = penultimate.tensor_product.scalars(blocks)
            # U = V^0 = w (x) Y, (N K, (l_max+1)^2, n)
            features = (repeat_columns(v, self.sh_degree, self.sh_degree_readers)
                        * layout.harmonics.unsqueeze(2))
        else:
            scalars = self.penultimate_scalars(v, environment, slots=layout.slots).flatten(1)
            features = v
        x = self.slot_update(penultimate, layout, x, scalars, envelope)
        next_environment = self.slot_environment(last, layout, x)
        scalars = self.folded_scalars(features, environment, next_environment, penultimate.mixing.weight,
                                      layout.slots).flatten(1)
        return self.slot_update(last, layout, x, scalars, envelope)

    def slot_environment(self, layer: TorchAllegroLayer, layout: NeighborSlots, x: torch.Tensor) -> torch.Tensor:
        """A_{i,(l,m),c} = sum_j Y_{(l,m)} w_{l,c} of one layer, (N, (l_max+1)^2, n), from x (E, F)."""
        config = self.config
        n, num_atoms = config.num_tensor_features, layout.num_atoms
        weights = layout.to_slots(layer.env_linear(x, scale=config.avg_num_neighbors**-0.5))
        # All (l, l') pairs in one matmul, then the l = l' blocks in one gather (slices and a cat would each
        # zero-fill a pairs-sized tensor in backward).
        pairs = torch.bmm(layout.harmonics_by_atom, weights.view(num_atoms, layout.slots, -1))
        if traced(pairs):
            # as a masked sum, a reduction: inductor stores it once per atom, where it inlined the gather into
            # every per-slot use (scalar loads through the index table)
            return (pairs.view(num_atoms, pairs.shape[1], -1, n) * self.environment_mask).sum(2)
        return pairs.view(num_atoms, -1).index_select(1, self.environment_entries).view(num_atoms, -1, n)

    def slot_update(self, layer: TorchAllegroLayer, layout: NeighborSlots, x: torch.Tensor, scalars: torch.Tensor,
                    envelope: torch.Tensor) -> torch.Tensor:
        """The latent MLP's residual update of x (E, F) from the layer's scalar paths (N K, S n) per slot."""
        return self.residual_update(x, layer.latent_mlp(x, select_unique(scalars, 0, layout.slot)), envelope)

    def residual_update(self, x: torch.Tensor, update: torch.Tensor, envelope: torch.Tensor) -> torch.Tensor:
        """x' = a x + b u(r) MLP(...): the latent MLP's output `update` (E, F) weighted by the envelope (E, 1), in
        two passes over (E, F) (a x, then one addcmul), and two more in backward."""
        config = self.config
        return torch.addcmul(config.residual_old_weight * x, update, envelope * config.residual_new_weight)

    def slot_layer(self, layer: TorchAllegroLayer, layout: NeighborSlots, x: torch.Tensor, v: torch.Tensor,
                   envelope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer in the slot layout: x (E, F) per edge, v (N K, D, n) per slot (w0 (N K, l_max+1, n) for the
        first layer) -> the new x and v (None after the last layer)."""
        environment = self.slot_environment(layer, layout, x)
        if layer.is_first:
            blocks = layer.tensor_product(v, layout.harmonics, environment, slots=layout.slots)
        else:
            blocks = layer.tensor_product.split(layer.tensor_product(v, environment, slots=layout.slots))
        scalars = layer.tensor_product.scalars(blocks)
        if layer.mixing is not None:
            v = layer.channel_mixing(blocks, layer.mixing.weight)
        x = self.slot_update(layer, layout, x, scalars, envelope)
        return x, (v if layer.mixing is not None else None)

    def _edge_list_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """The torch backend in the edge-list layout (traced programs, and graphs with very uneven
        neighbour counts): the environment is gathered per edge, edges are processed in chunks."""
        config = self.config
        n = config.num_tensor_features
        num_edges = edge_vectors.shape[0]
        center = graph.edge_index[0]
        x, envelope, sh, w0 = self._two_body(edge_vectors, species, graph)
        v = None

        norm = config.avg_num_neighbors**-0.5
        # Edges are processed in chunks after each environment sum, so that the large per-edge
        # intermediates of the tensor product stay in cache (split, whose backward is one cat).
        sizes = self._chunk_sizes(num_edges)
        sh_chunks, envelope_chunks, center_chunks = sh.split(sizes), envelope.split(sizes), center.split(sizes)
        w0_chunks = w0.split(sizes)
        for layer in self.layers:
            weights = layer.env_linear(x, scale=norm).view(num_edges, config.l_max + 1, n)
            env_per_edge = weights.index_select(1, self.sh_degree) * sh.unsqueeze(2)  # (E, (l_max+1)^2, n)
            environment = torch.zeros(graph.num_nodes, sh.shape[1], n, dtype=x.dtype, device=x.device)
            environment = environment.index_add(0, center, env_per_edge)
            x_chunks = x.split(sizes)
            v_chunks = v.split(sizes) if v is not None else None  # the first layer uses w0 and Y instead
            new_x, new_v = [], []
            for k in range(len(sizes)):
                local_env = environment.index_select(0, center_chunks[k])
                if layer.is_first:
                    blocks = layer.tensor_product(w0_chunks[k], sh_chunks[k], local_env)
                else:
                    blocks = layer.tensor_product.split(layer.tensor_product(v_chunks[k], local_env))
                scalars = layer.tensor_product.scalars(blocks)
                new_x.append(self.residual_update(x_chunks[k], layer.latent_mlp(x_chunks[k], scalars),
                                                  envelope_chunks[k]))
                if layer.mixing is not None:
                    new_v.append(layer.channel_mixing(blocks, layer.mixing.weight))
            x = torch.cat(new_x) if len(new_x) > 1 else new_x[0]
            if layer.mixing is not None:
                v = torch.cat(new_v) if len(new_v) > 1 else new_v[0]
        return self.readout_mlp(x).squeeze(-1)

    def _triton_forms(self) -> list[str]:
        """Register the layers' fused forms with the kernels (once per model): one key per layer."""
        if getattr(self, "_layer_keys", None) is None:
            from .kernels import tensor_product as kernels

            descriptions = describe_layers(self.config.num_layers, self.config.l_max, self.config.parity,
                                           self.config.num_tensor_features)
            keys = []
            for description, irreps, layer in zip(descriptions, self.input_irreps, self.layers):
                output_irreps = [] if layer.mixing is None else [group[0] for group in layer.channel_mixing.groups]
                # the first layer's kernels read w^0 and Y and form V^0 = w^0 (x) Y in registers
                form = kernels.fused_layer_form(description, irreps, layer.tensor_product, output_irreps,
                                                first=layer.is_first)
                keys.append(kernels.register_layer(form))
            self._layer_keys = keys
        return self._layer_keys

    def triton_layer(self, index: int, x: torch.Tensor, features: torch.Tensor, harmonics: torch.Tensor,
                     envelope: torch.Tensor, center_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer `index` through the fused kernel: (x^L, V^L or None in the last layer) from x^{L-1} (E, F),
        V^{L-1} (E, D_in, n) (for the first layer w^0 (E, l_max+1, n): the kernels form V^0 = w^0 (x) Y), Y, the
        envelope (E, 1)."""
        from .kernels.tensor_product import fused_layer

        config, layer = self.config, self.layers[index]
        n, num_edges = config.num_tensor_features, x.shape[0]
        key = self._triton_forms()[index]
        weights = layer.env_linear(x, scale=config.avg_num_neighbors**-0.5).view(num_edges, config.l_max + 1, n)
        if layer.mixing is None:
            mixing = x.new_zeros((0, n, n))
        else:
            weight = layer.mixing.weight if getattr(self, "parameter_gradients", True) else layer.mixing.weight.detach()
            mixing = torch.cat([layer.channel_mixing.group_weight(group, weight)
                                for group in range(len(layer.channel_mixing.groups))]).view(-1, n, n)
        scalars, mixed = fused_layer(key, weights, harmonics, features, mixing, center_ptr)
        x = self.residual_update(x, layer.latent_mlp(x, scalars.flatten(1)), envelope)
        return x, (mixed if layer.mixing is not None else None)

    def _triton_edge_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """The same function through the fused kernels: edge geometry, then one fused op per layer."""
        from .kernels.edge_geometry import edge_geometry

        config = self.config
        radial, envelope, sh = edge_geometry(edge_vectors, self.bessel_frequencies, config.r_max,
                                             config.polynomial_p, config.l_max)
        envelope = envelope.unsqueeze(-1)
        x, v = self._two_body_latent(radial, envelope, species, graph)
        for index in range(len(self.layers)):
            x, v = self.triton_layer(index, x, v, sh, envelope, graph.center_ptr)
        return self.readout_mlp(x).squeeze(-1)
