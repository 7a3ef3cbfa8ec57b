"""Sums over contiguous segments of rows without atomics: the triton backend's scatters to atoms and structures.

    segment_sum(values (M, C), ptr (S + 1,), segment_of (M,))      -> (S, C)  out[s] = sum of values[ptr[s]:ptr[s + 1]]
    segment_expand(values (S, C), ptr (S + 1,), segment_of (M,))   -> (M, C)  out[r] = values[segment_of[r]]

segment_of is the segment of every row (ptr[s] <= r < ptr[s + 1] for s = segment_of[r]): the graph has it already
(the edges' centers, the atoms' structures), and with it the expansion is one gather, where building it from ptr
took four more launches (the lengths, an arange, repeat_interleave's cumsum and fill). segment_sum only keeps it
for its backward.

The two are each other's adjoint, so each one's backward is the other and every order of derivative stays in
this pair. Edges are sorted by center and atoms by structure (`AtomicGraph`), so the sums of per-edge values to
their center atoms, of per-atom values to their structures, and the gradients of per-atom and per-structure
values gathered to edges and atoms (positions, cell, strain) are all segment sums. torch's `index_add` does them
on CUDA with float atomics, whose order changes from run to run: energies, forces and stress then differ in the
last bits between two identical calls. Here one program per segment adds its rows in a fixed order (blocks of
BLOCK_R rows, then a fixed reduction tree), so they are bitwise the same on every run.

A gather by an index that is not sorted (the neighbour j of every edge) becomes a segment_expand over the rows
sorted by that index, followed by a permutation (`gather_rows`): a permutation's backward writes every row once,
which atomics do in a fixed result.
"""

from __future__ import annotations

import torch

from ._common import ensure_triton_device, nvtx_range

_KERNEL = None
# Rows per step of a segment's loop: 64 for the edges of an atom (tens to a hundred), 1024 where segments are long
# (the atoms of a structure: one structure of 32000 atoms in 32 steps, not 500 dependent ones).
BLOCK_ROWS, BLOCK_ROWS_LONG = 64, 1024


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def segment_sum_kernel(values_ptr, ptr_ptr, out_ptr, num_columns, BLOCK_R: tl.constexpr,
                               BLOCK_C: tl.constexpr):
            segment = tl.program_id(0).to(tl.int64)
            start = tl.load(ptr_ptr + segment)
            stop = tl.load(ptr_ptr + segment + 1)
            columns = tl.arange(0, BLOCK_C)
            column_mask = columns < num_columns
            total = tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty)
            for row_start in range(start, stop, BLOCK_R):
                rows = row_start + tl.arange(0, BLOCK_R)
                mask = (rows < stop)[:, None] & column_mask[None, :]
                total += tl.load(values_ptr + rows[:, None] * num_columns + columns[None, :], mask=mask, other=0.0)
            tl.store(out_ptr + segment * num_columns + columns, tl.sum(total, axis=0), mask=column_mask)

        _KERNEL = segment_sum_kernel
    return _KERNEL


@torch.library.custom_op("allegro_fast::segment_sum", mutates_args=())
def segment_sum(values: torch.Tensor, ptr: torch.Tensor, segment_of: torch.Tensor) -> torch.Tensor:
    """(M, C) values, (S + 1,) int64 segment pointers (ptr[0] = 0, ptr[S] = M, non-decreasing), (M,) the segment of
    every row (for the backward) -> (S, C) sums."""
    import triton

    values, ptr = values.contiguous(), ptr.contiguous()
    ensure_triton_device(values, ptr)
    num_segments, num_columns = ptr.shape[0] - 1, values.shape[1]
    out = values.new_empty((num_segments, num_columns))
    if num_segments > 0 and num_columns > 0:
        with nvtx_range("allegro_fast.segment_sum"):
            long = values.shape[0] >= 4 * BLOCK_ROWS * num_segments
            _kernel()[(num_segments,)](values, ptr, out, num_columns, BLOCK_R=BLOCK_ROWS_LONG if long else BLOCK_ROWS,
                                       BLOCK_C=triton.next_power_of_2(num_columns))
    return out


@segment_sum.register_fake
def _(values, ptr, segment_of):
    return values.new_empty((ptr.shape[0] - 1, values.shape[1]))


@torch.library.custom_op("allegro_fast::segment_expand", mutates_args=())
def segment_expand(values: torch.Tensor, ptr: torch.Tensor, segment_of: torch.Tensor) -> torch.Tensor:
    """(S, C) values, (S + 1,) segment pointers, (M,) the segment of every row -> (M, C): each row gets its
    segment's values (ptr is for the backward)."""
    return values.index_select(0, segment_of)


@segment_expand.register_fake
def _(values, ptr, segment_of):
    return values.new_empty((segment_of.shape[0], values.shape[1]))


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:])


def _sum_backward(ctx, grad):
    return segment_expand(grad, *ctx.saved_tensors), None, None


def _expand_backward(ctx, grad):
    return segment_sum(grad, *ctx.saved_tensors), None, None


segment_sum.register_autograd(_sum_backward, setup_context=_setup)
segment_expand.register_autograd(_expand_backward, setup_context=_setup)


def sorted_order(index: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, ...]:
    """For an unsorted (M,) index into num_segments: (order, inverse, ptr, sorted_index) with sorted_index =
    index[order] sorted (stably), inverse the permutation that undoes order, and ptr the segment pointers of the
    sorted index."""
    order = torch.argsort(index, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    boundaries = torch.arange(num_segments + 1, device=index.device, dtype=index.dtype)
    sorted_index = index.index_select(0, order)
    return order, inverse, torch.searchsorted(sorted_index, boundaries), sorted_index


def gather_rows(values: torch.Tensor, inverse: torch.Tensor, ptr: torch.Tensor,
                sorted_index: torch.Tensor) -> torch.Tensor:
    """values[index] (M, C) for an unsorted index given by `sorted_order`'s inverse, ptr and sorted_index: the
    expansion over the sorted rows, then the permutation (whose backward writes each row once), so the backward
    sums in a fixed order."""
    return segment_expand(values, ptr, sorted_index).index_select(0, inverse)
