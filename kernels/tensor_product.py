"""The environment sum, the channel-wise tensor product and the channel mixing of an Allegro layer, as
generated Triton kernels.

Math (DESIGN section 1, item 4). Edges e = (i, j) are sorted by center i; `center_ptr` (N + 1,) holds the
CSR row pointers, so the edges of center i are center_ptr[i]:center_ptr[i + 1]. With n channels c, every
tensor is stored (rows, columns, channels), channels last and contiguous (the torch backend's layout):

    environment    A[i, k, c] = sum_{e in N(i)} w[e, l(k), c] Y[e, k]          k = (l, m) spherical-harmonic column
    tensor product T[e, q, c] = sum_{(a, b, q, g)} g V[e, a, c] A[i(e), b, c]  over the Clebsch-Gordan nonzeros g
    channel mixing V'[e, (l, m), c'] = sum_{paths j into l} sum_c T[e, (j, m), c] W_j[c, c']

(the 1/sqrt(avg_num_neighbors) normalisation is folded into w, the mixing's 1/sqrt(fan_in) into W). The first
two are contractions of a *trilinear form* f(x0, x1, x2) = sum_e sum_c sum_{(a, b, d, g)} g x0[., a, c]
x1[., b, c] x2[., d, c], in which exactly one operand is indexed by the center atom i(e), the others by e:

    environment form     x0 = w (E, l_max+1, n)   x1 = Y (E, D2), no channel axis   x2 = A' (N, D2, n) per center
    tensor-product form  x0 = V (E, D1, n)        x1 = A (N, D2, n) per center      x2 = T' (E, P, n)

"Slot s of a form" is the partial derivative df/dx_s as a function of the two other operands: slot 2 of the
environment form is the environment sum, slot 2 of the tensor-product form is the product T. Because f is
trilinear, the vector-Jacobian product of slot s with respect to an input x_r is slot r with the cotangent put
in place of x_s: backward is made of the same six kernels, and so are double and higher backward (force
training differentiates the force, itself a backward). Per-edge outputs are written by the program of the
edge's center, per-center outputs reduce over that center's edges inside one program: no atomics anywhere,
results are bitwise reproducible.

The forward of a layer is one kernel, `fused_layer`: one program per center atom holds all channels; it sums
A over the center's edges in registers, then, per block of BLOCK_E of its edges, evaluates the product columns
in registers, stores the (0, +1) scalar columns (the latent MLP's input) and the channel mixing V' (tl.dot of
each product column with its path's (n, n) weight, accumulated per output column). Neither A nor T reaches
global memory. Its backward (`fused_layer_backward`) is one kernel per center as well; the mixing weights'
gradient recomputes T with the product's slot kernel, range of edges by range. The double backward
(`fused_layer_double_backward`, one op) runs the layer's forward and backward kernels once per direction
(`_backward_vjp`), never storing T or its cotangent; `composed_layer_backward` is the backward written with the
slot kernels, a second derivation for the tests.

Above 32 channels (`layer_launch`) the layer kernels are channel-tiled: still one program per center atom, but
it loops over chunks of BLOCK_O output channels and within them over blocks of BLOCK_C input channels,
recomputes that block's A in registers (`environment_block`) and product columns, and accumulates the mixing
into (BLOCK_E, BLOCK_O) tiles, a few output irreps per pass; the backward loops over channel blocks outermost and
forms the product's cotangent path by path. Both loop over output chunks at runtime, so their source does not
depend on the channel count.

The first layer's V^0 = w^0 (x) Y is never stored: its kernels read w^0 (E, l_max+1, n) and Y and form the
feature tiles in registers, and its backward chains V^0's cotangent to w^0 and Y in registers as well (about
(l_max+1)^2 n values per edge less to write and read in each direction).

Kernels are generated from the layer's `LayerTensorProduct` (the Clebsch-Gordan nonzeros become unrolled
constant multiply-adds) and cached on disk, because Triton compiles a `@triton.jit` function from its source
file. The slot kernels run one program per center atom and block of channels (grid (N, ceil(n / BLOCK_C)))
and walk the center's edges in blocks of BLOCK_E.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from allegro_fast.tensor_product import LayerTensorProduct, irrep_offsets

from ._common import ensure_triton_device, gradient_wanted, nvtx_range, selected_kernel

# --------------------------------------------------------------------------------------------------
# The forms (data) and the plain-torch reference of every slot
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Operand:
    """One operand of a trilinear form: indexed per center or per edge, with or without a channel axis."""

    name: str
    per_center: bool
    has_channels: bool
    columns: int


@dataclasses.dataclass(frozen=True)
class TrilinearForm:
    """f(x0, x1, x2) = sum_e sum_c sum_{(a, b, d, g) in entries} g x0[., c, a] x1[., c, b] x2[., c, d]."""

    operands: tuple[Operand, Operand, Operand]
    entries: tuple[tuple[int, int, int, float], ...]

    @property
    def key(self) -> str:
        text = repr((self.operands, self.entries))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def dense(self) -> np.ndarray:
        coefficients = np.zeros([op.columns for op in self.operands])
        for a, b, d, value in self.entries:
            coefficients[a, b, d] += value
        return coefficients


def environment_form(l_max: int) -> TrilinearForm:
    """sum_e sum_c sum_k w[e, l(k), c] Y[e, k] A'[i(e), c, k] over spherical-harmonic columns k."""
    sh_dim = (l_max + 1) ** 2
    entries = tuple((l, l * l + m, l * l + m, 1.0) for l in range(l_max + 1) for m in range(2 * l + 1))
    operands = (
        Operand("env_weights", False, True, l_max + 1),
        Operand("harmonics", False, False, sh_dim),
        Operand("environment", True, True, sh_dim),
    )
    return TrilinearForm(operands, entries)


def tensor_product_form(
    description: LayerTensorProduct,
    input_irreps: Sequence[tuple[int, int]],
    output_row: Callable[[int, int], int],
    paths: Sequence[int],
    output_dim: int,
) -> TrilinearForm:
    """The channel-wise product of `paths`, reading V with the irreps `input_irreps` (in that order) and
    writing component m of path p to column output_row(p, m) of T, which has `output_dim` columns."""
    in_offsets = irrep_offsets(tuple(input_irreps))
    entries = []
    for index in paths:
        path = description.paths[index]
        v_start = in_offsets[list(input_irreps).index(description.irreps_in1[path.in1])]
        for m1, m2, m_out, value in zip(*description.nonzeros(index)):
            entries.append((v_start + int(m1), path.l2 ** 2 + int(m2), output_row(index, int(m_out)), float(value)))
    operands = (
        Operand("features", False, True, in_offsets[-1]),
        Operand("environment", True, True, (description.l_max + 1) ** 2),
        Operand("product", False, True, output_dim),
    )
    return TrilinearForm(operands, tuple(sorted(entries, key=lambda entry: (entry[2], entry[0], entry[1]))))


class _Registry(dict):
    """Forms by key, as the custom ops take them: a key this process has not registered is an error that says
    where registrations come from."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def __missing__(self, key: str):
        raise LookupError(
            f"no {self.what} with key {key!r} in this process: a model registers its forms when it is built "
            "(Allegro(config, backend='triton')), and export.load_exported / load_package register those of the "
            "program's model; a program exported by other versions of allegro-fast or e3nn may name forms that "
            "these versions do not make (export it again)")


_FORMS: dict[str, TrilinearForm] = _Registry("trilinear form")


def register_form(form: TrilinearForm) -> str:
    """Make a form known to the custom ops (they take its key); returns the key."""
    _FORMS.setdefault(form.key, form)
    return form.key


@dataclasses.dataclass(frozen=True)
class MixingGroup:
    """One output irrep of the channel mixing: product columns product_start + m J + j (component m of path j,
    J paths) are mixed over channels by the (n, n) matrices weights[weight_start + j] into output column
    output_start + m, for m < dim = 2l + 1."""

    product_start: int
    num_paths: int
    dim: int
    output_start: int
    weight_start: int


@dataclasses.dataclass(frozen=True)
class FusedLayerForm:
    """What the fused layer computes from (w, Y, V^{L-1}, mixing weights): the environment form's sum A, the
    product form's columns T (neither stored), the scalar columns of T and the channel mixing of T."""

    environment: TrilinearForm
    product: TrilinearForm
    scalar_columns: tuple[int, int]
    mixing: tuple[MixingGroup, ...]
    # The first layer: its features V^0[e, a, c] = w0[e, l, c] Y[e, k] for (l, k) = first_features[a], read by the
    # kernels from w0 (E, l_max+1, n) and Y (never formed in memory); () for a layer that reads V (E, D_in, n).
    first_features: tuple[tuple[int, int], ...] = ()
    # The first layer's double backward: 2 forms V^0 = w0 (x) Y_v + w0_b (x) Y_b from two pairs (`paired_layer_key`)
    feature_pairs: int = 1

    @property
    def key(self) -> str:
        parts = (self.environment.key, self.product.key, self.scalar_columns, self.mixing, self.first_features)
        text = repr(parts + ((self.feature_pairs,) if self.feature_pairs != 1 else ()))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def feature_columns(self) -> int:
        """Columns of the `features` input: w0's l_max+1 in the first layer, V's D_in otherwise."""
        return self.environment.operands[0].columns if self.first_features else self.product.operands[0].columns

    @property
    def output_dim(self) -> int:
        return sum(group.dim for group in self.mixing)

    @property
    def num_weights(self) -> int:
        return sum(group.num_paths for group in self.mixing)


def fused_layer_form(description: LayerTensorProduct, input_irreps: Sequence[tuple[int, int]], grouped,
                     output_irreps: Sequence[tuple[int, int]], first: bool = False) -> FusedLayerForm:
    """The fused layer of `description` reading V with `input_irreps` and mixing into `output_irreps` (none in
    the last layer); `grouped` (torch_ops._GroupedPaths) fixes the product's columns: its `irrep_blocks`,
    `output_row`, `path_indices`, `output_dim`. With `first`, V is the first layer's V^0 = w0 (x) Y (its irreps
    (l, p) read component m from w0's column l and Y's column l^2 + m), which the kernels form in registers."""
    product = tensor_product_form(description, input_irreps, grouped.output_row, grouped.path_indices,
                                  grouped.output_dim)
    start, stop, _ = grouped.irrep_blocks[(0, 1)]
    groups, weight_start = [], 0
    for irrep, output_start in zip(output_irreps, irrep_offsets(tuple(output_irreps))):
        block_start, _, paths = grouped.irrep_blocks[irrep]
        groups.append(MixingGroup(block_start, len(paths), 2 * irrep[0] + 1, output_start, weight_start))
        weight_start += len(paths)
    first_features = tuple((l, l * l + m) for l, _ in input_irreps for m in range(2 * l + 1)) if first else ()
    return FusedLayerForm(environment_form(description.l_max), product, (start, stop), tuple(groups), first_features)


_LAYERS: dict[str, FusedLayerForm] = _Registry("fused layer form")


def register_layer(layer: FusedLayerForm) -> str:
    """Make a fused layer (and its two forms) known to the custom ops; returns its key."""
    register_form(layer.environment)
    register_form(layer.product)
    _LAYERS.setdefault(layer.key, layer)
    return layer.key


def _other_slots(slot: int) -> tuple[int, int]:
    return tuple(s for s in range(3) if s != slot)  # type: ignore[return-value]


def _as_edge_channel_columns(x: torch.Tensor, operand: Operand) -> torch.Tensor:
    """Tensor of one operand, stored (rows, columns[, channels]), as (rows, channels or 1, columns)."""
    return x.transpose(1, 2) if operand.has_channels else x.unsqueeze(1)


def trilinear_ref(form: TrilinearForm, slot: int, first: torch.Tensor, second: torch.Tensor, center: torch.Tensor,
                  num_centers: int) -> torch.Tensor:
    """Plain-torch slot `slot` of `form` (the oracle of the kernels): first and second are the other two
    operands in slot order; center (E,) is the center atom of every edge."""
    coefficients = torch.as_tensor(form.dense(), dtype=first.dtype, device=first.device)
    inputs = {}
    for s, x in zip(_other_slots(slot), (first, second)):
        operand = form.operands[s]
        x = _as_edge_channel_columns(x, operand)
        inputs[s] = x.index_select(0, center) if operand.per_center else x
    a, b = _other_slots(slot)
    out = torch.einsum("xyz,ecx,ecy->ecz", coefficients.permute(a, b, slot), inputs[a], inputs[b])
    operand = form.operands[slot]
    out = out.transpose(1, 2) if operand.has_channels else out.sum(1)
    if operand.per_center:
        reduced = torch.zeros((num_centers, *out.shape[1:]), dtype=out.dtype, device=out.device)
        out = reduced.index_add(0, center, out)
    return out.contiguous()


def _first_feature_runs(layer: FusedLayerForm) -> list[tuple[int, int, int, int]]:
    """The first layer's V^0 columns in runs (a, l, k, size): columns a:a+size read w0's column l and Y's columns
    k:k+size (one run per irrep)."""
    runs: list[list[int]] = []
    for a, (l, k) in enumerate(layer.first_features):
        if runs and runs[-1][1] == l and runs[-1][2] + runs[-1][3] == k:
            runs[-1][3] += 1
        else:
            runs.append([a, l, k, 1])
    return [tuple(run) for run in runs]  # type: ignore[misc]


