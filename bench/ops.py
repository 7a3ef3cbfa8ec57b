"""The three Allegro ops as standalone callables, one setup per provider, for profiling (bench/kernels, roofline).

An op case holds random inputs (never zeros) on a synthetic graph of E directed edges whose centers are
sorted (as AtomicGraph sorts them), N = E / 28 atoms (about fcc Ag's neighbour count at r_max 5 Å), and
a function of those inputs that returns the op's outputs:

- edge_geometry: edge vectors r_ij (E, 3) -> Bessel basis (E, N_b), envelope u (E, 1), spherical
  harmonics Y (E, (l_max+1)^2) (lengths are computed inside).
- layer: one Allegro layer (DESIGN section 1, item 4) of a 3-layer model: environment weights, the
  environment sum over each center's edges, the channel-wise tensor product, the latent MLP with the
  residual update, and channel mixing. position "middle" (default) is the general layer; "first" takes
  V^0 in factored form (w, Y); "last" computes only the scalar paths and has no channel mixing.
  Inputs: x^{L-1} (E, F), V^{L-1} (or w^0), Y, u; outputs: x^L (E, F) and V^L (not in the last layer).
- readout: x (E, F) -> E_ij = MLP_out(x), summed over each center's edges -> atomic energies (N,).

Passes (`run_pass`): "forward" builds the autograd graph as force evaluation does; "backward" is the
vector-Jacobian product of the outputs with fixed random cotangents, with respect to the inputs and
the parameters; "double_backward" differentiates the input gradients of the first pass again (with
respect to inputs and parameters), as force-matching training does.

Providers: "torch" (allegro_fast's torch backend, the modules of `allegro_fast.Allegro`), "reference"
(`allegro_fast.reference.ReferenceAllegro`, e3nn), "triton" (`allegro_fast.kernels`, where it exposes
the op; CUDA, or the CPU interpreter for tiny sizes only). `provider_unavailable` says why a provider
cannot run here, or returns None.

The torch and reference layer functions follow the loop bodies of `Allegro.edge_energies` and
`ReferenceAllegro.edge_energies`; keep them in step when those change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

import allegro_fast as af
from allegro_fast.radial import bessel_basis, polynomial_envelope

OPS = ("edge_geometry", "layer", "readout")
PASSES = ("forward", "backward", "double_backward")
PROVIDERS = ("torch", "reference", "triton")
NEIGHBOURS_PER_ATOM = 28


@dataclasses.dataclass
class OpCase:
    """Inputs (leaf tensors that require grad), parameters, and fn(*inputs) -> tuple of outputs."""

    name: str
    provider: str
    inputs: tuple[torch.Tensor, ...]
    parameters: tuple[torch.Tensor, ...]
    fn: Callable[..., tuple[torch.Tensor, ...]]
    num_edges: int
    num_nodes: int
    config: af.AllegroConfig
    model: torch.nn.Module

    def __call__(self) -> tuple[torch.Tensor, ...]:
        return self.fn(*self.inputs)


def triton_ops() -> dict:
    """The Triton ops that allegro_fast.kernels exposes now, by the op they implement.

    layer: kernels.tensor_product.fused_layer (fused environment sum, channel-wise product and channel mixing;
    the MLPs stay torch, as in Allegro(backend="triton")); edge_geometry: kernels.edge_geometry.edge_geometry.
    """
    found = {}
    try:
        from allegro_fast.kernels import tensor_product
    except ImportError:
        return found
    if hasattr(tensor_product, "fused_layer"):
        found["layer"] = tensor_product
    try:
        from allegro_fast.kernels.edge_geometry import edge_geometry
    except ImportError:
        return found
    found["edge_geometry"] = edge_geometry
    return found


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def provider_unavailable(provider: str, op: str, device: torch.device) -> str | None:
    """Why this provider cannot run this op on this device, or None."""
    if provider in ("torch", "reference"):
        return None
    if provider != "triton":
        return f"unknown provider {provider}"
    if op == "readout":
        return "the readout is plain torch in every backend (no Triton op)"
    if op not in triton_ops():
        return f"allegro_fast.kernels has no Triton op for {op} yet"
    if device.type != "cuda" and not interpreter_active():
        return "Triton needs CUDA (or TRITON_INTERPRET=1 for tiny correctness-only sizes)"
    return None


def op_config(l_max: int, channels: int, num_edges: int, num_layers: int = 3, **overrides) -> af.AllegroConfig:
    return af.AllegroConfig(
        type_names=("Ag", "O"), l_max=l_max, num_tensor_features=channels, num_layers=num_layers,
        avg_num_neighbors=float(NEIGHBOURS_PER_ATOM), **overrides,
    )


def synthetic_edges(num_edges: int, r_max: float, device, dtype, generator: torch.Generator):
    """Sorted centers, random neighbours, edge vectors with lengths uniform in [0.3, 0.98] r_max."""
    num_nodes = max(2, num_edges // NEIGHBOURS_PER_ATOM)
    center = torch.sort(torch.randint(0, num_nodes, (num_edges,), generator=generator)).values
    neighbor = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(num_edges, 3, generator=generator, dtype=torch.float64), dim=1)
    length = r_max * (0.3 + 0.68 * torch.rand(num_edges, 1, generator=generator, dtype=torch.float64))
    vectors = (direction * length).to(device=device, dtype=dtype)
    species = torch.randint(0, 2, (num_nodes,), generator=generator)
    return center.to(device), neighbor.to(device), vectors, species.to(device), num_nodes


def _model(provider: str, config: af.AllegroConfig, device, dtype):
    model = af.reference.ReferenceAllegro(config) if provider == "reference" else af.Allegro(config, backend="torch")
    return model.to(device=device, dtype=dtype)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_(True)


def make_op(op: str, provider: str, *, num_edges: int, channels: int = 16, l_max: int = 2, dtype=torch.float32,
            device="cpu", position: str = "middle", seed: int = 0) -> OpCase:
    """Build one op case; see the module docstring."""
    device = torch.device(device)
    reason = provider_unavailable(provider, op, device)
    if reason:
        raise RuntimeError(reason)
    generator = torch.Generator().manual_seed(seed)
    config = op_config(l_max, channels, num_edges)
    model_provider = "torch" if provider == "triton" else provider
    torch.manual_seed(seed)
    model = _model(model_provider, config, device, dtype)
    center, _, vectors, _, num_nodes = synthetic_edges(num_edges, config.r_max, device, dtype, generator)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    common = dict(name=op, provider=provider, num_edges=num_edges, num_nodes=num_nodes, config=config, model=model)
    if op == "edge_geometry":
        return _edge_geometry(provider, model, config, _leaf(vectors), common)
    if op == "readout":
        x = _leaf(rand(num_edges, config.num_scalar_features))
        return _readout(provider, model, config, x, center, num_nodes, common)
    if op == "layer":
        return _layer(provider, model, config, position, center, num_nodes, vectors, rand, common)
    raise ValueError(f"unknown op {op}; choose one of {OPS}")


# ------------------------------------------------------------------------------------------------
# edge geometry
# ------------------------------------------------------------------------------------------------
def _edge_geometry(provider, model, config, vectors, common) -> OpCase:
    frequencies = model.bessel_frequencies

    if provider == "triton":
        edge_geometry = triton_ops()["edge_geometry"]

        def fn(edge_vectors):  # (bessel (E, N_b), envelope (E,), harmonics (E, (l_max+1)^2)) in one kernel
            return tuple(edge_geometry(edge_vectors, frequencies, config.r_max, config.polynomial_p, config.l_max))
    elif provider == "reference":
        def fn(edge_vectors):
            lengths = torch.linalg.norm(edge_vectors, dim=1)
            envelope = polynomial_envelope(lengths, config.r_max, config.polynomial_p).unsqueeze(-1)
            return bessel_basis(lengths, frequencies, config.r_max), envelope, model.spherical_harmonics(edge_vectors)
    else:  # the torch backend's own few-op geometry (allegro_fast.geometry)
        from allegro_fast.geometry import edge_geometry

        def fn(edge_vectors):
            return edge_geometry(edge_vectors, frequencies, config.r_max, config.polynomial_p,
                                 model.harmonic_coefficients)

    return OpCase(inputs=(vectors,), parameters=(), fn=fn, **common)


# ------------------------------------------------------------------------------------------------
# readout
# ------------------------------------------------------------------------------------------------
def _readout(provider, model, config, x, center, num_nodes, common) -> OpCase:
    norm = config.avg_num_neighbors ** -0.5

    def fn(latent):
        edge_energy = model.readout_mlp(latent).squeeze(-1)
        summed = torch.zeros(num_nodes, dtype=edge_energy.dtype, device=edge_energy.device)
        return (summed.index_add(0, center, edge_energy) * norm,)

    return OpCase(inputs=(x,), parameters=tuple(model.readout_mlp.parameters()), fn=fn, **common)


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------
def layer_index(position: str, num_layers: int = 3) -> int:
    return {"first": 0, "middle": 1, "last": num_layers - 1}[position]


def _layer(provider, model, config, position, center, num_nodes, vectors, rand, common) -> OpCase:
    from allegro_fast.model import spherical_harmonics

    index = layer_index(position, config.num_layers)
    layer = model.layers[index]
    n, num_edges = config.num_tensor_features, vectors.shape[0]
    lengths = torch.linalg.norm(vectors, dim=1)
    envelope = polynomial_envelope(lengths, config.r_max, config.polynomial_p).unsqueeze(-1).detach()
    sh = spherical_harmonics(vectors, config.l_max).detach()
    x = _leaf(rand(num_edges, config.num_scalar_features))
    parameters = tuple(layer.parameters())

    if provider == "reference":
        description = layer.description
        in_dim = n * sum(2 * l + 1 for l, _ in description.irreps_in1)
        features = _leaf(rand(num_edges, in_dim))
        fn = _reference_layer_fn(model, layer, config, sh, envelope, center, num_nodes)
        return OpCase(inputs=(x, features), parameters=parameters, fn=fn, **common)

    if position == "first":
        features = _leaf(rand(num_edges, config.l_max + 1, n))  # w^0, V^0 = w^0 (x) Y
    else:  # V: channels last
        in_dim = sum(2 * l + 1 for l, _ in model.input_irreps[index])
        features = _leaf(rand(num_edges, in_dim, n))
    if provider == "triton":
        fn = _triton_layer_fn(model, index, sh, envelope, center, num_nodes)
    else:
        fn = _torch_layer_fn(model, layer, config, sh, envelope, center, num_nodes)
    return OpCase(inputs=(x, features), parameters=parameters, fn=fn, **common)


def _torch_layer_fn(model, layer, config, sh, envelope, center, num_nodes):
    """One layer of `Allegro.edge_energies` (torch backend, neighbour-slot layout): `Allegro.slot_layer`."""
    from allegro_fast.model import NeighborSlots

    center_ptr = torch.searchsorted(center, torch.arange(num_nodes + 1, device=center.device))
    slots = int((center_ptr[1:] - center_ptr[:-1]).max())
    layout = NeighborSlots.build(center, center_ptr, num_nodes, slots, sh)

    def fn(x, features):
        new_x, v = model.slot_layer(layer, layout, x, layout.to_slots(features), envelope)
        return (new_x,) if v is None else (new_x, v.index_select(0, layout.slot))

    return fn


def _reference_layer_fn(model, layer, config, sh, envelope, center, num_nodes):
    """One layer of `ReferenceAllegro.edge_energies` (e3nn)."""
    from allegro_fast.reference.model import weighted_spherical_harmonics

    n = config.num_tensor_features
    harmonics = [sh[:, l * l:(l + 1) * (l + 1)] for l in range(config.l_max + 1)]

    def fn(x, features):
        env_per_edge = weighted_spherical_harmonics(layer.env_linear(x), harmonics, n)
        environment = torch.zeros(num_nodes, env_per_edge.shape[1], dtype=x.dtype, device=x.device)
        environment = environment.index_add(0, center, env_per_edge) / config.avg_num_neighbors ** 0.5
        paths = layer.tensor_product(features, environment[center])
        scalars = torch.cat([paths[:, start:stop] for start, stop in layer.scalar_slices], dim=1)
        update = layer.latent_mlp(torch.cat([x, scalars], dim=1)) * envelope
        new_x = config.residual_old_weight * x + config.residual_new_weight * update
        return (new_x,) if layer.mixing is None else (new_x, layer.mixing(paths))

    return fn


def _triton_layer_fn(model, index, sh, envelope, center, num_nodes):
    """One layer of `Allegro(backend="triton")`: `Allegro.triton_layer`, the fused kernel (environment sum,
    tensor product and channel mixing; neither the environment nor the product reaches memory) between the
    torch environment-weight linear and latent MLP."""
    center_ptr = torch.searchsorted(center, torch.arange(num_nodes + 1, device=center.device))

    def fn(x, features):
        new_x, v = model.triton_layer(index, x, features, sh, envelope, center_ptr)
        return (new_x,) if v is None else (new_x, v)

    return fn


# ------------------------------------------------------------------------------------------------
# passes
# ------------------------------------------------------------------------------------------------
def cotangents_like(tensors, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
                 for t in tensors)


def prepare_pass(case: OpCase, pass_name: str) -> Callable[[], object]:
    """Everything a pass needs before the timed part; returns the timed callable (no arguments).

    forward: the callable runs the op. backward: the forward runs here, the callable takes the VJP
    (retain_graph so it can be called again). double_backward: forward and first gradient (create_graph)
    run here, the callable differentiates the input gradients again.
    """
    if pass_name == "forward":
        return case
    wrt = case.inputs + case.parameters
    outputs = case()
    cotangents = cotangents_like(outputs)
    if pass_name == "backward":
        return lambda: torch.autograd.grad(outputs, wrt, cotangents, retain_graph=True, allow_unused=True)
    if pass_name != "double_backward":
        raise ValueError(f"unknown pass {pass_name}; choose one of {PASSES}")
    first = torch.autograd.grad(outputs, case.inputs, cotangents, create_graph=True)
    differentiable = [(g, c) for g, c in zip(first, cotangents_like(first, seed=2)) if g is not None and g.requires_grad]
    grads, second_cotangents = zip(*differentiable)
    return lambda: torch.autograd.grad(grads, wrt, second_cotangents, retain_graph=True, allow_unused=True)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
