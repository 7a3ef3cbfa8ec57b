"""The reference Allegro: DESIGN section 1 in plain e3nn + torch, written to be read, not to be fast.

This model is the oracle: every other backend must reproduce its energies, forces, stress and parameter
gradients. It follows the equations step by step, with e3nn doing the equivariant pieces:

    x^{ij,0}  = MLP_2b(onehot(Z_i) || onehot(Z_j) || B(r_ij)) * u(r_ij)          (E, F)
    V^{ij,0}  = w^{ij,0}_{c,l} Y^{ij}_l,   w^{ij,0} = Linear(x^{ij,0})           (E, n * dim(SH))
    per layer L:
      A^{i,L}   = 1/sqrt(avg_num_neighbors) sum_k w^{ik,L}_{c,l2} Y^{ik}_{l2}      (N, n * dim(SH))
      T^{ij,L}  = TensorProduct_uuu(V^{ij,L-1}, A^{i,L})                          (E, n * sum of path dims)
      x^{ij,L}  = c_old x^{ij,L-1} + c_new MLP_L(x^{ij,L-1} || scalar paths of T) * u(r_ij)
      V^{ij,L}  = Linear_L(T^{ij,L})                     (all layers but the last)
    E_ij = MLP_out(x^{ij,N_layer})

The per-species-pair scale, the 1/sqrt(avg_num_neighbors) edge sum, the per-species scale and shift,
forces and stress live in `allegro_fast.potential.AllegroPotential`, shared with the other backends.
"""

from __future__ import annotations

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet
from torch import nn

from ..config import AllegroConfig
from ..graph import AtomicGraph
from ..potential import AllegroPotential
from ..radial import bessel_basis, polynomial_envelope
from ..tensor_product import LayerTensorProduct, describe_layers, irreps_string, spherical_harmonic_irreps


def scalar_mlp(widths: list[int]) -> FullyConnectedNet:
    """SiLU MLP without biases, weights N(0, 1) scaled by 1/sqrt(fan_in) (e3nn's FullyConnectedNet)."""
    return FullyConnectedNet(widths, torch.nn.functional.silu)


def scalar_linear(num_in: int, num_out: int) -> o3.Linear:
    return o3.Linear(f"{num_in}x0e", f"{num_out}x0e")


def weighted_spherical_harmonics(weights: torch.Tensor, harmonics: list[torch.Tensor], channels: int) -> torch.Tensor:
    """w_{c,l} Y_l for every channel c and degree l, in e3nn layout: (E, (l_max+1) n) -> (E, n dim(SH))."""
    weights = weights.view(len(weights), len(harmonics), channels)
    blocks = [weights[:, l, :, None] * harmonics[l][:, None, :] for l in range(len(harmonics))]
    return torch.cat([block.reshape(len(weights), -1) for block in blocks], dim=1)


class ReferenceLayer(nn.Module):
    def __init__(self, description: LayerTensorProduct, config: AllegroConfig) -> None:
        super().__init__()
        self.description = description
        n = config.num_tensor_features
        self.env_linear = scalar_linear(config.num_scalar_features, n * (config.l_max + 1))
        path_irreps = "+".join(f"{n}x{irreps_string((p.irrep_out,), 1)[2:]}" for p in description.paths)
        self.tensor_product = o3.TensorProduct(
            irreps_string(description.irreps_in1, n),
            irreps_string(description.irreps_in2, n),
            path_irreps,
            [(p.in1, p.in2, p.index, "uuu", False) for p in description.paths],
        )
        self.latent_mlp = scalar_mlp(
            [config.num_scalar_features + description.num_scalar_features, *config.latent_mlp_hidden,
             config.num_scalar_features]
        )
        if description.is_last:
            self.mixing = None
        else:
            self.mixing = o3.Linear(path_irreps, irreps_string(description.irreps_out, n))
        path_dims = [n * (2 * p.l_out + 1) for p in description.paths]
        starts = torch.tensor([0, *path_dims]).cumsum(0)
        self.scalar_slices = [(int(starts[i]), int(starts[i + 1])) for i in description.scalar_paths]


class ReferenceAllegro(AllegroPotential):
    """Allegro in plain e3nn; see the module docstring for the equations."""

    def build(self, config: AllegroConfig) -> None:
        n, width = config.num_tensor_features, config.num_scalar_features
        sh_irreps = spherical_harmonic_irreps(config.l_max, config.parity)
        self.spherical_harmonics = o3.SphericalHarmonics(
            irreps_string(sh_irreps, 1), normalize=True, normalization="component"
        )
        self.two_body_mlp = scalar_mlp([2 * config.num_types + config.num_bessels, *config.two_body_mlp_hidden, width])
        self.two_body_env_linear = scalar_linear(width, n * (config.l_max + 1))
        self.layers = nn.ModuleList(
            ReferenceLayer(description, config)
            for description in describe_layers(config.num_layers, config.l_max, config.parity, n)
        )
        self.readout_mlp = scalar_mlp([width, *config.readout_mlp_hidden, 1])

    def edge_energies(self, edge_vectors: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        config = self.config
        n = config.num_tensor_features
        center, neighbor = graph.edge_index
        lengths = torch.linalg.norm(edge_vectors, dim=1)
        envelope = polynomial_envelope(lengths, config.r_max, config.polynomial_p).unsqueeze(-1)
        sh = self.spherical_harmonics(edge_vectors)
        harmonics = [sh[:, l * l:(l + 1) * (l + 1)] for l in range(config.l_max + 1)]

        onehot = nn.functional.one_hot(species, config.num_types).to(edge_vectors.dtype)
        radial = bessel_basis(lengths, self.bessel_frequencies, config.r_max)
        x = self.two_body_mlp(torch.cat([onehot[center], onehot[neighbor], radial], dim=1)) * envelope
        v = weighted_spherical_harmonics(self.two_body_env_linear(x), harmonics, n)

        for layer in self.layers:
            env_per_edge = weighted_spherical_harmonics(layer.env_linear(x), harmonics, n)
            environment = torch.zeros(graph.num_nodes, env_per_edge.shape[1], dtype=x.dtype, device=x.device)
            environment = environment.index_add(0, center, env_per_edge) / config.avg_num_neighbors**0.5
            paths = layer.tensor_product(v, environment[center])
            scalars = torch.cat([paths[:, start:stop] for start, stop in layer.scalar_slices], dim=1)
            update = layer.latent_mlp(torch.cat([x, scalars], dim=1)) * envelope
            x = config.residual_old_weight * x + config.residual_new_weight * update
            if layer.mixing is not None:
                v = layer.mixing(paths)

        return self.readout_mlp(x).squeeze(-1)
