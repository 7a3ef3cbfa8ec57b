"""Edge geometry of Allegro in one Triton kernel: lengths, Bessel basis, polynomial envelope, spherical harmonics.

Math (DESIGN section 1, items 1 and 2), for every edge vector v (E, 3), r = |v|, u = v / r, s = r / r_c:

    bessel   (E, N_b)        B_b = sqrt(2 / r_c) sin(w_b s) / r          w_b the (maybe trainable) frequencies
    envelope (E,)            1 - (p+1)(p+2)/2 s^p + p(p+2) s^(p+1) - p(p+1)/2 s^(p+2) for s < 1, else 0
    harmonics (E, (l+1)^2)   e3nn's component-normalised real spherical harmonics Y_lm(u), l = 0..l_max

Y_l is a homogeneous polynomial of degree l in u. Its monomial coefficients are not typed in:
`allegro_fast.geometry.harmonic_polynomials` fits them to e3nn's own `spherical_harmonics` (an exact linear
solve in float64: degree-l monomials are linearly independent on the sphere), and the kernels are generated
from them, derivatives included.

Backward (a second generated kernel, one program per block of edges, no reductions): the gradient with respect
to v, g_v = g_r u + (g_u - (g_u . u) u) / r with g_r from the Bessel and envelope cotangents and g_u from the
harmonics cotangent, and, for trainable frequencies, the per-edge gradient that is summed over edges in torch.
Double backward (force training differentiates forces, i.e. this backward, once more): a third generated kernel,
also one program per block of edges, with the second derivatives written out. With a cotangent h of g_v (and h_w of
the frequencies' gradient), a = h . u, P = 1 - u u^T, g_u = sum_k g_Yk grad Y_k and H = sum_k g_Yk hess Y_k (the
harmonics' polynomials in u), q = u . g_u, G_r and G_r' the sums over the Bessel and envelope cotangents of the
first and second r-derivatives:

    to g_B, g_env        dB/dr a (+ h_w dB/dw),  d env/dr a
    to g_Y               grad Y_k . P h / r
    to v                 (G_r' a + F - T / r) u + (G_r P h + P X / r) / r,   T = (h . g_u - a q) / r,
                         X = H h - a (g_u + H u) - q h,   F = sum_b h_w g_B d2B/dr dw
    to w (per edge)      g_B (d2B/dr dw a + h_w d2B/dw2)

It replaces ~380 small torch ops per training step (the same derivatives by torch autograd through
`edge_geometry_ref`, which stays its oracle and its own derivative: third derivatives, for gradgradcheck only).
"""

from __future__ import annotations

import math

import torch

from allegro_fast.geometry import harmonic_polynomials
from allegro_fast.radial import envelope_coefficients

from ._common import ensure_triton_device, nvtx_range, selected_kernel
from .tensor_product import _load_generated, function_source


def edge_geometry_ref(vectors: torch.Tensor, frequencies: torch.Tensor, r_max: float, p: int, l_max: int):
    """Plain-torch reference: (bessel (E, N_b), envelope (E,), harmonics (E, (l_max+1)^2))."""
    from e3nn.o3 import spherical_harmonics

    from allegro_fast.radial import bessel_basis, polynomial_envelope

    lengths = torch.linalg.norm(vectors, dim=1)
    harmonics = spherical_harmonics(list(range(l_max + 1)), vectors, normalize=True, normalization="component")
    return bessel_basis(lengths, frequencies, r_max), polynomial_envelope(lengths, r_max, p), harmonics


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[float, str] = {}

    def emit(self, text: str) -> None:
        self.lines.append("    " + text)

    def constant(self, value: float) -> str:
        if value not in self.constants:
            self.constants[value] = f"k{len(self.constants)}"
        return self.constants[value]

    def function(self, name: str, arguments: str, constants_at: int) -> str:
        return function_source(name, arguments, self.lines, self.constants, constants_at)