def layer_features(layer: FusedLayerForm, features: torch.Tensor, harmonics: torch.Tensor) -> torch.Tensor:
    """V (E, D_in, n) that a layer's product reads: `features` itself, or in the first layer V^0 = w0 (x) Y from
    w0 = `features` (E, l_max+1, n) and Y (plain torch, differentiable: slices and products, whose backward adds
    in a fixed order, no index_add)."""
    if not layer.first_features:
        return features
    blocks = [features[:, l:l + 1] * harmonics[:, k:k + size, None] for _, l, k, size in _first_feature_runs(layer)]
    return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]


def first_feature_cotangents(layer: FusedLayerForm, grad_v: torch.Tensor, w0: torch.Tensor, harmonics: torch.Tensor,
                             to_w0: bool = True, to_y: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The vector-Jacobian product of `layer_features` in the first layer, in plain torch: (w0's cotangent
    (E, l_max+1, n), Y's (E, (l_max+1)^2)) from V^0's cotangent (E, D_in, n); None for one not asked for
    (`to_w0`, `to_y`)."""
    num_edges, channels = grad_v.shape[0], grad_v.shape[2]
    grad_w0: list[torch.Tensor | None] = [None] * w0.shape[1]
    grad_y: list[torch.Tensor | None] = [None] * harmonics.shape[1]
    for a, l, k, size in _first_feature_runs(layer):
        block = grad_v[:, a:a + size]
        if to_w0:
            piece = (block * harmonics[:, k:k + size, None]).sum(1)
            grad_w0[l] = piece if grad_w0[l] is None else grad_w0[l] + piece
        if to_y:
            for m, column in enumerate((block * w0[:, l:l + 1]).sum(2).unbind(1)):
                grad_y[k + m] = column if grad_y[k + m] is None else grad_y[k + m] + column
    zero_w0, zero_y = grad_v.new_zeros((num_edges, channels)), grad_v.new_zeros((num_edges,))
    return (torch.stack([zero_w0 if g is None else g for g in grad_w0], dim=1) if to_w0 else None,
            torch.stack([zero_y if g is None else g for g in grad_y], dim=1) if to_y else None)


def scalars_and_mixing(layer: FusedLayerForm, product: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the scalar columns (E, S, n) and the channel mixing (E, D_out, n) of a product (E, P, n)
    with the stacked mixing weights (num_weights, n, n)."""
    num_edges, _, channels = product.shape
    first, last = layer.scalar_columns
    mixed = []
    for group in layer.mixing:
        block = product[:, group.product_start:group.product_start + group.dim * group.num_paths]
        matrix = weights[group.weight_start:group.weight_start + group.num_paths].reshape(-1, channels)
        mixed.append((block.reshape(num_edges * group.dim, -1) @ matrix).view(num_edges, group.dim, channels))
    if not mixed:
        return product[:, first:last], product.new_zeros((num_edges, 0, channels))
    return product[:, first:last], torch.cat(mixed, dim=1) if len(mixed) > 1 else mixed[0]


def fused_layer_ref(layer: FusedLayerForm, env_weights: torch.Tensor, harmonics: torch.Tensor,
                    features: torch.Tensor, weights: torch.Tensor, center: torch.Tensor,
                    num_centers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch fused layer (the oracle of its kernel): (scalars (E, S, n), mixed (E, D_out, n))."""
    environment = trilinear_ref(layer.environment, 2, env_weights, harmonics, center, num_centers)
    product = trilinear_ref(layer.product, 2, layer_features(layer, features, harmonics), environment, center,
                            num_centers)
    return scalars_and_mixing(layer, product, weights)


# --------------------------------------------------------------------------------------------------
# Code generation
# --------------------------------------------------------------------------------------------------


class _KernelWriter:
    """Emits the body of one generated kernel. Operands are read through (pointer, row, channel, column)
    strides; `values` caches the loaded tiles of the current edge block by (operand name, column)."""

    def __init__(self, first_features: Sequence[tuple[int, int]] = (), feature_pairs: int = 1) -> None:
        self.lines: list[str] = []
        self.values: dict[tuple[str, int], str] = {}
        self.constants: dict[float, str] = {}
        self.constants_at = 0  # the line after which the constants are defined
        # the first layer: feature column a is w0's column l times Y's column k, (l, k) = first_features[a] (with two
        # pairs, plus w0_b's column l times Y_b's column k)
        self.first_features = tuple(first_features)
        self.feature_pairs = feature_pairs

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def constant(self, value: float) -> str:
        if value not in self.constants:
            self.constants[value] = f"g{len(self.constants)}"
        return self.constants[value]

    def edge_tile(self, indent: int, name: str, operand: Operand, column: int) -> str:
        """A (BLOCK_E, BLOCK_C) tile (or (BLOCK_E, 1) without channels) of a per-edge operand (in the first layer,
        a feature tile is formed from w0 and Y)."""
        if name == "features" and self.first_features and (name, column) not in self.values:
            l, k = self.first_features[column]
            value = f"{self.w0_tile(indent, l)} * {self.harmonic_tile(indent, k, 'feature_harmonics')}"
            if self.feature_pairs == 2:
                value += (f" + {self.w0_tile(indent, l, 'features_b')} * "
                          f"{self.harmonic_tile(indent, k, 'feature_harmonics_b')}")
            self.emit(indent, f"features_{column} = {value}")
            self.values[(name, column)] = f"features_{column}"
        if (name, column) not in self.values:
            variable = f"{name}_{column}"
            if operand.has_channels:
                self.emit(indent, f"{variable} = tl.load({name}_ptr + edge_rows * {name}_stride_row + channel_cols * "
                                  f"{name}_stride_channel + {column} * {name}_stride_column, mask=tile_mask, other=0.0)")
            else:
                self.emit(indent, f"{variable} = tl.load({name}_ptr + edges * {name}_stride_row + {column} * "
                                  f"{name}_stride_column, mask=edge_mask, other=0.0)[:, None]")
            self.values[(name, column)] = variable
        return self.values[(name, column)]

    def w0_tile(self, indent: int, l: int, name: str = "features") -> str:
        """The first layer: a (BLOCK_E, BLOCK_C) tile of w0's column l (passed as the `features` operand; the second
        pair's w0_b as `features_b`)."""
        if (f"w0 {name}", l) not in self.values:
            variable = f"w0{name[len('features'):]}_{l}"
            self.emit(indent, f"{variable} = tl.load({name}_ptr + edge_rows * {name}_stride_row + channel_cols * "
                              f"{name}_stride_channel + {l} * {name}_stride_column, mask=tile_mask, other=0.0)")
            self.values[(f"w0 {name}", l)] = variable
        return self.values[(f"w0 {name}", l)]

    def harmonic_tile(self, indent: int, k: int, name: str = "harmonics") -> str:
        """A (BLOCK_E, 1) tile of Y's column k: the environment's Y (`harmonics`), or in the first layer the Y that
        forms V^0 (`feature_harmonics`; the same tensor but in the first layer's double backward)."""
        return self.edge_tile(indent, name, Operand(name, False, False, k + 1), k)

    def center_vector(self, indent: int, name: str, column: int) -> str:
        """A (1, BLOCK_C) row of a per-center operand, loaded once per program."""
        if (name, column) not in self.values:
            variable = f"{name}_{column}"
            self.emit(indent, f"{variable} = tl.load({name}_ptr + center * {name}_stride_row + channels * "
                              f"{name}_stride_channel + {column} * {name}_stride_column, mask=channel_mask, "
                              f"other=0.0)[None, :]")
            self.values[(name, column)] = variable
        return self.values[(name, column)]

    def terms(self, indent: int, form: TrilinearForm, slot: int, column: int, names: dict[int, str],
              center_values: dict[int, dict[int, str]], only: tuple[int, set[int]] | None = None) -> str | None:
        """Sum of the products that make output column `column` of `slot`, or None if there are none; with
        only = (s, columns), just the products whose operand s is in `columns`."""
        a, b = _other_slots(slot)
        products = []
        for entry in form.entries:
            if entry[slot] != column or (only is not None and entry[only[0]] not in only[1]):
                continue
            factors, center_factors = [], []
            for s in (a, b):
                operand = form.operands[s]
                if s in center_values:
                    factor = center_values[s][entry[s]]
                elif operand.per_center:
                    factor = self.center_vector(indent, names[s], entry[s])
                else:
                    factor = self.edge_tile(indent, names[s], operand, entry[s])
                (center_factors if operand.per_center else factors).append(factor)
            # per-center factors last: (c * edge value) * center value. c * center value first would be the same
            # for every edge block, and the compiler hoists such products out of the edge loop, one live register
            # per product
            factors += center_factors
            value = entry[3]
            product = f"{factors[0]} * {factors[1]}"
            if abs(abs(value) - 1.0) < 1e-14:  # +-1 up to wigner_3j's round-off (0.9999999999999999): no multiply
                products.append(product if value > 0 else f"-{product}")
            else:
                products.append(f"{self.constant(value)} * {product}")
        return " + ".join(products) if products else None


def function_source(name: str, arguments: str, lines: list[str], constants: dict[float, str],
                    constants_at: int) -> str:
    """A @triton.jit function from its body lines, with the constants defined (exactly, in the kernel's dtype
    DTYPE: a bare Python float would be a float32 literal) at line `constants_at`."""
    constant_lines = [f"    {variable} = tl.full((), {value!r}, DTYPE)" for value, variable in constants.items()]
    body = lines[:constants_at] + constant_lines + lines[constants_at:]
    return f"@triton.jit\ndef {name}({arguments}):\n" + "\n".join(body) + "\n"


_HEADER = '''\
# Generated by allegro_fast.kernels.tensor_product from a layer description; do not edit.
import triton
import triton.language as tl


@triton.jit
def mix(acc, t, w, DOT: tl.constexpr):
    """acc + t @ w for (BLOCK_E, BLOCK_C) t and (BLOCK_C, BLOCK_C) w. DOT 1: tl.dot in IEEE float32 (no TF32, on
    the FMA units); 3: tl.dot as three TF32 tensor-core products of the inputs' high and low parts ("tf32x3", about
    float32's accuracy); 0: multiply and sum (float64, which tl.dot does not take on every GPU; the channel-tiled
    kernels). The product is written w * t, not t * w: Triton's combine pass rewrites a float32
    sum(t[:, :, None] * w[None, :, :], axis=1) into a tt.dot, with TF32 inputs on Triton 3.6 (relative errors
    ~1e-3, seen on an H200)."""
    if DOT == 3:
        acc = tl.dot(t, w, acc, input_precision="tf32x3")
    elif DOT:
        acc = tl.dot(t, w, acc, input_precision="ieee")
    else:
        acc = acc + tl.sum(w[None, :, :] * t[:, :, None], axis=1)
    return acc


@triton.jit
def mix_transposed(acc, g, w):
    """acc + g @ w^T for (BLOCK_E, BLOCK_O) g and (BLOCK_C, BLOCK_O) w, by multiply and sum over the last axis
    (the tiled backward: ptxas spills less than for the transposed tile summed over the middle axis)."""
    return acc + tl.sum(g[:, None, :] * w[None, :, :], axis=2)

'''


def _operand_arguments(name: str) -> str:
    return f"{name}_ptr, {name}_stride_row, {name}_stride_channel, {name}_stride_column"


def _input_arguments(layer: FusedLayerForm) -> list[str]:
    """The layer kernels' first arguments: w, Y and the features (V, or w0 in the first layer, whose kernels take
    the Y that forms V^0 as one more operand)."""
    names = ["env_weights", "harmonics", "features", *(["feature_harmonics"] if layer.first_features else []),
             *(["features_b", "feature_harmonics_b"] if layer.feature_pairs == 2 else [])]
    return [_operand_arguments(name) for name in names]


def _program_preamble(writer: _KernelWriter, loop_channels: bool) -> None:
    writer.emit(1, "center = tl.program_id(0).to(tl.int64)")
    writer.emit(1, "start = tl.load(center_ptr_ptr + center)")
    writer.emit(1, "stop = tl.load(center_ptr_ptr + center + 1)")
    if not loop_channels:
        writer.emit(1, "channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)")
        writer.emit(1, "channel_mask = channels < num_channels")
        writer.emit(1, "channel_cols = channels[None, :]")


def _edge_block_header(writer: _KernelWriter, indent: int) -> None:
    writer.emit(indent, "for block_start in range(start, stop, BLOCK_E):")
    writer.emit(indent + 1, "edges = block_start + tl.arange(0, BLOCK_E)")
    writer.emit(indent + 1, "edge_mask = edges < stop")
    writer.emit(indent + 1, "edge_rows = edges[:, None]")


def _generate_slot(form: TrilinearForm, slot: int) -> tuple[str, str]:
    """Source of the kernel computing slot `slot` of `form`; returns (function name, source)."""
    name = f"slot{slot}_kernel"
    writer = _KernelWriter()
    out = form.operands[slot]
    a, b = _other_slots(slot)
    names = {s: form.operands[s].name for s in range(3)}
    arguments = ", ".join([_operand_arguments(names[a]), _operand_arguments(names[b]), "out_ptr",
                           "out_stride_row", "out_stride_channel", "out_stride_column", "center_ptr_ptr",
                           "num_channels", "BLOCK_E: tl.constexpr", "BLOCK_C: tl.constexpr"])
    loop_channels = not out.has_channels  # a channel-free output sums over all channels in one program
    _program_preamble(writer, loop_channels)
    writer.emit(1, "DTYPE = out_ptr.dtype.element_ty")
    constants_at = len(writer.lines)

    if out.per_center:
        for column in range(out.columns):
            writer.emit(1, f"acc_{column} = tl.zeros((BLOCK_C,), dtype=DTYPE)")
        _edge_block_header(writer, 1)
        writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
        for column in range(out.columns):
            expression = writer.terms(2, form, slot, column, names, {})
            if expression is not None:
                writer.emit(2, f"acc_{column} += tl.sum({expression}, axis=0)")
        for column in range(out.columns):
            writer.emit(1, f"tl.store(out_ptr + center * out_stride_row + channels * out_stride_channel + "
                           f"{column} * out_stride_column, acc_{column}, mask=channel_mask)")
    elif out.has_channels:
        _edge_block_header(writer, 1)
        writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
        for column in range(out.columns):
            expression = writer.terms(2, form, slot, column, names, {}) or "tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)"
            writer.emit(2, f"tl.store(out_ptr + edge_rows * out_stride_row + channel_cols * out_stride_channel + "
                           f"{column} * out_stride_column, {expression}, mask=tile_mask)")
    else:
        _edge_block_header(writer, 1)
        for column in range(out.columns):
            writer.emit(2, f"acc_{column} = tl.zeros((BLOCK_E,), dtype=DTYPE)")
        writer.emit(2, "for channel_start in range(0, num_channels, BLOCK_C):")
        writer.emit(3, "channels = channel_start + tl.arange(0, BLOCK_C)")
        writer.emit(3, "channel_mask = channels < num_channels")
        writer.emit(3, "channel_cols = channels[None, :]")
        writer.emit(3, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
        for column in range(out.columns):
            expression = writer.terms(3, form, slot, column, names, {})
            if expression is not None:
                writer.emit(3, f"acc_{column} += tl.sum({expression}, axis=1)")
        for column in range(out.columns):
            writer.emit(2, f"tl.store(out_ptr + edges * out_stride_row + {column} * out_stride_column, "
                           f"acc_{column}, mask=edge_mask)")
    return name, function_source(name, arguments, writer.lines, writer.constants, constants_at)


_ENVIRONMENT_ARGUMENTS = ("env_weights_ptr, env_weights_stride_row, env_weights_stride_channel, "
                          "env_weights_stride_column, harmonics_ptr, harmonics_stride_row, harmonics_stride_channel, "
                          "harmonics_stride_column")


def _generate_environment_block(environment: TrilinearForm) -> str:
    """Source of `environment_block`, a helper of the layer kernels: A[i, k, channels] of one center and one
    block of channels, summed over the center's edges start:stop in registers; returns the (l_max+1)^2 rows.
    Each row is summed per (edge slot, channel) over the edge blocks and across the edge slots once, after the
    loop: a sum across slots is shuffles and, across warps, shared memory and barriers, which per block were a
    fifth of the instructions of the default model's last layer forward (sm_90, every loop run twice)."""
    writer = _KernelWriter()
    names = {s: environment.operands[s].name for s in range(3)}
    columns = environment.operands[2].columns
    writer.emit(1, "DTYPE = env_weights_ptr.dtype.element_ty")
    writer.emit(1, "channel_cols = channels[None, :]")
    for column in range(columns):
        writer.emit(1, f"env_{column} = tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)")
    _edge_block_header(writer, 1)
    writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    for column in range(columns):
        writer.emit(2, f"env_{column} += {writer.terms(2, environment, 2, column, names, {})}")
    writer.emit(1, "return " + ", ".join(f"tl.sum(env_{column}, axis=0)" for column in range(columns)))
    arguments = (f"{_ENVIRONMENT_ARGUMENTS}, start, stop, channels, channel_mask, BLOCK_E: tl.constexpr, "
                 "BLOCK_C: tl.constexpr")
    return function_source("environment_block", arguments, writer.lines, writer.constants, 1)


def _environment_rows(writer: _KernelWriter, indent: int, layer: FusedLayerForm) -> dict[int, dict[int, str]]:
    """Emit the call of `environment_block` for the current `channels`; returns A's rows as the product form's
    slot-1 values."""
    columns = layer.environment.operands[2].columns
    rows = ", ".join(f"env_{column}" for column in range(columns))
    writer.emit(indent, f"{rows}{',' if columns == 1 else ''} = environment_block({_ENVIRONMENT_ARGUMENTS}, start, "
                        "stop, channels, channel_mask, BLOCK_E, BLOCK_C)")
    for column in range(columns):
        writer.emit(indent, f"env_row_{column} = env_{column}[None, :]")
    return {1: {column: f"env_row_{column}" for column in range(columns)}}


def _layer_preamble(writer: _KernelWriter, layer: FusedLayerForm) -> dict[int, dict[int, str]]:
    """The start of both one-block layer kernels: one program per center holding every channel (the mixing sums
    over them), and the center's environment A summed in registers; returns A's rows as the product form's
    slot-1 values."""
    writer.emit(1, "center = tl.program_id(0).to(tl.int64)")
    writer.emit(1, "start = tl.load(center_ptr_ptr + center)")
    writer.emit(1, "stop = tl.load(center_ptr_ptr + center + 1)")
    writer.emit(1, "channels = tl.arange(0, BLOCK_C)")
    writer.emit(1, "channel_mask = channels < num_channels")
    writer.emit(1, "channel_cols = channels[None, :]")
    writer.emit(1, "DTYPE = env_weights_ptr.dtype.element_ty")
    writer.constants_at = len(writer.lines)
    in_registers = _environment_rows(writer, 1, layer)
    if layer.mixing:
        writer.emit(1, "weight_offsets = channels[:, None] * num_channels + channels[None, :]")
        writer.emit(1, "weight_offsets_t = channels[None, :] * num_channels + channels[:, None]")
        writer.emit(1, "weight_mask = channel_mask[:, None] & channel_mask[None, :]")
    return in_registers


def _store_edge_tile(writer: _KernelWriter, indent: int, name: str, column: int, value: str) -> None:
    writer.emit(indent, f"tl.store({name}_ptr + edge_rows * {name}_stride_row + {column} * {name}_stride_column + "
                        f"channel_cols, {value}, mask=tile_mask)")


def _load_edge_tile(name: str, column: int) -> str:
    return (f"tl.load({name}_ptr + edge_rows * {name}_stride_row + {column} * {name}_stride_column + channel_cols, "
            f"mask=tile_mask, other=0.0)")


def _store_feature_cotangents(writer: _KernelWriter, indent: int, layer: FusedLayerForm, values: dict[int, str],
                              product_slice: str) -> None:
    """Store the cotangent of the features from V's, `values` (column -> tile; absent columns are zero). In the
    first layer V^0 = w0 (x) Y is not an input: its cotangent is chained in registers to w0's columns (stored to
    grad_features) and to the columns of V^0's Y, `feature_harmonics` (slice `product_slice` of grad_harmonics:
    the launcher adds the environment's share, or keeps the two apart)."""
    zeros = "tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)"
    if not layer.first_features:
        for column in range(layer.feature_columns):
            _store_edge_tile(writer, indent, "grad_features", column, values.get(column, zeros))
        return

    # w0's cotangent pairs with V^0's Y; with two pairs the kernel returns the cotangents of w0_b and of Y_v (V^0's
    # cotangent times the other factor of each: Y_b and w0), what the double backward wants of them
    w0_pairs_with = "feature_harmonics_b" if layer.feature_pairs == 2 else "feature_harmonics"

    def store_y(k: int, value: str) -> None:
        writer.emit(indent, f"tl.store(grad_harmonics_ptr + ({product_slice}) * grad_harmonics_stride_block + edges * "
                            f"grad_harmonics_stride_row + {k} * grad_harmonics_stride_column, {value}, mask=edge_mask)")

    # each sum stored as soon as its last term is in (fewer live registers)
    last_w0 = {l: column for column, (l, _) in enumerate(layer.first_features) if column in values}
    last_y = {k: column for column, (_, k) in enumerate(layer.first_features) if column in values}
    started: set[str] = set()
    for column, value in values.items():
        l, k = layer.first_features[column]
        if value != f"gf_{column}":
            writer.emit(indent, f"gf_{column} = {value}")
        for name, term in ((f"gw0_{l}", f"gf_{column} * {writer.harmonic_tile(indent, k, w0_pairs_with)}"),
                           (f"gy_{k}", f"tl.sum(gf_{column} * {writer.w0_tile(indent, l)}, axis=1)")):
            writer.emit(indent, f"{name} = {name + ' + ' if name in started else ''}{term}")
            started.add(name)
        if last_w0[l] == column:
            _store_edge_tile(writer, indent, "grad_features", l, f"gw0_{l}")
        if last_y[k] == column:
            store_y(k, f"gy_{k}")
    for l in range(layer.feature_columns):
        if l not in last_w0:
            _store_edge_tile(writer, indent, "grad_features", l, zeros)
    for k in range(layer.environment.operands[1].columns):
        if k not in last_y:
            store_y(k, "tl.zeros((BLOCK_E,), dtype=DTYPE)")


def _weight_tile(index: int, transposed: bool) -> str:
    """(BLOCK_C, BLOCK_C) tile of the mixing matrix `index`, W[c, c'] (or its transpose W[c', c])."""
    offsets = "weight_offsets_t" if transposed else "weight_offsets"
    return f"tl.load(weights_ptr + {index} * num_channels * num_channels + {offsets}, mask=weight_mask, other=0.0)"


def _generate_layer(layer: FusedLayerForm) -> tuple[str, str]:
    """Source of the fused layer: per center, the environment in registers, then per block of its edges the
    product columns (never stored), the scalar columns stored and the mixed columns through the weights."""
    name = "fused_layer_kernel"
    writer = _KernelWriter(layer.first_features, layer.feature_pairs)
    arguments = ", ".join([*_input_arguments(layer), "weights_ptr", "scalars_ptr", "scalars_stride_row",
                           "scalars_stride_column", "mixed_ptr", "mixed_stride_row", "mixed_stride_column",
                           "center_ptr_ptr", "num_channels", "BLOCK_E: tl.constexpr", "BLOCK_C: tl.constexpr", "DOT: tl.constexpr"])
    in_registers = _layer_preamble(writer, layer)
    product = layer.product
    product_names = {s: product.operands[s].name for s in range(3)}
    _edge_block_header(writer, 1)
    writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    computed: set[int] = set()

    def product_column(column: int) -> str:
        if column not in computed:
            expression = writer.terms(2, product, 2, column, product_names, in_registers)
            writer.emit(2, f"t_{column} = {expression or 'tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)'}")
            computed.add(column)
        return f"t_{column}"

    first, last = layer.scalar_columns
    for column in range(first, last):
        _store_edge_tile(writer, 2, "scalars", column - first, product_column(column))
    for group in layer.mixing:
        for m in range(group.dim):
            writer.emit(2, f"mixed_{m} = tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)")
        for j in range(group.num_paths):
            writer.emit(2, f"w = {_weight_tile(group.weight_start + j, transposed=False)}")
            for m in range(group.dim):
                column = product_column(group.product_start + m * group.num_paths + j)
                writer.emit(2, f"mixed_{m} = mix(mixed_{m}, {column}, w, DOT)")
        for m in range(group.dim):
            _store_edge_tile(writer, 2, "mixed", group.output_start + m, f"mixed_{m}")
    return name, function_source(name, arguments, writer.lines, writer.constants, writer.constants_at)


def _backward_arguments(layer: FusedLayerForm) -> list[str]:
    """The arguments both layer backward kernels start with: the inputs, the mixing weights, the cotangents of the
    outputs and those of the inputs."""
    arguments = [*_input_arguments(layer), "weights_ptr"]
    for name in ("grad_scalars", "grad_mixed", "grad_features", "grad_env_weights", "grad_harmonics"):
        arguments += [f"{name}_ptr", f"{name}_stride_row", f"{name}_stride_column"]
    return arguments


def _generate_layer_backward(layer: FusedLayerForm) -> tuple[str, str]:
    """Source of the fused layer's backward to w, Y and V, per center: the environment in registers (pass 1);
    per block of edges the product's cotangent from those of the scalars and the mixed features (the
    transposed mixing), V's cotangent stored and the environment's cotangent summed (pass 2, nothing of the
    product stored); then the cotangents of w and Y of the center's edges (pass 3)."""
    name = "fused_layer_backward_kernel"
    writer = _KernelWriter(layer.first_features, layer.feature_pairs)
    arguments = ", ".join([*_backward_arguments(layer), "grad_harmonics_stride_block", "center_ptr_ptr", "num_channels",
                           "BLOCK_E: tl.constexpr", "BLOCK_C: tl.constexpr", "DOT: tl.constexpr"])
    in_registers = _layer_preamble(writer, layer)
    environment, product = layer.environment, layer.product
    env_names = {s: environment.operands[s].name for s in range(3)}
    product_names = {s: product.operands[s].name for s in range(3)}
    env_columns = environment.operands[2].columns
    for column in range(env_columns):
        writer.emit(1, f"grad_env_{column} = tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)")

    # pass 2: the product's cotangent in registers, V's stored, the environment's summed
    _edge_block_header(writer, 1)
    writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    first, last = layer.scalar_columns
    started: set[int] = set()
    for column in range(first, last):
        writer.emit(2, f"gt_{column} = {_load_edge_tile('grad_scalars', column - first)}")
        started.add(column)
    for group in layer.mixing:
        for m in range(group.dim):
            writer.emit(2, f"gv_{m} = {_load_edge_tile('grad_mixed', group.output_start + m)}")
        for j in range(group.num_paths):
            writer.emit(2, f"w = {_weight_tile(group.weight_start + j, transposed=True)}")
            for m in range(group.dim):
                column = group.product_start + m * group.num_paths + j
                if column not in started:
                    writer.emit(2, f"gt_{column} = tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)")
                    started.add(column)
                writer.emit(2, f"gt_{column} = mix(gt_{column}, gv_{m}, w, DOT)")
    product_columns = product.operands[2].columns
    for column in range(product_columns):
        if column not in started:  # a path that neither the scalars nor the mixing read
            writer.emit(2, f"gt_{column} = tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)")
    cotangent = {2: {column: f"gt_{column}" for column in range(product_columns)}}
    grad_features = {}
    for column in range(product.operands[0].columns):
        expression = writer.terms(2, product, 0, column, product_names, {**in_registers, **cotangent})
        if expression is not None:
            grad_features[column] = expression
    _store_feature_cotangents(writer, 2, layer, grad_features, "1")
    for column in range(env_columns):
        expression = writer.terms(2, product, 1, column, product_names, cotangent)
        if expression is not None:
            writer.emit(2, f"grad_env_{column} += {expression}")
    for column in range(env_columns):
        writer.emit(1, f"grad_env_row_{column} = tl.sum(grad_env_{column}, axis=0)[None, :]")
    writer.values.clear()

    # pass 3: the cotangents of the environment weights and the harmonics
    grad_environment = {2: {column: f"grad_env_row_{column}" for column in range(env_columns)}}
    _edge_block_header(writer, 1)
    writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    for column in range(environment.operands[0].columns):
        _store_edge_tile(writer, 2, "grad_env_weights", column,
                         writer.terms(2, environment, 0, column, env_names, grad_environment))
    for column in range(environment.operands[1].columns):
        expression = writer.terms(2, environment, 1, column, env_names, grad_environment)
        writer.emit(2, f"tl.store(grad_harmonics_ptr + edges * grad_harmonics_stride_row + {column} * "
                       f"grad_harmonics_stride_column, tl.sum({expression}, axis=1), mask=edge_mask)")
    return name, function_source(name, arguments, writer.lines, writer.constants, writer.constants_at)


def _mixing_passes(layer: FusedLayerForm, columns_per_pass: int) -> list[list[MixingGroup]]:
    """The mixing groups packed in order into passes of at most `columns_per_pass` output columns (a group
    wider than that gets a pass of its own); one empty pass for a layer without mixing."""
    passes: list[list[MixingGroup]] = [[]]
    for group in layer.mixing:
        if passes[-1] and sum(g.dim for g in passes[-1]) + group.dim > columns_per_pass:
            passes.append([])
        passes[-1].append(group)
    return passes


def _tiled_preamble(writer: _KernelWriter) -> None:
    """Start of a channel-tiled kernel: its center's edges."""
    writer.emit(1, "center = tl.program_id(0).to(tl.int64)")
    writer.emit(1, "start = tl.load(center_ptr_ptr + center)")
    writer.emit(1, "stop = tl.load(center_ptr_ptr + center + 1)")
    writer.emit(1, "DTYPE = env_weights_ptr.dtype.element_ty")
    writer.constants_at = len(writer.lines)


def _output_chunk(writer: _KernelWriter, indent: int, stop: str = "num_channels") -> None:
    """A runtime loop over chunks of BLOCK_O output channels (`outs`): generated code does not grow with n."""
    writer.emit(indent, f"for out_start in range(0, {stop}, BLOCK_O):")
    writer.emit(indent + 1, "outs = out_start + tl.arange(0, BLOCK_O)")
    writer.emit(indent + 1, "out_mask = outs < num_channels")


def _channel_block(writer: _KernelWriter, indent: int) -> None:
    writer.emit(indent, "channels = channel_start + tl.arange(0, BLOCK_C)")
    writer.emit(indent, "channel_mask = channels < num_channels")
    writer.emit(indent, "channel_cols = channels[None, :]")


def _tiled_weight_tile(index: int) -> str:
    """Rows `channels` and columns `outs` (the output chunk) of mixing matrix `index`: (BLOCK_C, BLOCK_O)."""
    return (f"tl.load(weights_ptr + {index} * num_channels * num_channels + channels[:, None] * num_channels + "
            f"outs[None, :], mask=channel_mask[:, None] & out_mask[None, :], other=0.0)")


def _out_tile(name: str, column: int) -> str:
    """Address and mask of the (BLOCK_E, BLOCK_O) tile of output chunk `outs` of column `column` of `name`."""
    return (f"{name}_ptr + edge_rows * {name}_stride_row + {column} * {name}_stride_column + outs[None, :], "
            f"mask=edge_mask[:, None] & out_mask[None, :]")


_TILED_ARGUMENTS = ("BLOCK_E: tl.constexpr", "BLOCK_C: tl.constexpr", "DOT: tl.constexpr", "BLOCK_O: tl.constexpr")


def _generate_layer_tiled(layer: FusedLayerForm, columns_per_pass: int) -> tuple[str, str]:
    """Source of the fused layer for many channels: one program per center, per block of its edges, per pass (a
    few output irreps) and per chunk of BLOCK_O output channels (a runtime loop: the source does not depend on
    the channel count), a loop over blocks of BLOCK_C input channels that sums that block's environment in
    registers (recomputed: never stored), evaluates the product columns of the pass for those channels, stores
    the scalar columns (first pass, first chunk) and accumulates the mixing into (BLOCK_E, BLOCK_O) tiles of the
    chunk's output channels. Nothing but the scalars and the mixed features is written."""
    name = "fused_layer_tiled_kernel"
    writer = _KernelWriter(layer.first_features, layer.feature_pairs)
    arguments = ", ".join([*_input_arguments(layer), "weights_ptr", "scalars_ptr", "scalars_stride_row",
                           "scalars_stride_column", "mixed_ptr", "mixed_stride_row", "mixed_stride_column",
                           "center_ptr_ptr", "num_channels", *_TILED_ARGUMENTS])
    _tiled_preamble(writer)
    product = layer.product
    product_names = {s: product.operands[s].name for s in range(3)}
    first, last = layer.scalar_columns
    _edge_block_header(writer, 1)
    for index, groups in enumerate(_mixing_passes(layer, columns_per_pass)):
        outputs = [group.output_start + m for group in groups for m in range(group.dim)]
        _output_chunk(writer, 2, "num_channels" if outputs else "1")  # without mixing (last layer): one sweep
        for output in outputs:
            writer.emit(3, f"mixed_{output} = tl.zeros((BLOCK_E, BLOCK_O), dtype=DTYPE)")
        writer.emit(3, "for channel_start in range(0, num_channels, BLOCK_C):")
        _channel_block(writer, 4)
        writer.emit(4, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
        writer.values.clear()
        in_registers = _environment_rows(writer, 4, layer)
        computed: set[int] = set()

        def product_column(column: int) -> str:
            if column not in computed:
                expression = writer.terms(4, product, 2, column, product_names, in_registers)
                writer.emit(4, f"t_{column} = {expression or 'tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)'}")
                computed.add(column)
            return f"t_{column}"

        if index == 0 and last > first:  # the scalars (which the mixing of 0e reads too) stored in the first chunk
            values = [product_column(column) for column in range(first, last)]
            writer.emit(4, "if out_start == 0:")
            for column, value in zip(range(first, last), values):
                _store_edge_tile(writer, 5, "scalars", column - first, value)
        for group in groups:
            for j in range(group.num_paths):
                columns = [product_column(group.product_start + m * group.num_paths + j) for m in range(group.dim)]
                writer.emit(4, f"w = {_tiled_weight_tile(group.weight_start + j)}")
                for m, column in enumerate(columns):
                    output = group.output_start + m
                    writer.emit(4, f"mixed_{output} = mix(mixed_{output}, {column}, w, DOT)")
        for output in outputs:
            writer.emit(3, f"tl.store({_out_tile('mixed', output)}, value=mixed_{output})")
    return name, function_source(name, arguments, writer.lines, writer.constants, writer.constants_at)


def _generate_layer_backward_tiled(layer: FusedLayerForm) -> tuple[str, str]:
    """Source of the fused layer's backward for many channels: one program per center loops over blocks of
    BLOCK_C channels; per block it sums the environment in registers, then per block of edges forms the product's
    cotangent path by path (scalars' cotangent plus the transposed mixing of all output channels, a runtime loop
    over chunks of BLOCK_O output channels: unrolled, the rMD17 preset's backward was 660k lines of PTX that ptxas
    did not finish in 20 minutes; looped, it compiles in about 2 minutes), stores V's cotangent and sums the
    environment's; a last pass over the edges stores w's cotangent and this channel block's share of Y's
    (grad_harmonics has one slice per channel block, summed by the launcher: no atomics)."""
    name = "fused_layer_backward_tiled_kernel"
    writer = _KernelWriter(layer.first_features, layer.feature_pairs)
    arguments = ", ".join([*_backward_arguments(layer), "grad_harmonics_stride_block", "center_ptr_ptr", "num_channels",
                           *_TILED_ARGUMENTS])
    _tiled_preamble(writer)
    environment, product = layer.environment, layer.product
    env_names = {s: environment.operands[s].name for s in range(3)}
    product_names = {s: product.operands[s].name for s in range(3)}
    env_columns = environment.operands[2].columns
    writer.emit(1, "for channel_start in range(0, num_channels, BLOCK_C):")
    _channel_block(writer, 2)
    in_registers = _environment_rows(writer, 2, layer)
    for column in range(env_columns):
        writer.emit(2, f"grad_env_{column} = tl.zeros((BLOCK_C,), dtype=DTYPE)")

    # the product's cotangent path by path (the dim columns of path j of a mixing group, or the scalars that no
    # group mixes), its contributions to the cotangents of V and A accumulated: few product columns are live
    first, last = layer.scalar_columns
    scalars = set(range(first, last))
    pieces = [(group, j, [group.product_start + m * group.num_paths + j for m in range(group.dim)])
              for group in layer.mixing for j in range(group.num_paths)]
    mixed_columns = {column for _, _, columns in pieces for column in columns}
    if scalars - mixed_columns:
        pieces.append((None, None, sorted(scalars - mixed_columns)))
    _edge_block_header(writer, 2)
    writer.emit(3, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    writer.values.clear()
    grad_features: set[int] = set()
    for group, j, columns in pieces:
        writer.values.clear()  # reload V's tiles per path rather than keep them all live (registers)
        for column in columns:
            if column in scalars:
                writer.emit(3, f"gt_{column} = {_load_edge_tile('grad_scalars', column - first)}")
            else:
                writer.emit(3, f"gt_{column} = tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)")
        if group is not None:  # a runtime loop over the output chunks: the code does not grow with n
            _output_chunk(writer, 3)
            writer.emit(4, f"w = {_tiled_weight_tile(group.weight_start + j)}")
            for m, column in enumerate(columns):  # V^L's cotangent reloaded per path (L1/L2): few live tiles
                writer.emit(4, f"gv = tl.load({_out_tile('grad_mixed', group.output_start + m)}, other=0.0)")
                writer.emit(4, f"gt_{column} = mix_transposed(gt_{column}, gv, w)")
        cotangent = {2: {column: f"gt_{column}" for column in columns}}
        only = (2, set(columns))
        for column in range(product.operands[0].columns):
            expression = writer.terms(3, product, 0, column, product_names, {**in_registers, **cotangent}, only)
            if expression is not None:
                writer.emit(3, f"gf_{column} = {'gf_%d + ' % column if column in grad_features else ''}{expression}")
                grad_features.add(column)
        for column in range(env_columns):
            expression = writer.terms(3, product, 1, column, product_names, cotangent, only)
            if expression is not None:
                writer.emit(3, f"grad_env_{column} += tl.sum({expression}, axis=0)")
    _store_feature_cotangents(writer, 3, layer, {column: f"gf_{column}" for column in sorted(grad_features)},
                              "tl.cdiv(num_channels, BLOCK_C) + channel_start // BLOCK_C")
    for column in range(env_columns):
        writer.emit(2, f"grad_env_row_{column} = grad_env_{column}[None, :]")

    # the cotangents of the environment weights (this block's channels) and of the harmonics (this block's share)
    grad_environment = {2: {column: f"grad_env_row_{column}" for column in range(env_columns)}}
    _edge_block_header(writer, 2)
    writer.emit(3, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    writer.values.clear()
    for column in range(environment.operands[0].columns):
        _store_edge_tile(writer, 3, "grad_env_weights", column,
                         writer.terms(3, environment, 0, column, env_names, grad_environment))
    for column in range(environment.operands[1].columns):
        expression = writer.terms(3, environment, 1, column, env_names, grad_environment)
        writer.emit(3, f"tl.store(grad_harmonics_ptr + (channel_start // BLOCK_C) * grad_harmonics_stride_block + "
                       f"edges * grad_harmonics_stride_row + {column} * grad_harmonics_stride_column, "
                       f"tl.sum({expression}, axis=1), mask=edge_mask)")
    return name, function_source(name, arguments, writer.lines, writer.constants, writer.constants_at)


def _cache_directory() -> Path:
    root = os.environ.get("ALLEGRO_FAST_KERNEL_CACHE")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "allegro-fast", "kernels")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


_KERNELS: dict[tuple, object] = {}


def _load_generated(name: str, source: str):
    """Import generated source from a file (Triton reads a jit function's source back from its file)."""
    source = _HEADER + source
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = _cache_directory() / f"allegro_{digest}.py"
    if not path.exists() or path.read_text() != source:
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            stream.write(source)
        os.replace(temporary, path)
    spec = importlib.util.spec_from_file_location(f"allegro_fast_generated_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _slot_kernel(key: str, slot: int):
    def load():
        if (key, slot) not in _KERNELS:
            _KERNELS[(key, slot)] = _load_generated(*_generate_slot(_FORMS[key], slot))
        return _KERNELS[(key, slot)]

    return selected_kernel(f"slot {slot} of form {key}", load)


def _layer_kernel(key: str, backward: bool = False, launch: LayerLaunch | None = None):
    """The forward or backward kernel of a registered layer: the one-block kernel, or for a tiled `launch` the
    channel-tiled one (the forward specialised to its mixing passes)."""
    tiling = None
    if launch is not None and launch.tiled:  # the tiled sources depend on the launch only through the passes
        tiling = "tiled" if backward else launch.columns_per_pass
    cache_key = ("layer", key, backward, tiling)

    def load():
        if cache_key not in _KERNELS:
            layer = _LAYERS[key]
            if tiling is None:
                name, source = (_generate_layer_backward if backward else _generate_layer)(layer)
            elif backward:
                name, source = _generate_layer_backward_tiled(layer)
            else:
                name, source = _generate_layer_tiled(layer, launch.columns_per_pass)
            _KERNELS[cache_key] = _load_generated(name, _generate_environment_block(layer.environment) + "\n\n" + source)
        return _KERNELS[cache_key]

    tiled = "" if tiling is None else ", tiled" if backward else f", tiled, {tiling} columns per pass"
    return selected_kernel(f"layer {key} {'backward' if backward else 'forward'}{tiled}", load)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _strides(x: torch.Tensor, operand: Operand) -> tuple[int, int, int]:
    """(row, channel, column) strides of an operand tensor, stored (rows, columns[, channels])."""
    if not operand.has_channels:
        return x.stride(0), 0, x.stride(1)
    return x.stride(0), x.stride(2), x.stride(1)


def _output_shape(operand: Operand, rows: int, channels: int) -> tuple[int, ...]:
    return (rows, operand.columns, channels) if operand.has_channels else (rows, operand.columns)


SLOT_BLOCK_C = 16  # channels per slot program on a GPU (more channels: more programs)


def _block_sizes(channels: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_C) of the slot kernels. On a GPU at most 16 channels per program, with 8 warps: sm_90,
    Triton 3.6, the rMD17 preset's product slots spilled 200-456 B per thread in float32 (432-1792 B in float64)
    with 32 channels and 16 warps (128 registers each), 0-48 B (0-536 B) with 16 and 8 (255 registers)."""
    import triton

    if device.type == "cpu":  # the interpreter: few large programs are fastest
        return 32, triton.next_power_of_2(max(channels, 1))
    return 16, min(triton.next_power_of_2(max(channels, 1)), SLOT_BLOCK_C)


def _channels_of(form: TrilinearForm, slot: int, first: torch.Tensor, second: torch.Tensor) -> int:
    for s, x in zip(_other_slots(slot), (first, second)):
        operand = form.operands[s]
        if operand.has_channels:
            return x.shape[2]
    raise AssertionError("every form has a channel operand besides the output")


def _rows_of(form: TrilinearForm, slot: int, first: torch.Tensor, second: torch.Tensor,
             center_ptr: torch.Tensor) -> int:
    if form.operands[slot].per_center:
        return center_ptr.numel() - 1
    for s, x in zip(_other_slots(slot), (first, second)):
        if not form.operands[s].per_center:
            return x.shape[0]
    raise AssertionError("a form has one per-center operand")


def _launch_slot(key: str, slot: int, first: torch.Tensor, second: torch.Tensor, center_ptr: torch.Tensor) -> torch.Tensor:
    form = _FORMS[key]
    ensure_triton_device(first, second, center_ptr)
    channels = _channels_of(form, slot, first, second)
    out_operand = form.operands[slot]
    rows = _rows_of(form, slot, first, second, center_ptr)
    out = torch.empty(_output_shape(out_operand, rows, channels), dtype=first.dtype, device=first.device)
    num_centers = center_ptr.numel() - 1
    if out.numel() == 0:
        return out
    if num_centers == 0:
        return out.zero_()
    block_e, block_c = _block_sizes(channels, first.device)
    channel_blocks = 1 if not out_operand.has_channels else -(-channels // block_c)
    a, b = _other_slots(slot)
    arguments = []
    for s, x in zip((a, b), (first, second)):
        arguments += [x, *_strides(x, form.operands[s])]
    arguments += [out, *_strides(out, out_operand), center_ptr, channels]
    with nvtx_range(f"allegro_fast.tensor_product.slot{slot}.{out_operand.name}"):
        _slot_kernel(key, slot)[(num_centers, channel_blocks)](*arguments, BLOCK_E=block_e, BLOCK_C=block_c,
                                                                num_warps=_num_warps(block_e, block_c))
    return out


def _num_warps(block_e: int, block_c: int) -> int:
    """Warps per program: about one thread per element of a (BLOCK_E, BLOCK_C) tile, since a layer program
    holds such a tile of every product column at once (and a slot program of many). Chosen from ptxas's resource counts
    for sm_90 (`bench/gpu/kernel_resources.py`, compiled without a GPU): l_max 2, n 16 with 4 warps spills (255
    registers, 960 B of stack in the backward), with 8 it does not (240); n 32 needs 16 (8 warps spill 7 KB in the
    backward). Timed on an H200, the default model's layer kernels were faster with 4 warps all the same:
    `layer_launch` overrides this for them (FEW_WARPS_PRODUCT_COLUMNS); the slot kernels are untimed."""
    return max(4, min(16, block_e * block_c // 32))


TILE_CHANNELS_ABOVE = 32  # the one-block layer kernels up to this many channels, the channel-tiled ones above
# Output columns per pass x BLOCK_O: the tiled forward's mixing accumulators. sm_90, Triton 3.6, the rMD17 preset's
# first layer (31 output columns): 1024 (one pass) spilled 520 B per thread in float32, 512 (three passes) 40 B.
# More passes cost little: each product column is still computed and mixed once per chunk; only A and V's loads
# repeat per pass.
ACCUMULATOR_ELEMENTS = 512
TILED_BLOCK_C, TILED_BLOCK_O, TILED_WARPS = 16, 32, 8  # see `layer_launch`
# Output channels per chunk of the tiled backward's transposed mixing, whose (BLOCK_E, BLOCK_C, BLOCK_O) product is
# summed over the chunk. sm_90, Triton 3.6, the rMD17 preset's layers in float32: 32 spilled 624-712 B per thread,
# 16 spills 56-112 B (and compiles in half the time), 8 spills 232 B.
TILED_BACKWARD_BLOCK_O = 16


DOT_PRECISIONS = {"ieee": 1, "tf32x3": 3}  # LayerLaunch.dot_precision -> the kernels' DOT constexpr (see `mix`)


@dataclasses.dataclass(frozen=True)
class LayerLaunch:
    """How a fused layer's kernels are launched for n channels: BLOCK_E edges per step; BLOCK_C channels per
    program step (all, BLOCK_C = BLOCK_N, in the one-block kernels); with `columns_per_pass` set, the
    channel-tiled kernels, whose forward mixes that many output columns of BLOCK_O channels per pass and chunk."""

    block_e: int
    block_c: int
    block_n: int
    columns_per_pass: int | None
    num_warps: int
    block_o: int = 0  # output channels per mixing tile (tiled kernels)
    block_o_backward: int = 0  # output channels per chunk of the transposed mixing (tiled backward)
    num_stages: int | None = None  # Triton's software pipelining of the edge loops (None: Triton's default)
    # the one-block float32 kernels' mixing: "ieee" (tl.dot on the FMA units) or "tf32x3" (three TF32 tensor-core
    # products, see `mix`); untimed, so not a default
    dot_precision: str = "ieee"
    # ptxas's cap on registers per thread (Triton's maxnreg; None: ptxas's own choice, up to 255). The first layer's
    # kernels take 255, so an SM holds 8 of their warps; a cap of 128 holds 16 at the cost of spills (sm_90, Triton
    # 3.6, specialised as launched: the forward at 4 warps 56 B, the backward 1256 B). Untimed, so not a default.
    max_registers: int | None = None

    @property
    def options(self) -> dict:
        """The launch's keyword options besides the constexprs: num_warps, and num_stages and maxnreg where set."""
        return {"num_warps": self.num_warps, **({"num_stages": self.num_stages} if self.num_stages else {}),
                **({"maxnreg": self.max_registers} if self.max_registers else {})}

    @property
    def tiled(self) -> bool:
        return self.columns_per_pass is not None

    def constants(self, dtype: torch.dtype, backward: bool = False) -> dict:
        if not self.tiled:
            dot = 0 if dtype == torch.float64 else DOT_PRECISIONS[self.dot_precision]
            return {"BLOCK_E": self.block_e, "BLOCK_C": self.block_c, "DOT": dot}
        return {"BLOCK_E": self.block_e, "BLOCK_C": self.block_c, "DOT": 0,
                "BLOCK_O": self.block_o_backward if backward else self.block_o}


# Warps of the one-block float32 kernels at n <= 16 (BLOCK_N 16) whose product has at most this many columns: 4, not
# `_num_warps`'s 8. Timed on an H200 (Triton 3.6, 262,144 edges, `bench/gpu/tune_layer.py`, results/gpu-h200-2026-12-04/
# tune-layer.json): the default model's first layer (35 product columns) forward 1.043 -> 0.675 ms, backward 1.730 ->
# 1.320 ms, its last layer (3 columns) 0.302 -> 0.232 and 0.993 -> 0.524 ms, outputs within 1.9e-7 of the 8-warp
# launch's; though ptxas gives the first layer's backward 255 registers and 856 B of spill at 4 warps (8 warps: 40 B).
# Larger products (l_max 3: 99-156 columns; l_max 2 middle layers: 51) keep 8 warps: untimed, and at 4 warps ptxas
# spills up to 8 KB there.
# A second sweep from 4 warps (same size, results/gpu-h200-2026-12-04-warps/tune-layer.json) found 2 warps faster for
# two of the four kernels: the first layer's forward 0.617 -> 0.496 ms and the last layer's backward 0.502 -> 0.437
# ms, while 2 warps slowed the other two (first backward 1.271 -> 1.402 ms, last forward 0.184 -> 0.204 ms). So
# among these layers: 2 warps for the forward of a layer that mixes and the backward of one that does not, else 4.
FEW_WARPS_PRODUCT_COLUMNS = 35


def layer_launch(channels: int, dtype: torch.dtype, device_type: str, product_columns: int | None = None, *,
                 backward: bool = False, mixes: bool = True) -> LayerLaunch:
    """The launch of a fused layer's forward (or `backward`) kernel with `channels` channels (and `product_columns`
    columns in its product, and whether it `mixes` channels into V: all layers but the last; these pick the warps
    of small float32 layers, see FEW_WARPS_PRODUCT_COLUMNS; product_columns None: the rule without them).

    Up to TILE_CHANNELS_ABOVE one program holds all channels, and the mixing is tl.dot (IEEE float32) of
    (BLOCK_E, BLOCK_N) tiles. Above, such tiles do not fit in registers (sm_90, ptxas: n = 64 with l_max 2 spilled
    2 KB per thread; n = 128 with l_max 3 did not compile within 15 minutes), so the channel-tiled kernels loop
    over blocks of 16 channels and mix into chunks of 32 output channels by multiply-and-sum in both precisions:
    on Triton 3.6 and 3.9, tl.dot without tensor cores made ptxas fall back to 32 registers and spill 6-8 KB at
    n = 128, multiply-and-sum with 8 warps spills 224 B (the l_max 3 middle layer's forward; blocks of 8
    channels: 424 B)."""
    block_n = max(16, 1 << max(channels - 1, 0).bit_length())  # tl.dot takes no side below 16 on a GPU
    block_e = 32 if device_type == "cpu" else 16  # the interpreter: few large programs are fastest
    if channels <= TILE_CHANNELS_ABOVE:
        warps = _num_warps(block_e, block_n)
        if (dtype == torch.float32 and block_n == 16 and product_columns is not None
                and product_columns <= FEW_WARPS_PRODUCT_COLUMNS):
            warps = 2 if mixes != backward else 4  # the mixing forward, the backward without mixing: 2
        return LayerLaunch(block_e, block_n, block_n, None, warps)
    block_o = min(block_n, TILED_BLOCK_O)
    return LayerLaunch(block_e, min(block_n, TILED_BLOCK_C), block_n, max(1, ACCUMULATOR_ELEMENTS // block_o),
                       TILED_WARPS, block_o, min(block_n, TILED_BACKWARD_BLOCK_O))


def fused_layer_launch(layer: FusedLayerForm, channels: int, dtype: torch.dtype, device_type: str,
                       backward: bool = False) -> LayerLaunch:
    """`layer_launch` for a registered layer's forward (or backward) kernel: its product's columns, and whether
    it mixes (all layers but the last)."""
    return layer_launch(channels, dtype, device_type, layer.product.operands[2].columns, backward=backward,
                        mixes=layer.output_dim > 0)


def _input_tensors(layer: FusedLayerForm, env_weights: torch.Tensor, harmonics: torch.Tensor,
                   features: torch.Tensor, feature_harmonics: torch.Tensor | None,
                   second_pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
    """The kernel arguments of w, Y, the features and (first layer) V^0's Y, `harmonics` unless given apart, and
    (a layer of two feature pairs) the second pair (w0_b, Y_b)."""
    if feature_harmonics is not None and not layer.first_features:
        raise ValueError("feature_harmonics is an operand of the first layer's kernels only")
    if (second_pair is not None) != (layer.feature_pairs == 2):
        raise ValueError(f"second_pair is the operand of a layer of two feature pairs (`paired_layer_key`): this "
                         f"layer has {layer.feature_pairs}, and second_pair is {'not ' * (second_pair is None)}given")
    arguments = [env_weights, *_strides(env_weights, layer.environment.operands[0]),
                 harmonics, *_strides(harmonics, layer.environment.operands[1]),
                 features, *_strides(features, layer.product.operands[0])]
    if layer.first_features:
        feature_harmonics = harmonics if feature_harmonics is None else feature_harmonics
        arguments += [feature_harmonics, *_strides(feature_harmonics, layer.environment.operands[1])]
    if second_pair is not None:
        w0_b, y_b = second_pair
        arguments += [w0_b, *_strides(w0_b, layer.product.operands[0]),
                      y_b, *_strides(y_b, layer.environment.operands[1])]
    return arguments


def layer_call(key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
               weights: torch.Tensor, center_ptr: torch.Tensor, device_type: str | None = None,
               feature_harmonics: torch.Tensor | None = None,
               second_pair: tuple[torch.Tensor, torch.Tensor] | None = None):
    """What `_launch_layer` launches: (launch, kernel arguments, (scalars, mixed)), the outputs allocated and
    unwritten; launch None where there is nothing to launch. `device_type` (default: the tensors') picks the launch:
    "cuda" on CPU tensors gives a GPU launch's arguments (`bench/gpu/kernel_resources.py` compiles the kernels with
    the specialisation a launch would give them). In the first layer, `feature_harmonics` is the Y that forms
    V^0 = w0 (x) Y (default: `harmonics`, the environment's); in a layer of two feature pairs (`paired_layer_key`),
    `second_pair` = (w0_b, Y_b) adds w0_b (x) Y_b to V^0."""
    layer = _LAYERS[key]
    num_edges, _, channels = features.shape
    first, last = layer.scalar_columns
    scalars = features.new_empty((num_edges, last - first, channels))
    mixed = features.new_empty((num_edges, layer.output_dim, channels))
    if num_edges == 0 or channels == 0:
        return None, [], (scalars, mixed)
    launch = fused_layer_launch(layer, channels, features.dtype, device_type or features.device.type)
    # A layer without mixing passes the scalars as stand-ins: no program reads or writes them.
    mixed_or_any = mixed if mixed.numel() else scalars
    arguments = [*_input_tensors(layer, env_weights, harmonics, features, feature_harmonics, second_pair),
                 weights if weights.numel() else scalars,
                 scalars, scalars.stride(0), scalars.stride(1), mixed_or_any, mixed_or_any.stride(0),
                 mixed_or_any.stride(1), center_ptr, channels]
    return launch, arguments, (scalars, mixed)


def _launch_layer(key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
                  weights: torch.Tensor, center_ptr: torch.Tensor, feature_harmonics: torch.Tensor | None = None,
                  second_pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ensure_triton_device(env_weights, harmonics, features, weights, center_ptr)
    launch, arguments, outputs = layer_call(key, env_weights, harmonics, features, weights, center_ptr,
                                            feature_harmonics=feature_harmonics, second_pair=second_pair)
    if launch is not None:
        with nvtx_range("allegro_fast.fused_layer"):
            _layer_kernel(key, False, launch)[(center_ptr.numel() - 1,)](
                *arguments, **launch.constants(features.dtype), **launch.options)
    return outputs


def layer_backward_call(key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
                        weights: torch.Tensor, grad_scalars: torch.Tensor, grad_mixed: torch.Tensor,
                        center_ptr: torch.Tensor, device_type: str | None = None,
                        feature_harmonics: torch.Tensor | None = None,
                        second_pair: tuple[torch.Tensor, torch.Tensor] | None = None):
    """What `_launch_layer_backward` launches: (launch, kernel arguments, (grad_env_weights, grad_harmonics,
    grad_features)), the outputs allocated and unwritten (grad_harmonics (E, slices, D): the environment's share,
    then in the first layer V^0's, each in one slice per channel block, summed after the launch); launch None where
    there is nothing to launch (then grad_harmonics is (E, D), final). `device_type`, `feature_harmonics` and
    `second_pair` as in `layer_call`; with two feature pairs, grad_features is the cotangent of w0_b, and V^0's share
    of Y's that of Y_v (`_store_feature_cotangents`)."""
    layer = _LAYERS[key]
    num_edges, _, channels = features.shape
    grad_env_weights = torch.empty_like(env_weights)
    grad_harmonics = torch.empty_like(harmonics)
    grad_features = torch.empty_like(features)
    if num_edges == 0:
        return None, [], (grad_env_weights, grad_harmonics, grad_features)
    if channels == 0:
        return None, [], (grad_env_weights, grad_harmonics.zero_(), grad_features)
    launch = fused_layer_launch(layer, channels, features.dtype, device_type or features.device.type, backward=True)
    # Slices of Y's cotangent, summed below in a fixed order: the environment's share, one per channel block of the
    # tiled kernel; in the first layer as many again for V^0's share. Stored (E, slices, D): no stride depends on E
    # (Triton specialises on integers divisible by 16, and precompiled kernels must fit every structure).
    blocks = -(-channels // launch.block_c) if launch.tiled else 1
    slices = blocks * (2 if layer.first_features else 1)
    grad_harmonics = harmonics.new_empty((num_edges, slices, harmonics.shape[1]))
    mixed_or_any = grad_mixed if grad_mixed.numel() else grad_scalars
    arguments = [*_input_tensors(layer, env_weights, harmonics, features, feature_harmonics, second_pair),
                 weights if weights.numel() else grad_scalars,
                 grad_scalars, grad_scalars.stride(0), grad_scalars.stride(1),
                 mixed_or_any, mixed_or_any.stride(0), mixed_or_any.stride(1),
                 grad_features, grad_features.stride(0), grad_features.stride(1),
                 grad_env_weights, grad_env_weights.stride(0), grad_env_weights.stride(1),
                 grad_harmonics, grad_harmonics.stride(0), grad_harmonics.stride(2), grad_harmonics.stride(1),
                 center_ptr, channels]
    return launch, arguments, (grad_env_weights, grad_harmonics, grad_features)


def _launch_layer_backward(key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
                           weights: torch.Tensor, grad_scalars: torch.Tensor, grad_mixed: torch.Tensor,
                           center_ptr: torch.Tensor, feature_harmonics: torch.Tensor | None = None,
                           split: bool = False,
                           second_pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """(grad_env_weights, grad_harmonics, grad_features); with `split` (the first layer) Y's cotangent in two, the
    environment's share and V^0's (the cotangent of `feature_harmonics`): four tensors. `second_pair`: as in
    `layer_backward_call`."""
    ensure_triton_device(env_weights, harmonics, features, weights, grad_scalars, grad_mixed, center_ptr)
    launch, arguments, outputs = layer_backward_call(key, env_weights, harmonics, features, weights, grad_scalars,
                                                     grad_mixed, center_ptr, feature_harmonics=feature_harmonics,
                                                     second_pair=second_pair)
    grad_env_weights, grad_harmonics, grad_features = outputs
    if launch is None:
        return (*outputs, torch.zeros_like(grad_harmonics)) if split else outputs
    with nvtx_range("allegro_fast.fused_layer.backward"):
        _layer_kernel(key, True, launch)[(center_ptr.numel() - 1,)](
            *arguments, **launch.constants(features.dtype, backward=True), **launch.options)

    def summed(slices: torch.Tensor) -> torch.Tensor:
        return slices[:, 0] if slices.shape[1] == 1 else slices.sum(1)

    if split:
        blocks = grad_harmonics.shape[1] // 2
        return (grad_env_weights, summed(grad_harmonics[:, :blocks]), grad_features,
                summed(grad_harmonics[:, blocks:]))
    return grad_env_weights, summed(grad_harmonics), grad_features


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library): usable under torch.compile(fullgraph=True) and torch.export
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("allegro_fast::trilinear_slot", mutates_args=())
def trilinear_slot(form_key: str, slot: int, first: torch.Tensor, second: torch.Tensor,
                   center_ptr: torch.Tensor) -> torch.Tensor:
    """Slot `slot` of a registered trilinear form, from the two other operands in slot order."""
    return _launch_slot(form_key, slot, first.contiguous(), second.contiguous(), center_ptr)


@trilinear_slot.register_fake
def _(form_key, slot, first, second, center_ptr):
    form = _FORMS[form_key]
    channels = _channels_of(form, slot, first, second)
    if form.operands[slot].per_center:
        rows = center_ptr.shape[0] - 1
    else:
        rows = next(x.shape[0] for s, x in zip(_other_slots(slot), (first, second)) if not form.operands[s].per_center)
    return first.new_empty(_output_shape(form.operands[slot], rows, channels))


def _trilinear_setup(ctx, inputs, output) -> None:
    form_key, slot, first, second, center_ptr = inputs
    ctx.form_key, ctx.slot = form_key, slot
    ctx.save_for_backward(first, second, center_ptr)


def _trilinear_backward(ctx, grad):
    """d(slot s)/d(x_r) . grad = slot r evaluated with grad in place of x_s (f is trilinear)."""
    first, second, center_ptr = ctx.saved_tensors
    slot = ctx.slot
    operands = dict(zip(_other_slots(slot), (first, second)))
    operands[slot] = grad.contiguous()
    grads = []
    for r, needed in zip(_other_slots(slot), ctx.needs_input_grad[2:4]):
        if not needed:
            grads.append(None)
            continue
        x, y = (operands[s] for s in _other_slots(r))
        grads.append(trilinear_slot(ctx.form_key, r, x, y, center_ptr))
    return None, None, grads[0], grads[1], None


trilinear_slot.register_autograd(_trilinear_backward, setup_context=_trilinear_setup)


@torch.library.custom_op("allegro_fast::fused_layer", mutates_args=())
def fused_layer(layer_key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
                weights: torch.Tensor, center_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused layer of a registered `FusedLayerForm`: env_weights w (E, l_max+1, n) (1/sqrt(avg neighbours)
    folded in), harmonics Y (E, (l_max+1)^2), features V^{L-1} (E, D_in, n) (in the first layer w^0 (E, l_max+1,
    n): the kernel forms V^0 = w^0 (x) Y in registers), stacked mixing weights
    (num_weights, n, n) (normalisation folded in; (0, n, n) in the last layer), edges sorted by center with
    CSR pointers center_ptr (N + 1,). Returns (scalars (E, S, n), mixed V^L (E, D_out, n))."""
    return _launch_layer(layer_key, env_weights.contiguous(), harmonics.contiguous(), features.contiguous(),
                         weights.contiguous(), center_ptr)


@fused_layer.register_fake
def _(layer_key, env_weights, harmonics, features, weights, center_ptr):
    layer = _LAYERS[layer_key]
    num_edges, _, channels = features.shape
    first, last = layer.scalar_columns
    return (features.new_empty((num_edges, last - first, channels)),
            features.new_empty((num_edges, layer.output_dim, channels)))


def _layer_setup(ctx, inputs, output) -> None:
    layer_key, env_weights, harmonics, features, weights, center_ptr = inputs
    ctx.layer_key = layer_key
    ctx.save_for_backward(env_weights, harmonics, features, weights, center_ptr)


def _product_cotangent(layer: FusedLayerForm, grad_scalars: torch.Tensor | None, grad_mixed: torch.Tensor | None,
                       weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The cotangent of the product T (E, P, n), block by block, from those of the scalars and the mixing
    (the transposed mixing: plain matmuls, differentiable for double backward)."""
    num_edges, channels = like.shape[0], like.shape[2]
    pieces: dict[int, tuple[int, torch.Tensor]] = {}  # start column -> (stop, cotangent)
    first, last = layer.scalar_columns
    if grad_scalars is not None:
        pieces[first] = (last, grad_scalars)
    if grad_mixed is not None:
        for group in layer.mixing:
            stop = group.product_start + group.dim * group.num_paths
            matrix = weights[group.weight_start:group.weight_start + group.num_paths].reshape(-1, channels)
            block = grad_mixed[:, group.output_start:group.output_start + group.dim].reshape(-1, channels)
            piece = (block @ matrix.t()).view(num_edges, -1, channels)
            if group.product_start in pieces:  # the scalar block, mixed as well
                piece = pieces[group.product_start][1] + piece
            pieces[group.product_start] = (stop, piece)
    columns, at = [], 0
    for start in sorted(pieces):
        stop, piece = pieces[start]
        if start > at:
            columns.append(like.new_zeros((num_edges, start - at, channels)))
        columns.append(piece)
        at = stop
    total = layer.product.operands[2].columns
    if at < total:
        columns.append(like.new_zeros((num_edges, total - at, channels)))
    return torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]


WEIGHT_GRADIENT_CHUNKS = 8  # edge ranges of the mixing weights' cotangent: T is held for one range at a time
WEIGHT_GRADIENT_MIN_EDGES = 1024  # below this, one range


def _mixing_weight_gradient(layer: FusedLayerForm, terms: Sequence[tuple[torch.Tensor | tuple, torch.Tensor]],
                            grad_mixed: torch.Tensor, center_ptr: torch.Tensor) -> torch.Tensor:
    """The cotangent of the stacked mixing weights, sum_e T^T gV per path, for T = sum over `terms` (V, A) of the
    product of the features V (E, D_in, n) (V^0 in the first layer) with the environment A (N, D2, n): T is
    recomputed (product slot kernel) range of edges by range, each range's sums are matmuls, added in a fixed
    order (no atomics). No (E, P, n) tensor is formed: a range's pointers are center_ptr shifted and clamped to
    it, so every center's program sees only its edges in the range (static shapes: no host sync). In the first
    layer V may be given as pairs (w0, Y): V = sum of w0 (x) Y, formed range by range."""
    num_edges, channels = grad_mixed.shape[0], grad_mixed.shape[2]
    # a traced program (symbolic edge count) always takes the ranges: a range may be empty, no guard on E
    symbolic = isinstance(num_edges, torch.SymInt)
    chunks = WEIGHT_GRADIENT_CHUNKS if symbolic or num_edges > WEIGHT_GRADIENT_MIN_EDGES else 1
    # inner bounds at multiples of 16 edges: every range's rows start 16-byte aligned, as Triton specialises on it
    bounds = [0, *(num_edges * index // chunks // 16 * 16 for index in range(1, chunks)), num_edges]
    total = None
    for start, stop in zip(bounds[:-1], bounds[1:]):
        pointers = (center_ptr - start).clamp(0, stop - start)
        grad = grad_mixed[start:stop]
        for features, environment in terms:
            if isinstance(features, torch.Tensor):
                chunk = features[start:stop]
            else:
                chunk = None
                for w0, y in features:
                    chunk = _accumulate(chunk, layer_features(layer, w0[start:stop], y[start:stop]))
            product = trilinear_slot(layer.product.key, 2, chunk, environment, pointers)
            parts = []
            for group in layer.mixing:
                block = product[:, group.product_start:group.product_start + group.dim * group.num_paths]
                rows = grad[:, group.output_start:group.output_start + group.dim].reshape(-1, channels)
                # explicit sizes: a range may be empty, and a traced range's size is symbolic
                matrix = block.reshape(rows.shape[0], group.num_paths * channels)
                parts.append((matrix.t() @ rows).view(group.num_paths, channels, channels))
            piece = torch.cat(parts) if len(parts) > 1 else parts[0]
            total = piece if total is None else total + piece
    return total


def _layer_backward(ctx, grad_scalars, grad_mixed):
    """One kernel for the cotangents of w, Y and V (`fused_layer_backward`); the mixing weights' cotangent,
    where this backward pass uses one, from recomputed T. Force evaluation passes the weights detached; the
    force pass of training (autograd.grad to the positions) leaves them attached but wants no gradient for
    them, which `gradient_wanted` asks the autograd engine (ctx.needs_input_grad says only that they require
    grad): that pass skips the recomputation of T and its matmuls."""
    layer = _LAYERS[ctx.layer_key]
    env_weights, harmonics, features, weights, center_ptr = ctx.saved_tensors
    need_env_weights, need_harmonics, need_features, need_weights = ctx.needs_input_grad[1:5]
    need_weights = need_weights and gradient_wanted(weights)
    if grad_scalars is None:
        first, last = layer.scalar_columns
        grad_scalars = features.new_zeros((features.shape[0], last - first, features.shape[2]))
    if grad_mixed is None:
        grad_mixed = features.new_zeros((features.shape[0], layer.output_dim, features.shape[2]))
    grad_env_weights = grad_harmonics = grad_features = grad_weights = None
    if need_env_weights or need_harmonics or need_features:
        grad_env_weights, grad_harmonics, grad_features = fused_layer_backward(
            ctx.layer_key, env_weights, harmonics, features, weights, grad_scalars, grad_mixed, center_ptr)
    if need_weights and layer.mixing:
        environment = trilinear_slot(layer.environment.key, 2, env_weights, harmonics, center_ptr)
        grad_weights = _mixing_weight_gradient(layer, [(layer_features(layer, features, harmonics), environment)],
                                               grad_mixed, center_ptr)
    elif need_weights:
        grad_weights = torch.zeros_like(weights)
    return (None, grad_env_weights if need_env_weights else None, grad_harmonics if need_harmonics else None,
            grad_features if need_features else None, grad_weights, None)


fused_layer.register_autograd(_layer_backward, setup_context=_layer_setup)


@torch.library.custom_op("allegro_fast::fused_layer_backward", mutates_args=())
def fused_layer_backward(layer_key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
                         weights: torch.Tensor, grad_scalars: torch.Tensor, grad_mixed: torch.Tensor,
                         center_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cotangents (w, Y, V) of `fused_layer` for those of its outputs, in one kernel per center atom:
    neither the environment, its cotangent nor anything of the product reaches memory."""
    return _launch_layer_backward(layer_key, env_weights.contiguous(), harmonics.contiguous(), features.contiguous(),
                                  weights.contiguous(), grad_scalars.contiguous(), grad_mixed.contiguous(), center_ptr)


@fused_layer_backward.register_fake
def _(layer_key, env_weights, harmonics, features, weights, grad_scalars, grad_mixed, center_ptr):
    return torch.empty_like(env_weights), torch.empty_like(harmonics), torch.empty_like(features)


def composed_layer_backward(layer: FusedLayerForm, env_weights: torch.Tensor, harmonics: torch.Tensor,
                            features: torch.Tensor, weights: torch.Tensor, grad_scalars: torch.Tensor,
                            grad_mixed: torch.Tensor, center_ptr: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`fused_layer_backward` from differentiable ops (five slot kernels and matmuls; in the first layer V^0 and
    its cotangent's chain to w0 and Y in plain torch): a second derivation of the same function, which the tests
    hold the kernel to."""
    v = layer_features(layer, features, harmonics)
    environment = trilinear_slot(layer.environment.key, 2, env_weights, harmonics, center_ptr)
    grad_product = _product_cotangent(layer, grad_scalars, grad_mixed, weights, v)
    grad_features = trilinear_slot(layer.product.key, 0, environment, grad_product, center_ptr)
    grad_environment = trilinear_slot(layer.product.key, 1, v, grad_product, center_ptr)
    grad_harmonics = trilinear_slot(layer.environment.key, 1, env_weights, grad_environment, center_ptr)
    if layer.first_features:
        grad_features, grad_first_harmonics = first_feature_cotangents(layer, grad_features, features, harmonics)
        grad_harmonics = grad_harmonics + grad_first_harmonics
    return (trilinear_slot(layer.environment.key, 0, harmonics, grad_environment, center_ptr), grad_harmonics,
            grad_features)


_TWINS: dict[str, str] = {}  # layer key -> its plain twin's key


def plain_layer_key(key: str) -> str:
    """The key of the registered layer `key` reading its features V from memory: the first layer's twin that takes
    V^0 itself (registered once: every force-training step's double backward asks, and a layer's key is a hash)."""
    if key not in _TWINS:
        _TWINS[key] = register_layer(dataclasses.replace(_LAYERS[key], first_features=()))
    return _TWINS[key]


_PAIRED: dict[str, str] = {}  # first layer key -> the key of its form with two feature pairs


def paired_layer_key(key: str) -> str:
    """The key of the registered first layer `key` with two feature pairs: V^0 = w0 (x) Y_v + w0_b (x) Y_b (the
    double backward's direction that varies V^0 both ways, u_w0 (x) Y + w0 (x) u_Y, in one launch)."""
    if key not in _PAIRED:
        _PAIRED[key] = register_layer(dataclasses.replace(_LAYERS[key], feature_pairs=2))
    return _PAIRED[key]


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """total + value, in place where no autograd graph records it (inside `fused_layer_double_backward`, whose
    pieces are all fresh tensors): one buffer per sum, not one per term."""
    if total is None:
        return value
    if torch.is_grad_enabled() and (total.requires_grad or value.requires_grad):
        return total + value
    return total.add_(value)


def _add_layer_outputs(grads: list[torch.Tensor | None], outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A direction's layer outputs (scalars, mixed), added to the cotangents of (gS, gV')."""
    grads[4] = _accumulate(grads[4], outputs[0])
    grads[5] = _accumulate(grads[5], outputs[1])


def _direction_outputs(key: str, direction: Sequence[torch.Tensor], weights: torch.Tensor,
                       grads: list[torch.Tensor | None], center_ptr: torch.Tensor) -> None:
    """The layer's outputs for one direction of dT (the forward kernel), added to the cotangents of (gS, gV')."""
    _add_layer_outputs(grads, fused_layer(key, *direction, weights, center_ptr))


def _mixing_terms(layer: FusedLayerForm, directions: Sequence[Sequence[torch.Tensor]],
                  center_ptr: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (V, A) products of dT for `_mixing_weight_gradient`: the environments of the directions that share V
    summed first."""
    terms = []
    for v in {id(direction[2]): direction[2] for direction in directions}.values():
        environments = [trilinear_slot(layer.environment.key, 2, w, y, center_ptr) for w, y, u in directions if u is v]
        terms.append((v, sum(environments[1:], environments[0])))
    return terms


def _backward_vjp(key: str, tensors: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
                  needed: Sequence[bool], center_ptr: torch.Tensor) -> list[torch.Tensor | None]:
    """The vector-Jacobian product of `fused_layer_backward` for a layer that reads V, from the layer's own
    kernels: none of them stores the product T or its cotangent (E, P, n).

    The backward's outputs are the gradient of <g_T, T(w, Y, V)>, with g_T linear in the cotangents (gS, gV') and
    the weights W. Paired with cotangents (u_w, u_Y, u_V), they give the directional derivative
    <g_T, dT>, dT = T(u_w, Y, V) + T(w, u_Y, V) + T(w, Y, u_V) (T is trilinear in (w, Y, V): the environment is
    bilinear in (w, Y), the product bilinear in (V, A)). So, with one direction per cotangent:
    - (w, Y, V) get the gradient of <g_T, T(.)> at each direction, the backward kernel once per direction, each
      input taking its share from the directions that keep it (T(u_w, Y, V) gives Y's and V's);
    - gS and gV' get the layer's outputs for dT, the forward kernel once per direction;
    - W gets sum_e dT^T gV' (`_mixing_weight_gradient`).
    One direction's outputs are held at a time, added into the sums as they come. Every piece is a
    differentiable op, so orders beyond the second follow."""
    layer = _LAYERS[key]
    weights, grad_scalars, grad_mixed = tensors[3:]
    grads: list[torch.Tensor | None] = [None] * 6
    directions = _directions(tensors[:3], cotangents)
    for d, direction in directions:
        if any(needed[slot] for slot in range(3) if slot != d):
            outputs = fused_layer_backward(key, *direction, weights, grad_scalars, grad_mixed, center_ptr)
            for slot in range(3):
                if slot != d and needed[slot]:
                    grads[slot] = _accumulate(grads[slot], outputs[slot])
            del outputs
        if needed[4] or needed[5]:
            _direction_outputs(key, direction, weights, grads, center_ptr)
    if needed[3] and layer.mixing and directions:
        grads[3] = _mixing_weight_gradient(layer, _mixing_terms(layer, [x for _, x in directions], center_ptr),
                                           grad_mixed, center_ptr)
    return _needed_gradients(tensors, grads, needed)


def _directions(inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None]):
    """(d, (w, Y, V) with input d replaced by its cotangent) for every cotangent that is not None."""
    return [(d, tuple(u if slot == d else x for slot, x in enumerate(inputs)))
            for d, u in enumerate(cotangents) if u is not None]


def _first_layer_backward_vjp(key: str, tensors: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
                              needed: Sequence[bool], center_ptr: torch.Tensor) -> list[torch.Tensor | None]:
    """The vector-Jacobian product of the first layer's `fused_layer_backward`, through its plain twin (which reads
    V^0 from memory). The first layer's backward is the twin's, B(w, Y, V^0) = (g_w, g_Y, g_V), with V^0 = w0 (x) Y
    and g_V chained to (w0, Y) by the transpose of V^0's Jacobian J. Paired with cotangents (u_w, u_Y, u_w0):
    <u_w, g_w> + <u_Y, g_Y> + <dV, g_V>, dV = J (u_w0, u_Y) = u_w0 (x) Y + w0 (x) u_Y. So `_backward_vjp` of the
    twin with cotangents (u_w, u_Y, dV), where every V^0 cotangent is chained by J^T as soon as the twin's backward
    returns it (they are the largest tensors here); and dV's own dependence on Y (through u_w0 (x) Y) and on w0
    (through w0 (x) u_Y), paired with g_V: a by-product of the twin's backward in dV's direction, since the
    backward's V cotangent does not depend on V. dV's direction runs first and V^0 is formed after dV is
    dropped, so one (E, D, n) feature tensor is held at a time."""
    layer = _LAYERS[key]
    twin = plain_layer_key(key)
    env_weights, harmonics, w0, weights, grad_scalars, grad_mixed = tensors
    grad_w, grad_y, grad_w0 = cotangents
    need_w, need_y, need_w0, need_weights = needed[:4]
    need_outputs = needed[4] or needed[5]
    grads: list[torch.Tensor | None] = [None] * 6

    def add(slot: int, value: torch.Tensor) -> None:
        grads[slot] = _accumulate(grads[slot], value)

    def chain(grad_v: torch.Tensor, features: torch.Tensor, y: torch.Tensor, to_w0: bool, to_y: bool) -> None:
        if to_w0 or to_y:
            chained_w0, chained_y = first_feature_cotangents(layer, grad_v, features, y, to_w0, to_y)
            if to_w0:
                add(2, chained_w0)
            if to_y:
                add(1, chained_y)

    def run(d: int, direction: tuple[torch.Tensor, ...]) -> None:
        """The twin's backward and forward kernels in direction d, with the V^0 cotangent chained at once."""
        if need_w and d != 0 or need_y or need_w0:
            outputs = fused_layer_backward(twin, *direction, weights, grad_scalars, grad_mixed, center_ptr)
            if need_w and d != 0:
                add(0, outputs[0])
            if need_y and d != 1:
                add(1, outputs[1])
            if d != 2:
                chain(outputs[2], w0, harmonics, need_w0, need_y)
            else:  # g_V, paired with dV's dependence on Y and on w0
                if grad_w0 is not None:
                    chain(outputs[2], grad_w0, harmonics, False, need_y)
                if grad_y is not None:
                    chain(outputs[2], w0, grad_y, need_w0, False)
            del outputs
        if need_outputs:
            _direction_outputs(twin, direction, weights, grads, center_ptr)

    tangent = None  # dV
    for a, b in ((grad_w0, harmonics), (w0, grad_y)):
        if a is not None and b is not None:
            tangent = _accumulate(tangent, layer_features(layer, a, b))
    if tangent is not None:
        run(2, (env_weights, harmonics, tangent))
        if need_weights and layer.mixing:
            add(3, _mixing_weight_gradient(layer, _mixing_terms(layer, [(env_weights, harmonics, tangent)], center_ptr),
                                           grad_mixed, center_ptr))
        del tangent
    if grad_w is not None or grad_y is not None:
        v = layer_features(layer, w0, harmonics)
        directions = _directions((env_weights, harmonics, v), (grad_w, grad_y, None))
        for d, direction in directions:
            run(d, direction)
        if need_weights and layer.mixing:
            add(3, _mixing_weight_gradient(layer, _mixing_terms(layer, [x for _, x in directions], center_ptr),
                                           grad_mixed, center_ptr))
    return _needed_gradients(tensors, grads, needed)


def _first_layer_split_vjp(key: str, tensors: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
                           needed: Sequence[bool], center_ptr: torch.Tensor) -> list[torch.Tensor | None]:
    """The vector-Jacobian product of the first layer's `fused_layer_backward` on the first layer's own kernels,
    with no tensor of V^0's size (E, D_in, n) but the output gV': what `fused_layer_double_backward` runs there.

    The first layer is F(w, Y_e, w0, Y_v) at Y_e = Y_v = Y, linear in each of the four (the environment bilinear in
    (w, Y_e), V^0 = w0 (x) Y_v, T bilinear in (V^0, A)); its kernels take Y_v apart (`feature_harmonics`) and its
    backward returns Y's cotangent as the two shares (Y_e's, Y_v's). Y's cotangent u_Y is paired with both, so this
    is `_backward_vjp` with four inputs: one direction per cotangent of (w, Y_e, w0, Y_v), the backward kernel giving
    the other three inputs their share (Y's two shares added into Y's), the forward kernel giving (gS, gV') theirs,
    and the mixing weights sum_e dT^T gV' with V^0 formed range by range. The two directions that vary V^0 share
    one launch of the layer of two feature pairs (`paired_layer_key`): V^0 = u_w0 (x) Y + w0 (x) u_Y, whose backward
    returns the cotangents of Y_v in the first (V^0's cotangent times u_w0) and of w0 in the second (times u_Y). So
    three launches each way, as through the twin. Raw launches, not differentiable: the derivative of
    `fused_layer_double_backward` (third order and beyond) is autograd through `_first_layer_backward_vjp`, the
    same function by way of the plain twin."""
    layer = _LAYERS[key]
    env_weights, harmonics, w0, weights, grad_scalars, grad_mixed = (x.contiguous() for x in tensors)
    grad_w, grad_y, grad_w0 = (None if u is None else u.contiguous() for u in cotangents)
    # (layer key, (w, Y_e, w0, Y_v), second pair, the layer input that each backward output adds to, or None)
    runs = []
    if grad_w is not None:
        runs.append((key, (grad_w, harmonics, w0, harmonics), None, (None, 1, 2, 1)))
    if grad_y is not None:
        runs.append((key, (env_weights, grad_y, w0, harmonics), None, (0, None, 2, 1)))
    varied_features = [pair for pair, u in (((grad_w0, harmonics), grad_w0), ((w0, grad_y), grad_y)) if u is not None]
    if len(varied_features) == 2:
        runs.append((paired_layer_key(key), (env_weights, harmonics, grad_w0, harmonics), (w0, grad_y), (0, 1, 2, 1)))
    elif grad_w0 is not None:
        runs.append((key, (env_weights, harmonics, grad_w0, harmonics), None, (0, 1, None, 1)))
    elif grad_y is not None:
        runs.append((key, (env_weights, harmonics, w0, grad_y), None, (0, 1, 2, None)))
    grads: list[torch.Tensor | None] = [None] * 6
    for run_key, inputs, second_pair, targets in runs:
        if any(needed[target] for target in targets if target is not None):
            outputs = _launch_layer_backward(run_key, *inputs[:3], weights, grad_scalars, grad_mixed, center_ptr,
                                             feature_harmonics=inputs[3], split=True, second_pair=second_pair)
            for target, output in zip(targets, outputs):
                if target is not None and needed[target]:
                    grads[target] = _accumulate(grads[target], output)
            del outputs
        if needed[4] or needed[5]:
            _add_layer_outputs(grads, _launch_layer(run_key, *inputs[:3], weights, center_ptr,
                                                    feature_harmonics=inputs[3], second_pair=second_pair))
    if needed[3] and layer.mixing and runs:
        def environment(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return trilinear_slot(layer.environment.key, 2, w, y, center_ptr)

        terms = []  # (V^0 as (w0, Y) pairs, A): dT's products grouped by what they vary, two terms as in the runs
        varied_environment = [environment(w, y) for w, y in ((grad_w, harmonics), (env_weights, grad_y))
                              if w is not None and y is not None]
        if varied_environment:
            terms.append((((w0, harmonics),), sum(varied_environment[1:], varied_environment[0])))
        if varied_features:
            terms.append((tuple(varied_features), environment(env_weights, harmonics)))
        grads[3] = _mixing_weight_gradient(layer, terms, grad_mixed, center_ptr)
    return _needed_gradients(tensors, grads, needed)


def _needed_gradients(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                      needed: Sequence[bool]) -> list[torch.Tensor | None]:
    """A gradient for every input that needs one (zeros where nothing reached it), None for the others."""
    return [(x.new_zeros(x.shape) if g is None else g) if need else None for x, g, need in zip(tensors, grads, needed)]


def layer_backward_vjp(key: str, tensors: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
                       needed: Sequence[bool], center_ptr: torch.Tensor,
                       differentiable: bool = True) -> list[torch.Tensor | None]:
    """The vector-Jacobian product of `fused_layer_backward` (inputs `tensors` = (w, Y, V, W, gS, gV'), cotangents
    of its outputs (w, Y, V)) from differentiable ops: `_backward_vjp`, through the plain twin in the first layer
    (`_first_layer_backward_vjp`), what the derivative of `fused_layer_double_backward` differentiates. Not
    `differentiable`: the op's own body, the same but in the first layer `_first_layer_split_vjp`."""
    if not _LAYERS[key].first_features:
        vjp = _backward_vjp
    else:
        vjp = _first_layer_backward_vjp if differentiable else _first_layer_split_vjp
    return vjp(key, tensors, cotangents, needed, center_ptr)


@torch.library.custom_op("allegro_fast::fused_layer_double_backward", mutates_args=())
def fused_layer_double_backward(
        layer_key: str, env_weights: torch.Tensor, harmonics: torch.Tensor, features: torch.Tensor,
        weights: torch.Tensor, grad_scalars: torch.Tensor, grad_mixed: torch.Tensor,
        grad_env_weights: torch.Tensor | None, grad_harmonics: torch.Tensor | None, grad_features: torch.Tensor | None,
        center_ptr: torch.Tensor, needed: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cotangents of `fused_layer_backward`'s inputs (w, Y, V, W, gS, gV') for those of its outputs (force
    training's loss backward): `layer_backward_vjp` as one op, an empty tensor for an input not `needed`; every
    output contiguous. As one op, its pieces run in the order written there, whatever a compiler would make of
    them: inductor, given the pieces, held every direction's outputs at once (the compiled training step's peak,
    CPU, default model: 15.4 KB per edge then, 13.4 as one op). In the first layer it runs
    `_first_layer_split_vjp` (the first layer's kernels: no V^0, dV or V^0 cotangent in memory), not the twin's
    way that its derivative differentiates."""
    tensors = (env_weights, harmonics, features, weights, grad_scalars, grad_mixed)
    with nvtx_range("allegro_fast.fused_layer.double_backward"):
        grads = layer_backward_vjp(layer_key, tensors, (grad_env_weights, grad_harmonics, grad_features), needed,
                                   center_ptr, differentiable=False)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for x, g in zip(tensors, grads))


@fused_layer_double_backward.register_fake
def _(layer_key, env_weights, harmonics, features, weights, grad_scalars, grad_mixed, grad_env_weights,
      grad_harmonics, grad_features, center_ptr, needed):
    tensors = (env_weights, harmonics, features, weights, grad_scalars, grad_mixed)
    return tuple(x.new_empty(x.shape if need else (0,)) for x, need in zip(tensors, needed))


def _double_backward_setup(ctx, inputs, output) -> None:
    ctx.layer_key, ctx.needed = inputs[0], inputs[-1]
    ctx.save_for_backward(*inputs[1:-1])


def _double_backward_derivative(ctx, *output_grads):
    """The derivative of `fused_layer_double_backward` (a layer's third derivative and beyond): autograd through
    `layer_backward_vjp`, recomputed from the saved inputs; with create_graph, on the inputs themselves, so every
    further order follows."""
    *inputs, center_ptr = ctx.saved_tensors
    wanted = ctx.needs_input_grad[1:10]
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [x if x is None or create and x.requires_grad else x.detach().requires_grad_(want)
                  for x, want in zip(inputs, wanted)]
        outputs = layer_backward_vjp(ctx.layer_key, leaves[:6], leaves[6:], ctx.needed, center_ptr)
        pairs = [(out, grad) for out, grad in zip(outputs, output_grads)
                 if out is not None and out.requires_grad and grad is not None]
        targets = [i for i, (x, want) in enumerate(zip(leaves, wanted)) if want and x is not None]
        grads: list[torch.Tensor | None] = [None] * 9
        if pairs and targets:
            found = torch.autograd.grad([out for out, _ in pairs], [leaves[i] for i in targets],
                                        [grad for _, grad in pairs], create_graph=create, allow_unused=True)
            for i, g in zip(targets, found):
                grads[i] = g
        for i in targets:
            if grads[i] is None:  # nothing reached it
                grads[i] = torch.zeros_like(leaves[i])
    return (None, *grads, None, None)


fused_layer_double_backward.register_autograd(_double_backward_derivative, setup_context=_double_backward_setup)


def _layer_backward_setup(ctx, inputs, output) -> None:
    ctx.layer_key = inputs[0]
    ctx.save_for_backward(*inputs[1:])


def _layer_double_backward(ctx, grad_env_weights, grad_harmonics, grad_features):
    """Force training's double backward (and every higher order): `fused_layer_double_backward`."""
    *tensors, center_ptr = ctx.saved_tensors
    needed = list(ctx.needs_input_grad[1:7])
    grads = fused_layer_double_backward(ctx.layer_key, *tensors, grad_env_weights, grad_harmonics, grad_features,
                                        center_ptr, needed)
    return (None, *(g if need else None for g, need in zip(grads, needed)), None)


fused_layer_backward.register_autograd(_layer_double_backward, setup_context=_layer_backward_setup)
