"""The environment sum and the channel-wise tensor product of an Allegro layer, as generated Triton kernels.

Math (DESIGN section 1, item 4). Edges e = (i, j) are sorted by center i; `center_ptr` (N + 1,) holds the
CSR row pointers, so the edges of center i are center_ptr[i]:center_ptr[i + 1]. With n channels c,

    environment   A[i, c, k] = sum_{e in N(i)} w[e, l(k), c] Y[e, k]          k = (l, m) spherical-harmonic column
    tensor product T[e, c, q] = sum_{(a, b, q, g)} g V[e, c, a] A[i(e), c, b]  over the Clebsch-Gordan nonzeros g

(the 1/sqrt(avg_num_neighbors) normalisation is folded into w by the caller). Both are contractions of a
*trilinear form* f(x0, x1, x2) = sum_e sum_c sum_{(a, b, d, g)} g x0[., c, a] x1[., c, b] x2[., c, d], in which
exactly one operand is indexed by the center atom i(e) and the others by the edge e:

    environment form     x0 = w (E, l_max+1, n)   x1 = Y (E, D2), no channel axis   x2 = A' (N, n, D2) per center
    tensor-product form  x0 = V (E, n, D1)        x1 = A (N, n, D2) per center      x2 = T' (E, n, P)

"Slot s of a form" is the partial derivative df/dx_s as a function of the two other operands: slot 2 of the
environment form is the environment sum, slot 2 of the tensor-product form is the product T. Because f is
trilinear, the vector-Jacobian product of slot s with respect to an input x_r is slot r with the cotangent put
in place of x_s: backward is made of the same six kernels, and so are double and higher backward (force
training differentiates the force, itself a backward). Per-edge outputs are written by the program of the
edge's center, per-center outputs reduce over that center's edges inside one program: no atomics anywhere,
results are bitwise reproducible.

Kernels are generated from the layer's `LayerTensorProduct` (the Clebsch-Gordan nonzeros become unrolled
constant multiply-adds) and cached on disk, because Triton compiles a `@triton.jit` function from its source
file. One program owns one center atom and one block of channels (grid (N, ceil(n / BLOCK_C))); it walks the
center's edges in blocks of BLOCK_E. The fused forward `environment_tensor_product` computes A in registers
from the center's edges, then T for the same edges; A is written out only so that backward can use it
(N x n x D2 numbers, small next to the E x n x P of T).
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

from ._common import ensure_triton_device, nvtx_range

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


_FORMS: dict[str, TrilinearForm] = {}


def register_form(form: TrilinearForm) -> str:
    """Make a form known to the custom ops (they take its key); returns the key."""
    _FORMS.setdefault(form.key, form)
    return form.key


def _other_slots(slot: int) -> tuple[int, int]:
    return tuple(s for s in range(3) if s != slot)  # type: ignore[return-value]


def _as_edge_channel_columns(x: torch.Tensor, operand: Operand) -> torch.Tensor:
    """Tensor of one operand as (rows, channels or 1, columns) for the reference einsum."""
    if not operand.has_channels:
        return x.unsqueeze(1)
    if operand.name == "env_weights":
        return x.transpose(1, 2)  # stored (E, l_max+1, n)
    return x


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
    if not operand.has_channels:
        out = out.sum(1)
    elif operand.name == "env_weights":
        out = out.transpose(1, 2)
    if operand.per_center:
        reduced = torch.zeros((num_centers, *out.shape[1:]), dtype=out.dtype, device=out.device)
        out = reduced.index_add(0, center, out)
    return out.contiguous()


# --------------------------------------------------------------------------------------------------
# Code generation
# --------------------------------------------------------------------------------------------------


class _KernelWriter:
    """Emits the body of one generated kernel. Operands are read through (pointer, row, channel, column)
    strides; `values` caches the loaded tiles of the current edge block by (operand name, column)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.values: dict[tuple[str, int], str] = {}
        self.constants: dict[float, str] = {}

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def constant(self, value: float) -> str:
        if value not in self.constants:
            self.constants[value] = f"g{len(self.constants)}"
        return self.constants[value]

    def edge_tile(self, indent: int, name: str, operand: Operand, column: int) -> str:
        """A (BLOCK_E, BLOCK_C) tile (or (BLOCK_E, 1) without channels) of a per-edge operand."""
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
              center_values: dict[int, dict[int, str]]) -> str | None:
        """Sum of the products that make output column `column` of `slot`, or None if there are none."""
        a, b = _other_slots(slot)
        products = []
        for entry in form.entries:
            if entry[slot] != column:
                continue
            factors = []
            for s in (a, b):
                operand = form.operands[s]
                if s in center_values:
                    factors.append(center_values[s][entry[s]])
                elif operand.per_center:
                    factors.append(self.center_vector(indent, names[s], entry[s]))
                else:
                    factors.append(self.edge_tile(indent, names[s], operand, entry[s]))
            value = entry[3]
            product = f"{factors[0]} * {factors[1]}"
            products.append(product if value == 1.0 else f"{self.constant(value)} * {product}")
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