def _power(source: _Source, base: str, exponent: int, cache: dict) -> str:
    """Variable holding base**exponent (exponent >= 1), built from cached lower powers."""
    if exponent == 1:
        return base
    if (base, exponent) not in cache:
        half = _power(source, base, exponent // 2, cache)
        variable = f"{base}_pow{exponent}"
        if exponent % 2:
            source.emit(f"{variable} = {half} * {half} * {base}")
        else:
            source.emit(f"{variable} = {half} * {half}")
        cache[(base, exponent)] = variable
    return cache[(base, exponent)]


def _monomial(source: _Source, powers: tuple[int, int, int], cache: dict) -> str | None:
    factors = [_power(source, axis, k, cache) for axis, k in zip(("ux", "uy", "uz"), powers) if k > 0]
    return " * ".join(factors) if factors else None


def _polynomial(source: _Source, terms, cache: dict) -> str:
    parts = []
    for powers, coefficient in terms:
        monomial = _monomial(source, powers, cache)
        constant = source.constant(coefficient)
        parts.append(f"{constant} * {monomial}" if monomial else f"{constant} + zero")
    return " + ".join(parts) if parts else "zero"


_PREAMBLE = [
    "pid = tl.program_id(0).to(tl.int64)",
    "edges = pid * BLOCK_E + tl.arange(0, BLOCK_E)",
    "mask = edges < num_edges",
    "DTYPE = vectors_ptr.dtype.element_ty",
]
_GEOMETRY = [
    "vx = tl.load(vectors_ptr + edges * 3 + 0, mask=mask, other=1.0)",
    "vy = tl.load(vectors_ptr + edges * 3 + 1, mask=mask, other=0.0)",
    "vz = tl.load(vectors_ptr + edges * 3 + 2, mask=mask, other=0.0)",
    "r = tl.sqrt(vx * vx + vy * vy + vz * vz)",
    "inv_r = 1.0 / r",
    "ux = vx * inv_r",
    "uy = vy * inv_r",
    "uz = vz * inv_r",
    "zero = tl.zeros((BLOCK_E,), dtype=DTYPE)",
    "s = r * inv_r_max",
    "basis = tl.arange(0, BLOCK_B)",
    "basis_mask = basis < num_basis",
    "frequencies = tl.load(frequencies_ptr + basis, mask=basis_mask, other=0.0)",
    "argument = frequencies[None, :] * s[:, None]",
    "tile_mask = mask[:, None] & basis_mask[None, :]",
]


KINDS = ("forward", "backward", "double_backward")


def _lowered(terms, axis: int):
    """The monomial terms of a polynomial's derivative along `axis` (0, 1, 2: ux, uy, uz)."""
    derivative = []
    for powers, coefficient in terms:
        if powers[axis] > 0:
            lowered = list(powers)
            lowered[axis] -= 1
            derivative.append((tuple(lowered), coefficient * powers[axis]))
    return derivative


def _generate(l_max: int, p: int, r_max: float, kind: str) -> tuple[str, str]:
    source = _Source()
    for line in _PREAMBLE:
        source.emit(line)
    constants_at = len(source.lines)
    source.emit(f"inv_r_max = {source.constant(1.0 / r_max)}")
    source.emit(f"prefactor = {source.constant(math.sqrt(2.0 / r_max))}")
    for line in _GEOMETRY:
        source.emit(line)
    a, b, c = envelope_coefficients(p)
    cache: dict = {}
    s_p1 = _power(source, "s", p - 1, cache) if p > 1 else None
    s_p = f"{s_p1} * s" if s_p1 else "s"
    source.emit(f"s_p = {s_p}")
    harmonics = harmonic_polynomials(l_max)
    if kind == "forward":
        name = "edge_geometry_kernel"
        arguments = ("vectors_ptr, frequencies_ptr, bessel_ptr, envelope_ptr, harmonics_ptr, num_edges, num_basis, "
                     "BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr")
        source.emit(f"envelope = 1.0 - {source.constant(a)} * s_p + {source.constant(b)} * s_p * s - "
                    f"{source.constant(c)} * s_p * s * s")
        source.emit("envelope = tl.where(s < 1.0, envelope, zero)")
        source.emit("tl.store(envelope_ptr + edges, envelope, mask=mask)")
        source.emit("bessel = prefactor * tl.sin(argument) * inv_r[:, None]")
        source.emit("tl.store(bessel_ptr + edges[:, None] * num_basis + basis[None, :], bessel, mask=tile_mask)")
        for column, terms in enumerate(harmonics):
            source.emit(f"tl.store(harmonics_ptr + edges * {len(harmonics)} + {column}, "
                        f"{_polynomial(source, terms, cache)}, mask=mask)")
        return name, source.function(name, arguments, constants_at)

    # d envelope / dr = (1/r_c) (-a p s^(p-1) + b (p+1) s^p - c (p+2) s^(p+1)) inside the cutoff
    s_low = s_p1 if s_p1 else "1.0"
    source.emit(f"d_envelope = inv_r_max * (-{source.constant(a * p)} * {s_low} + {source.constant(b * (p + 1))} "
                f"* s_p - {source.constant(c * (p + 2))} * s_p * s)")
    source.emit("d_envelope = tl.where(s < 1.0, d_envelope, zero)")
    source.emit("grad_envelope = tl.load(grad_envelope_ptr + edges, mask=mask, other=0.0)")
    source.emit("grad_bessel = tl.load(grad_bessel_ptr + edges[:, None] * num_basis + basis[None, :], "
                "mask=tile_mask, other=0.0)")
    source.emit("sine = tl.sin(argument)")
    source.emit("cosine = tl.cos(argument)")
    # dB/dr = sqrt(2/r_c) (w cos(w s) / (r_c r) - sin(w s) / r^2)
    source.emit("d_bessel = prefactor * inv_r[:, None] * (frequencies[None, :] * inv_r_max * cosine - "
                "sine * inv_r[:, None])")
    source.emit("grad_r = tl.sum(grad_bessel * d_bessel, axis=1) + grad_envelope * d_envelope")
    if kind == "double_backward":
        return _generate_double_backward(source, constants_at, harmonics, cache, p, (a, b, c))

    name = "edge_geometry_backward_kernel"
    arguments = ("vectors_ptr, frequencies_ptr, grad_bessel_ptr, grad_envelope_ptr, grad_harmonics_ptr, "
                 "grad_vectors_ptr, grad_frequencies_ptr, num_edges, num_basis, BLOCK_E: tl.constexpr, "
                 "BLOCK_B: tl.constexpr, FREQUENCY_GRAD: tl.constexpr")
    source.emit("if FREQUENCY_GRAD:")
    source.emit("    d_frequency = prefactor * inv_r_max * cosine")
    source.emit("    tl.store(grad_frequencies_ptr + edges[:, None] * num_basis + basis[None, :], "
                "grad_bessel * d_frequency, mask=tile_mask)")
    for axis in range(3):
        source.emit(f"grad_u{axis} = zero")
    for column, terms in enumerate(harmonics):
        if not any(sum(powers) > 0 for powers, _ in terms):
            continue
        source.emit(f"g_sh = tl.load(grad_harmonics_ptr + edges * {len(harmonics)} + {column}, mask=mask, other=0.0)")
        for axis in range(3):
            derivative = _lowered(terms, axis)
            if derivative:
                source.emit(f"grad_u{axis} += g_sh * ({_polynomial(source, derivative, cache)})")
    source.emit("radial_part = grad_u0 * ux + grad_u1 * uy + grad_u2 * uz")
    for axis, component in enumerate(("ux", "uy", "uz")):
        source.emit(f"tl.store(grad_vectors_ptr + edges * 3 + {axis}, grad_r * {component} + "
                    f"(grad_u{axis} - radial_part * {component}) * inv_r, mask=mask)")
    return name, source.function(name, arguments, constants_at)


def _generate_double_backward(source: _Source, constants_at: int, harmonics, cache: dict, p: int,
                              envelope: tuple[float, float, float]) -> tuple[str, str]:
    """The double backward's body after the backward's shared lines (see the module docstring for the formulas):
    the cotangents h of the vectors' gradient and (HAS_FREQUENCY_COTANGENT) h_w of the frequencies'; out: the
    gradients to the vectors, the frequencies (per edge, FREQUENCY_GRAD) and the three incoming cotangents."""
    name = "edge_geometry_double_backward_kernel"
    arguments = ("vectors_ptr, frequencies_ptr, grad_bessel_ptr, grad_envelope_ptr, grad_harmonics_ptr, "
                 "cotangent_vectors_ptr, cotangent_frequencies_ptr, out_vectors_ptr, out_frequencies_ptr, "
                 "out_bessel_ptr, out_envelope_ptr, out_harmonics_ptr, num_edges, num_basis, BLOCK_E: tl.constexpr, "
                 "BLOCK_B: tl.constexpr, HAS_FREQUENCY_COTANGENT: tl.constexpr, FREQUENCY_GRAD: tl.constexpr")
    a, b, c = envelope
    # d2 envelope / dr2 = (1/r_c^2) (-a p (p-1) s^(p-2) + b (p+1) p s^(p-1) - c (p+2)(p+1) s^p)
    terms = [f"{source.constant(b * (p + 1) * p)} * {_power(source, 's', p - 1, cache) if p > 1 else '1.0'}",
             f"-{source.constant(c * (p + 2) * (p + 1))} * s_p"]
    if p > 1:
        terms.insert(0, f"-{source.constant(a * p * (p - 1))} * "
                        f"{_power(source, 's', p - 2, cache) if p > 2 else '1.0'}")
    source.emit(f"dd_envelope = inv_r_max * inv_r_max * ({' + '.join(terms)})")
    source.emit("dd_envelope = tl.where(s < 1.0, dd_envelope, zero)")
    for axis, component in enumerate(("x", "y", "z")):
        source.emit(f"h{axis} = tl.load(cotangent_vectors_ptr + edges * 3 + {axis}, mask=mask, other=0.0)")
    source.emit("along = h0 * ux + h1 * uy + h2 * uz")  # a = h . u
    for axis, component in enumerate(("ux", "uy", "uz")):
        source.emit(f"ph{axis} = h{axis} - along * {component}")  # P h
    # d2B/dr2 = sqrt(2/r_c) / r (-w^2 sin / r_c^2 - 2 w cos / (r_c r) + 2 sin / r^2),
    # d2B/(dr dw) = -sqrt(2/r_c) w sin / r_c^2
    source.emit("scaled = frequencies[None, :] * inv_r_max")
    source.emit("dd_bessel = prefactor * inv_r[:, None] * (-scaled * scaled * sine - 2.0 * scaled * cosine * "
                "inv_r[:, None] + 2.0 * sine * inv_r[:, None] * inv_r[:, None])")
    source.emit("d_bessel_frequency = -prefactor * scaled * inv_r_max * sine")
    source.emit("grad_rr = tl.sum(grad_bessel * dd_bessel, axis=1) + grad_envelope * dd_envelope")
    source.emit("out_bessel = d_bessel * along[:, None]")
    source.emit("if HAS_FREQUENCY_COTANGENT:")
    source.emit("    cotangent_frequencies = tl.load(cotangent_frequencies_ptr + basis, mask=basis_mask, "
                "other=0.0)[None, :]")
    source.emit("    out_bessel += cotangent_frequencies * prefactor * inv_r_max * cosine")  # h_w dB/dw
    source.emit("    frequency_part = tl.sum(cotangent_frequencies * grad_bessel * d_bessel_frequency, axis=1)")
    source.emit("else:")
    source.emit("    frequency_part = zero")
    source.emit("tl.store(out_bessel_ptr + edges[:, None] * num_basis + basis[None, :], out_bessel, mask=tile_mask)")
    source.emit("tl.store(out_envelope_ptr + edges, d_envelope * along, mask=mask)")
    source.emit("if FREQUENCY_GRAD:")
    source.emit("    out_frequencies = grad_bessel * d_bessel_frequency * along[:, None]")
    source.emit("    if HAS_FREQUENCY_COTANGENT:")  # d2B/dw2 = -sqrt(2/r_c) s sin / r_c
    source.emit("        out_frequencies -= cotangent_frequencies * grad_bessel * prefactor * inv_r_max * s[:, None] "
                "* sine")
    source.emit("    tl.store(out_frequencies_ptr + edges[:, None] * num_basis + basis[None, :], out_frequencies, "
                "mask=tile_mask)")
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    for axis in range(3):
        source.emit(f"grad_u{axis} = zero")
    for i, j in pairs:
        source.emit(f"hess_{i}{j} = zero")
    for column, terms in enumerate(harmonics):
        target = f"out_harmonics_ptr + edges * {len(harmonics)} + {column}"
        if not any(sum(powers) > 0 for powers, _ in terms):
            source.emit(f"tl.store({target}, zero, mask=mask)")
            continue
        source.emit(f"g_sh = tl.load(grad_harmonics_ptr + edges * {len(harmonics)} + {column}, mask=mask, other=0.0)")
        directional = []
        for axis in range(3):
            derivative = _lowered(terms, axis)
            if derivative:
                source.emit(f"d_sh{axis} = {_polynomial(source, derivative, cache)}")
                source.emit(f"grad_u{axis} += g_sh * d_sh{axis}")
                directional.append(f"d_sh{axis} * ph{axis}")
        source.emit(f"tl.store({target}, ({' + '.join(directional)}) * inv_r, mask=mask)")
        for i, j in pairs:
            second = _lowered(_lowered(terms, i), j)
            if second:
                source.emit(f"hess_{i}{j} += g_sh * ({_polynomial(source, second, cache)})")

    def hessian(i: int, j: int) -> str:
        return f"hess_{min(i, j)}{max(i, j)}"

    components = ("ux", "uy", "uz")
    for i in range(3):
        source.emit(f"hh{i} = " + " + ".join(f"{hessian(i, j)} * h{j}" for j in range(3)))
        source.emit(f"hu{i} = " + " + ".join(f"{hessian(i, j)} * {components[j]}" for j in range(3)))
    source.emit("radial_part = grad_u0 * ux + grad_u1 * uy + grad_u2 * uz")  # q = u . g_u
    source.emit("tangential = (grad_u0 * h0 + grad_u1 * h1 + grad_u2 * h2 - along * radial_part) * inv_r")  # T
    for i in range(3):
        source.emit(f"x{i} = hh{i} - along * (grad_u{i} + hu{i}) - radial_part * h{i}")
    source.emit("x_along = x0 * ux + x1 * uy + x2 * uz")
    source.emit("coefficient = grad_rr * along + frequency_part - tangential * inv_r")
    for i, component in enumerate(components):
        source.emit(f"tl.store(out_vectors_ptr + edges * 3 + {i}, coefficient * {component} + (grad_r * ph{i} + "
                    f"(x{i} - x_along * {component}) * inv_r) * inv_r, mask=mask)")
    return name, source.function(name, arguments, constants_at)


_KERNELS: dict[tuple, object] = {}


def _kernel(l_max: int, p: int, r_max: float, kind: str = "forward"):
    """The generated kernel of `kind` (KINDS) for harmonics up to l_max, envelope p, cutoff r_max."""
    if kind not in KINDS:
        raise ValueError(f"edge geometry kernels are {KINDS}, not {kind!r}")
    key = (l_max, p, float(r_max), kind)

    def load():
        if key not in _KERNELS:
            _KERNELS[key] = _load_generated(*_generate(l_max, p, float(r_max), kind))
        return _KERNELS[key]

    label = "" if kind == "forward" else " " + kind.replace("_", " ")
    return selected_kernel(f"edge_geometry{label} l_max {l_max} p {p} r_max {float(r_max)}", load)


def _block_size(device: torch.device) -> int:
    return 128 if device.type == "cpu" else 64


def _launch(kind: str, settings: tuple[float, int, int], vectors: torch.Tensor, num_basis: int, *arguments,
            **flags) -> None:
    """Launch the `kind` kernel of (r_max, p, l_max) over the edges of `vectors`, one program per block of edges."""
    import triton

    num_edges = vectors.shape[0]
    if num_edges == 0:
        return
    r_max, p, l_max = settings
    block = _block_size(vectors.device)
    with nvtx_range("allegro_fast.edge_geometry" + ("" if kind == "forward" else "." + kind)):
        _kernel(l_max, p, r_max, kind)[(triton.cdiv(num_edges, block),)](
            *arguments, num_edges, num_basis, BLOCK_E=block, BLOCK_B=triton.next_power_of_2(num_basis), **flags)


def _per_edge_frequency_gradient(vectors: torch.Tensor, num_basis: int, frequency_grad: bool) -> torch.Tensor:
    """Where a kernel stores the frequencies' gradient per edge ((E, N_b); a stand-in without frequency_grad)."""
    return vectors.new_empty((vectors.shape[0], num_basis) if frequency_grad else (1, num_basis))


def _summed_over_edges(per_edge: torch.Tensor, frequencies: torch.Tensor, frequency_grad: bool) -> torch.Tensor:
    """The frequencies' gradient: the per-edge one summed (in torch, a fixed order), or zeros."""
    return per_edge.sum(0) if frequency_grad and per_edge.shape[0] > 0 else frequencies.new_zeros(frequencies.shape)


@torch.library.custom_op("allegro_fast::edge_geometry", mutates_args=())
def edge_geometry(vectors: torch.Tensor, frequencies: torch.Tensor, r_max: float, p: int,
                  l_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, 3) edge vectors -> bessel (E, N_b), envelope (E,), harmonics (E, (l_max+1)^2); see the docstring."""
    vectors, frequencies = vectors.contiguous(), frequencies.contiguous()
    ensure_triton_device(vectors, frequencies)
    num_edges, num_basis = vectors.shape[0], frequencies.shape[0]
    bessel = vectors.new_empty((num_edges, num_basis))
    envelope = vectors.new_empty((num_edges,))
    harmonics = vectors.new_empty((num_edges, (l_max + 1) ** 2))
    _launch("forward", (r_max, p, l_max), vectors, num_basis, vectors, frequencies, bessel, envelope, harmonics)
    return bessel, envelope, harmonics


@edge_geometry.register_fake
def _(vectors, frequencies, r_max, p, l_max):
    num_edges = vectors.shape[0]
    return (vectors.new_empty((num_edges, frequencies.shape[0])), vectors.new_empty((num_edges,)),
            vectors.new_empty((num_edges, (l_max + 1) ** 2)))


@torch.library.custom_op("allegro_fast::edge_geometry_backward", mutates_args=())
def edge_geometry_backward(vectors: torch.Tensor, frequencies: torch.Tensor, grad_bessel: torch.Tensor,
                           grad_envelope: torch.Tensor, grad_harmonics: torch.Tensor, r_max: float, p: int,
                           l_max: int, frequency_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with respect to the edge vectors (E, 3) and the frequencies (N_b,) (zeros unless asked)."""
    tensors = [t.contiguous() for t in (vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics)]
    ensure_triton_device(*tensors)
    num_basis = frequencies.shape[0]
    grad_vectors = vectors.new_empty((vectors.shape[0], 3))
    per_edge = _per_edge_frequency_gradient(vectors, num_basis, frequency_grad)
    _launch("backward", (r_max, p, l_max), vectors, num_basis, *tensors, grad_vectors, per_edge,
            FREQUENCY_GRAD=frequency_grad)
    return grad_vectors, _summed_over_edges(per_edge, frequencies, frequency_grad)


@edge_geometry_backward.register_fake
def _(vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics, r_max, p, l_max, frequency_grad):
    return vectors.new_empty((vectors.shape[0], 3)), frequencies.new_empty((frequencies.shape[0],))


def _geometry_setup(ctx, inputs, output) -> None:
    vectors, frequencies, r_max, p, l_max = inputs
    ctx.settings = (r_max, p, l_max)
    ctx.save_for_backward(vectors, frequencies)


def _geometry_backward(ctx, grad_bessel, grad_envelope, grad_harmonics):
    vectors, frequencies = ctx.saved_tensors
    r_max, p, l_max = ctx.settings
    grad_bessel = vectors.new_zeros((vectors.shape[0], frequencies.shape[0])) if grad_bessel is None else grad_bessel
    grad_envelope = vectors.new_zeros(vectors.shape[0]) if grad_envelope is None else grad_envelope
    grad_harmonics = (vectors.new_zeros((vectors.shape[0], (l_max + 1) ** 2)) if grad_harmonics is None
                      else grad_harmonics)
    grad_vectors, grad_frequencies = edge_geometry_backward(
        vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics, r_max, p, l_max, ctx.needs_input_grad[1])
    return grad_vectors, grad_frequencies if ctx.needs_input_grad[1] else None, None, None, None


edge_geometry.register_autograd(_geometry_backward, setup_context=_geometry_setup)


def _backward_setup(ctx, inputs, output) -> None:
    vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics, r_max, p, l_max, frequency_grad = inputs
    ctx.settings = (r_max, p, l_max)
    ctx.frequency_grad = frequency_grad
    ctx.save_for_backward(vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics)


def _backward_backward(ctx, grad_grad_vectors, grad_grad_frequencies):
    """Second derivatives, by the double-backward kernel."""
    r_max, p, l_max = ctx.settings
    vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics = ctx.saved_tensors
    # Without frequency_grad the frequency output is a constant zero: its cotangent contributes nothing.
    if not ctx.frequency_grad:
        grad_grad_frequencies = None
    if grad_grad_vectors is None and grad_grad_frequencies is None:
        return (None,) * 9
    if grad_grad_vectors is None:
        grad_grad_vectors = torch.zeros_like(vectors)
    second = edge_geometry_double_backward(vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics,
                                           grad_grad_vectors, grad_grad_frequencies, r_max, p, l_max,
                                           ctx.needs_input_grad[1])
    wanted = ctx.needs_input_grad[:5]
    return (*(gradient if want else None for gradient, want in zip(second, wanted)), None, None, None, None)


edge_geometry_backward.register_autograd(_backward_backward, setup_context=_backward_setup)


@torch.library.custom_op("allegro_fast::edge_geometry_double_backward", mutates_args=())
def edge_geometry_double_backward(vectors: torch.Tensor, frequencies: torch.Tensor, grad_bessel: torch.Tensor,
                                  grad_envelope: torch.Tensor, grad_harmonics: torch.Tensor,
                                  cotangent_vectors: torch.Tensor, cotangent_frequencies: torch.Tensor | None,
                                  r_max: float, p: int, l_max: int, frequency_grad: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The derivatives of `edge_geometry_backward`'s outputs, contracted with their cotangents (vectors' (E, 3),
    frequencies' (N_b,) or None), with respect to its five tensor inputs: (vectors (E, 3), frequencies (N_b,), zeros
    unless frequency_grad, grad_bessel (E, N_b), grad_envelope (E,), grad_harmonics (E, (l_max+1)^2))."""
    tensors = [t.contiguous() for t in (vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics,
                                        cotangent_vectors)]
    has_frequency_cotangent = cotangent_frequencies is not None
    cotangent_frequencies = (cotangent_frequencies.contiguous() if has_frequency_cotangent else tensors[1])
    ensure_triton_device(*tensors, cotangent_frequencies)
    num_edges, num_basis = vectors.shape[0], frequencies.shape[0]
    out_vectors = vectors.new_empty((num_edges, 3))
    per_edge = _per_edge_frequency_gradient(vectors, num_basis, frequency_grad)
    out_bessel = vectors.new_empty((num_edges, num_basis))
    out_envelope = vectors.new_empty((num_edges,))
    out_harmonics = vectors.new_empty((num_edges, (l_max + 1) ** 2))
    _launch("double_backward", (r_max, p, l_max), vectors, num_basis, *tensors, cotangent_frequencies, out_vectors,
            per_edge, out_bessel, out_envelope, out_harmonics, HAS_FREQUENCY_COTANGENT=has_frequency_cotangent,
            FREQUENCY_GRAD=frequency_grad)
    return (out_vectors, _summed_over_edges(per_edge, frequencies, frequency_grad), out_bessel, out_envelope,
            out_harmonics)


@edge_geometry_double_backward.register_fake
def _(vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics, cotangent_vectors, cotangent_frequencies,
      r_max, p, l_max, frequency_grad):
    return (torch.empty_like(vectors), torch.empty_like(frequencies), torch.empty_like(grad_bessel),
            torch.empty_like(grad_envelope), torch.empty_like(grad_harmonics))


def double_backward_ref(vectors: torch.Tensor, frequencies: torch.Tensor, grad_bessel: torch.Tensor,
                        grad_envelope: torch.Tensor, grad_harmonics: torch.Tensor, cotangent_vectors: torch.Tensor,
                        cotangent_frequencies: torch.Tensor | None, r_max: float, p: int, l_max: int,
                        create_graph: bool = False) -> list[torch.Tensor]:
    """`edge_geometry_double_backward` by torch autograd through `edge_geometry_ref` (all five gradients; with
    create_graph, differentiable in every input)."""
    with torch.enable_grad():
        inputs = [t if t.requires_grad else t.detach().requires_grad_(True)
                  for t in (vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics)]
        outputs = [(output, cotangent) for output, cotangent in zip(edge_geometry_ref(*inputs[:2], r_max, p, l_max),
                                                                    inputs[2:]) if output.requires_grad]
        first = torch.autograd.grad([o for o, _ in outputs], inputs[:2], [g for _, g in outputs], create_graph=True)
        pairs = [(f, c) for f, c in zip(first, (cotangent_vectors, cotangent_frequencies)) if c is not None]
        second = torch.autograd.grad([f for f, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True,
                                     create_graph=create_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(second, inputs)]


def _double_setup(ctx, inputs, output) -> None:
    *tensors, cotangent_frequencies, r_max, p, l_max, frequency_grad = inputs
    ctx.settings = (r_max, p, l_max)
    ctx.frequency_grad = frequency_grad
    ctx.save_for_backward(*tensors, cotangent_frequencies)


def _double_backward_backward(ctx, *cotangents):
    """Third derivatives (gradgradcheck of the backward), by torch autograd through `double_backward_ref`;
    differentiable again under create_graph."""
    r_max, p, l_max = ctx.settings
    create_graph = torch.is_grad_enabled()
    if not ctx.frequency_grad:  # the frequencies' output is then a constant zero
        cotangents = (cotangents[0], None, *cotangents[2:])
    with torch.enable_grad():
        inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        second = double_backward_ref(*inputs, r_max, p, l_max, create_graph=True)
        pairs = [(s, c) for s, c in zip(second, cotangents) if c is not None and s.requires_grad]
        targets = [t for t in inputs if t is not None]
        if not pairs:
            return (None,) * 11
        third = torch.autograd.grad([s for s, _ in pairs], targets, [c for _, c in pairs], allow_unused=True,
                                    create_graph=create_graph)
    third = list(third) + [None] * (7 - len(third))
    return (*third, None, None, None, None)


edge_geometry_double_backward.register_autograd(_double_backward_backward, setup_context=_double_setup)
