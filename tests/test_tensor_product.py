"""The shared tensor-product description against e3nn, and the torch backend's compact ops against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from e3nn import o3

from allegro_fast.potential import float64_construction
from allegro_fast.tensor_product import describe_layers, irrep_offsets, irreps_string
from allegro_fast.torch_ops import CompactTensorProduct


@pytest.mark.parametrize("l_max,parity,num_layers", [(1, True, 2), (2, True, 3), (3, True, 2), (2, False, 2), (3, False, 1)])
def test_description_matches_e3nn_uuu_tensor_product(l_max, parity, num_layers):
    n = 3
    rng = np.random.default_rng(l_max * 10 + num_layers)
    for layer in describe_layers(num_layers, l_max, parity, n):
        with float64_construction():
            tp = o3.TensorProduct(
                irreps_string(layer.irreps_in1, n), irreps_string(layer.irreps_in2, n),
                "+".join(f"{n}x{irreps_string((p.irrep_out,), 1)[2:]}" for p in layer.paths),
                [(p.in1, p.in2, p.index, "uuu", False) for p in layer.paths],
            )
        x1 = rng.standard_normal((11, tp.irreps_in1.dim))
        x2 = rng.standard_normal((11, tp.irreps_in2.dim))
        expected = tp(torch.as_tensor(x1), torch.as_tensor(x2)).numpy()
        np.testing.assert_allclose(layer(x1, x2), expected, rtol=0, atol=1e-12)


def test_paths_follow_selection_rules():
    for layer in describe_layers(3, 3, True, 4):
        for path in layer.paths:
            assert abs(path.l1 - path.l2) <= path.l_out <= min(path.l1 + path.l2, 3)
            assert path.p_out == path.p1 * path.p2
        assert set(layer.scalar_paths) <= set(layer.needed_paths)
    last = describe_layers(3, 3, True, 4)[-1]
    assert last.is_last and set(last.needed_paths) == set(last.scalar_paths)


def test_needed_paths_are_exactly_those_reaching_the_energy():
    first, last = describe_layers(2, 2, True, 4)
    used_by_last = {last.irreps_in1[last.paths[i].in1] for i in last.scalar_paths}
    for path in first.paths:
        reaches = path.is_scalar or path.irrep_out in used_by_last
        assert (path.index in first.needed_paths) == reaches


@pytest.mark.parametrize("l_max,parity", [(2, True), (3, False)])
def test_compact_tensor_product_matches_description(l_max, parity):
    n = 4
    layer = describe_layers(2, l_max, parity, n)[1]
    inputs = layer.irreps_in1
    with float64_construction():
        compact = CompactTensorProduct(layer, inputs, tuple(range(len(layer.paths))))
    rng = np.random.default_rng(1)
    v = rng.standard_normal((9, n, irrep_offsets(inputs)[-1]))
    a = rng.standard_normal((9, n, (l_max + 1) ** 2))
    # The compact op takes and returns channels last.
    out = compact(torch.as_tensor(v).transpose(1, 2), torch.as_tensor(a).transpose(1, 2)).transpose(1, 2).numpy()
    # description layout is irrep-major (n, 2l+1) blocks.
    flat_v = np.concatenate([v[:, :, s:e].reshape(9, -1) for s, e in zip(irrep_offsets(inputs)[:-1], irrep_offsets(inputs)[1:])], 1)
    flat_a = np.concatenate([a[:, :, l * l:(l + 1) ** 2].reshape(9, -1) for l in range(l_max + 1)], 1)
    expected = layer(flat_v, flat_a)
    offset = 0
    for path in layer.paths:
        dim = 2 * path.l_out + 1
        rows = [compact.output_row(path.index, m) for m in range(dim)]
        np.testing.assert_allclose(out[:, :, rows].reshape(9, -1), expected[:, offset:offset + n * dim], atol=1e-12)
        offset += n * dim


def test_flop_count_is_positive_and_scales_with_edges():
    layer = describe_layers(2, 2, True, 16)[0]
    assert layer.flop(200) == 2 * layer.flop(100) > 0