'''


def _operand_arguments(name: str) -> str:
    return f"{name}_ptr, {name}_stride_row, {name}_stride_channel, {name}_stride_column"


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


def _generate_fused(environment: TrilinearForm, product: TrilinearForm) -> tuple[str, str]:
    """Source of the fused forward: the environment sum of a center in registers, then the product of its edges."""
    name = "environment_tensor_product_kernel"
    writer = _KernelWriter()
    arguments = ", ".join([_operand_arguments("env_weights"), _operand_arguments("harmonics"),
                           _operand_arguments("features"), "product_ptr", "product_stride_row",
                           "product_stride_channel", "product_stride_column", "environment_ptr",
                           "environment_stride_row", "environment_stride_channel", "environment_stride_column",
                           "center_ptr_ptr", "num_channels", "BLOCK_E: tl.constexpr", "BLOCK_C: tl.constexpr"])
    _program_preamble(writer, loop_channels=False)
    writer.emit(1, "DTYPE = product_ptr.dtype.element_ty")
    constants_at = len(writer.lines)
    env_names = {s: environment.operands[s].name for s in range(3)}
    env_columns = environment.operands[2].columns
    for column in range(env_columns):
        writer.emit(1, f"env_{column} = tl.zeros((BLOCK_C,), dtype=DTYPE)")
    _edge_block_header(writer, 1)
    writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    for column in range(env_columns):
        expression = writer.terms(2, environment, 2, column, env_names, {})
        writer.emit(2, f"env_{column} += tl.sum({expression}, axis=0)")
    for column in range(env_columns):
        writer.emit(1, f"tl.store(environment_ptr + center * environment_stride_row + channels * "
                       f"environment_stride_channel + {column} * environment_stride_column, env_{column}, "
                       f"mask=channel_mask)")
        writer.emit(1, f"env_row_{column} = env_{column}[None, :]")
    writer.values.clear()
    product_names = {s: product.operands[s].name for s in range(3)}
    in_registers = {1: {column: f"env_row_{column}" for column in range(env_columns)}}
    _edge_block_header(writer, 1)
    writer.emit(2, "tile_mask = edge_mask[:, None] & channel_mask[None, :]")
    for column in range(product.operands[2].columns):
        expression = writer.terms(2, product, 2, column, product_names, in_registers)
        expression = expression or "tl.zeros((BLOCK_E, BLOCK_C), dtype=DTYPE)"
        writer.emit(2, f"tl.store(product_ptr + edge_rows * product_stride_row + channel_cols * "
                       f"product_stride_channel + {column} * product_stride_column, {expression}, mask=tile_mask)")
    return name, function_source(name, arguments, writer.lines, writer.constants, constants_at)


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
    if (key, slot) not in _KERNELS:
        _KERNELS[(key, slot)] = _load_generated(*_generate_slot(_FORMS[key], slot))
    return _KERNELS[(key, slot)]


def _fused_kernel(environment_key: str, product_key: str):
    if (environment_key, product_key) not in _KERNELS:
        source = _generate_fused(_FORMS[environment_key], _FORMS[product_key])
        _KERNELS[(environment_key, product_key)] = _load_generated(*source)
    return _KERNELS[(environment_key, product_key)]


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _strides(x: torch.Tensor, operand: Operand) -> tuple[int, int, int]:
    """(row, channel, column) strides of an operand tensor in its storage layout."""
    if not operand.has_channels:
        return x.stride(0), 0, x.stride(1)
    if operand.name == "env_weights":  # (E, l_max+1, n)
        return x.stride(0), x.stride(2), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _output_shape(operand: Operand, rows: int, channels: int) -> tuple[int, ...]:
    if not operand.has_channels:
        return (rows, operand.columns)
    if operand.name == "env_weights":
        return (rows, operand.columns, channels)
    return (rows, channels, operand.columns)


def _block_sizes(channels: int, device: torch.device) -> tuple[int, int]:
    import triton

    if device.type == "cpu":  # the interpreter: few large programs are fastest
        return 32, triton.next_power_of_2(max(channels, 1))
    return 16, min(triton.next_power_of_2(max(channels, 1)), 32)


def _channels_of(form: TrilinearForm, slot: int, first: torch.Tensor, second: torch.Tensor) -> int:
    for s, x in zip(_other_slots(slot), (first, second)):
        operand = form.operands[s]
        if operand.has_channels:
            return x.shape[2] if operand.name == "env_weights" else x.shape[1]
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
        _slot_kernel(key, slot)[(num_centers, channel_blocks)](*arguments, BLOCK_E=block_e, BLOCK_C=block_c)
    return out


def _launch_fused(environment_key: str, product_key: str, env_weights: torch.Tensor, harmonics: torch.Tensor,
                  features: torch.Tensor, center_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    environment_form_, product_form = _FORMS[environment_key], _FORMS[product_key]
    ensure_triton_device(env_weights, harmonics, features, center_ptr)
    num_edges, channels = features.shape[0], features.shape[1]
    num_centers = center_ptr.numel() - 1
    product = torch.empty((num_edges, channels, product_form.operands[2].columns), dtype=features.dtype,
                          device=features.device)
    environment = torch.empty((num_centers, channels, environment_form_.operands[2].columns), dtype=features.dtype,
                              device=features.device)
    if num_centers == 0 or channels == 0:
        return product, environment
    block_e, block_c = _block_sizes(channels, features.device)
    arguments = [env_weights, *_strides(env_weights, environment_form_.operands[0]),
                 harmonics, *_strides(harmonics, environment_form_.operands[1]),
                 features, *_strides(features, product_form.operands[0]),
                 product, *product.stride(), environment, *environment.stride(), center_ptr, channels]
    with nvtx_range("allegro_fast.environment_tensor_product"):
        _fused_kernel(environment_key, product_key)[(num_centers, -(-channels // block_c))](
            *arguments, BLOCK_E=block_e, BLOCK_C=block_c)
    return product, environment


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


@torch.library.custom_op("allegro_fast::environment_tensor_product", mutates_args=())
def environment_tensor_product(environment_key: str, product_key: str, env_weights: torch.Tensor,
                               harmonics: torch.Tensor, features: torch.Tensor,
                               center_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (product T (E, n, P), environment A (N, n, D2)); see the module docstring."""
    return _launch_fused(environment_key, product_key, env_weights, harmonics.contiguous(), features.contiguous(),
                         center_ptr)


@environment_tensor_product.register_fake
def _(environment_key, product_key, env_weights, harmonics, features, center_ptr):
    product_columns = _FORMS[product_key].operands[2].columns
    environment_columns = _FORMS[environment_key].operands[2].columns
    num_edges, channels = features.shape[0], features.shape[1]
    return (features.new_empty((num_edges, channels, product_columns)),
            features.new_empty((center_ptr.shape[0] - 1, channels, environment_columns)))


def _fused_setup(ctx, inputs, output) -> None:
    environment_key, product_key, env_weights, harmonics, features, center_ptr = inputs
    ctx.keys = (environment_key, product_key)
    ctx.save_for_backward(env_weights, harmonics, features, center_ptr, output[1])


def _fused_backward(ctx, grad_product, grad_environment):
    environment_key, product_key = ctx.keys
    env_weights, harmonics, features, center_ptr, environment = ctx.saved_tensors
    need_weights, need_harmonics, need_features = ctx.needs_input_grad[2:5]
    grad_features = grad_weights = grad_harmonics = None
    total = grad_environment
    if grad_product is not None:
        grad_product = grad_product.contiguous()
        if need_features:
            grad_features = trilinear_slot(product_key, 0, environment, grad_product, center_ptr)
        if need_weights or need_harmonics:
            from_product = trilinear_slot(product_key, 1, features, grad_product, center_ptr)
            total = from_product if total is None else total + from_product
    if total is not None:
        if need_weights:
            grad_weights = trilinear_slot(environment_key, 0, harmonics, total, center_ptr)
        if need_harmonics:
            grad_harmonics = trilinear_slot(environment_key, 1, env_weights, total, center_ptr)
    return None, None, grad_weights, grad_harmonics, grad_features, None


environment_tensor_product.register_autograd(_fused_backward, setup_context=_fused_setup)
