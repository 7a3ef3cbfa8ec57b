"""The Triton kernels against their plain-torch references, gradcheck and gradgradcheck of every custom op,
determinism, and the whole model with backend="triton" against the e3nn reference (DESIGN section 5).

On a machine without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), ~100x slower than torch: sizes stay at a few dozen edges. On a
CUDA machine the same tests run on the device (marked `cuda`).
"""

from __future__ import annotations

import importlib.util
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import (
    TRITON_DEVICES,
    ethanol,
    lonely_and_pair,
    periodic_cho,
    randomize_edge_scale,
    small_config,
)

import allegro_fast as af
from allegro_fast.tensor_product import describe_layers
from allegro_fast.testing import TOLERANCE, relative_error
from allegro_fast.torch_ops import _GroupedPaths

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


DEVICES = TRITON_DEVICES


def random_csr(neighbour_counts, device, seed=0):
    """CSR pointers and center index for centers with the given neighbour counts (zeros and ones included)."""
    counts = torch.tensor(neighbour_counts)
    center_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
    center = torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)
    return center_ptr, center


def forms(l_max: int, parity: bool, channels: int, layer: int = 1):
    from allegro_fast.kernels import tensor_product as kernels

    descriptions = describe_layers(3, l_max, parity, channels)
    description = descriptions[layer]
    grouped = _GroupedPaths(description, description.needed_paths)
    product = kernels.tensor_product_form(description, description.irreps_in1, grouped.output_row,
                                          description.needed_paths, grouped.output_dim)
    return kernels.environment_form(l_max), product


def layer_form(l_max: int, parity: bool, channels: int, layer: int, num_layers: int = 3, first: bool | None = None):
    """The fused form of one layer, mixing into the irreps that the next layer reads (none in the last). Layer 0
    reads w0 and Y and forms V^0 in registers (as the model's), unless first=False (then it reads V^0 itself)."""
    from allegro_fast.kernels import tensor_product as kernels

    descriptions = describe_layers(num_layers, l_max, parity, channels)
    description = descriptions[layer]
    grouped = _GroupedPaths(description, description.needed_paths)
    output_irreps = [] if layer == num_layers - 1 else [
        irrep for irrep in grouped.irrep_blocks if irrep in descriptions[layer + 1].irreps_in1]
    return kernels.fused_layer_form(description, description.irreps_in1, grouped, output_irreps,
                                    first=layer == 0 if first is None else first)


def operands(form, center_ptr, channels, dtype, device, generator):
    """Random tensors for the three operands of a form, stored (rows, columns[, channels])."""
    num_centers, num_edges = center_ptr.numel() - 1, int(center_ptr[-1])
    tensors = []
    for operand in form.operands:
        rows = num_centers if operand.per_center else num_edges
        shape = (rows, operand.columns, channels) if operand.has_channels else (rows, operand.columns)
        tensors.append(torch.randn(shape, dtype=dtype, generator=generator).to(device))
    return tensors


def layer_inputs(layer, center_ptr, channels, dtype, device, generator):
    """Random (env_weights, harmonics, features (w0 in the first layer), mixing weights) for a fused layer."""
    weights, harmonics, _ = operands(layer.environment, center_ptr, channels, dtype, device, generator)
    features = torch.randn(weights.shape[0], layer.feature_columns, channels, dtype=dtype, generator=generator)
    features = features.to(device)
    mixing = torch.randn(layer.num_weights, channels, channels, dtype=dtype, generator=generator).to(device)
    return weights, harmonics, features, mixing


def backward_inputs(layer, center_ptr, channels, device, generator):
    """Random float64 inputs of a fused layer's backward: `layer_inputs` and cotangents of (scalars, mixed)."""
    num_edges = int(center_ptr[-1])
    return [*layer_inputs(layer, center_ptr, channels, torch.float64, device, generator),
            *(torch.randn(num_edges, columns, channels, dtype=torch.float64, generator=generator).to(device)
              for columns in (layer.scalar_columns[1] - layer.scalar_columns[0], layer.output_dim))]


NEIGHBOURS = [0, 3, 1, 5, 0, 2, 6]  # odd sizes, isolated centers and centers with one neighbour
# The third and fourth derivatives' checks: an isolated center and one with three neighbours. Under the interpreter each
# center with neighbours is a program of 30-60 ms per launch (an isolated one ~2 ms), and these checks launch
# thousands; the derivatives below them are checked on more centers ([2, 0, 1] and NEIGHBOURS).
HIGH_ORDER_NEIGHBOURS = [0, 3]


def check_every_slot(device, l_max, parity, channels, seed):
    """Every slot of both forms against its plain-torch reference, float64, to 1e-13."""
    from allegro_fast.kernels import tensor_product as kernels

    center_ptr, center = random_csr(NEIGHBOURS, device)
    generator = torch.Generator().manual_seed(seed)
    for form in forms(l_max, parity, channels):
        key = kernels.register_form(form)
        x = operands(form, center_ptr, channels, torch.float64, device, generator)
        for slot in range(3):
            first, second = (x[s] for s in range(3) if s != slot)
            got = kernels.trilinear_slot(key, slot, first, second, center_ptr)
            expected = kernels.trilinear_ref(form, slot, first, second, center, center_ptr.numel() - 1)
            assert got.shape == expected.shape
            assert relative_error(got, expected) < 1e-13, (form.operands[slot].name, slot)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l_max,parity", [(1, True), (2, True), (2, False), (3, True)])
def test_every_slot_matches_reference(device, l_max, parity):
    check_every_slot(device, l_max, parity, channels=3, seed=l_max)


@pytest.mark.parametrize("device", DEVICES)
def test_slots_with_several_channel_blocks_match_reference(device, monkeypatch):
    """The GPU launch of the slot kernels: at most SLOT_BLOCK_C channels per program, so 37 channels take three
    blocks, the last one partly masked (the interpreter otherwise runs all channels in one program)."""
    from allegro_fast.kernels import tensor_product as kernels

    monkeypatch.setattr(kernels, "_block_sizes", lambda channels, device: (16, kernels.SLOT_BLOCK_C))
    check_every_slot(device, 1, True, channels=37, seed=37)


LAYER_CASES = [  # (l_max, parity, channels, layer of 3, dtype): first, middle and last layers; channel counts
    (2, True, 5, 1, torch.float64),       # below, at and above the 16-wide tiles of the mixing
    (2, True, 5, 1, torch.float32),
    (1, False, 16, 0, torch.float32),
    (3, True, 3, 2, torch.float64),
    (2, False, 17, 1, torch.float32),
    (2, True, 1, 0, torch.float64),       # one channel
    (3, True, 2, 0, torch.float32),       # the first layer reads w0 and Y: l_max 3, a pass over 16 Y columns
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l_max,parity,channels,layer,dtype", LAYER_CASES)
def test_fused_layer_matches_reference(device, l_max, parity, channels, layer, dtype):
    """Scalars and mixed features of the fused layer (environment, product and mixing in one kernel) against
    plain torch, computed in float64 from the same (rounded) inputs."""
    check_fused_layer(device, l_max, parity, channels, layer, dtype)


def check_fused_layer(device, l_max, parity, channels, layer, dtype):
    from allegro_fast.kernels import tensor_product as kernels

    center_ptr, center = random_csr(NEIGHBOURS, device)
    form = layer_form(l_max, parity, channels, layer)
    key = kernels.register_layer(form)
    inputs = [t.to(dtype) for t in layer_inputs(form, center_ptr, channels, torch.float64, device,
                                                  torch.Generator().manual_seed(channels))]
    expected = kernels.fused_layer_ref(form, *(t.double() for t in inputs), center, len(NEIGHBOURS))
    got = kernels.fused_layer(key, *inputs, center_ptr)
    for name, g, e in zip(("scalars", "mixed"), got, expected):
        assert g.shape == e.shape and g.dtype == dtype, name
        assert relative_error(g, e) < TOLERANCE[dtype] / 10, name
    assert expected[0].abs().amax() > 0 and (layer == 2 or expected[1].abs().amax() > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l_max,parity,channels,layer,dtype", LAYER_CASES)
def test_fused_layer_backward_matches_reference(device, l_max, parity, channels, layer, dtype):
    """The one-kernel backward (cotangents of w, Y and V) against autograd through the plain-torch layer,
    and against the same backward composed of the slot kernels (the function its double backward uses)."""
    check_fused_layer_backward(device, l_max, parity, channels, layer, dtype)


def check_fused_layer_backward(device, l_max, parity, channels, layer, dtype):
    from allegro_fast.kernels import tensor_product as kernels

    center_ptr, center = random_csr(NEIGHBOURS, device)
    form = layer_form(l_max, parity, channels, layer)
    key = kernels.register_layer(form)
    generator = torch.Generator().manual_seed(channels + 1)
    inputs = layer_inputs(form, center_ptr, channels, torch.float64, device, generator)
    num_edges = int(center_ptr[-1])
    cotangents = [torch.randn(num_edges, columns, channels, dtype=torch.float64, generator=generator).to(device)
                  for columns in (form.scalar_columns[1] - form.scalar_columns[0], form.output_dim)]
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    outputs = kernels.fused_layer_ref(form, *leaves, center, len(NEIGHBOURS))
    used = [(out, cotangent) for out, cotangent in zip(outputs, cotangents) if out.requires_grad]
    expected = torch.autograd.grad([o for o, _ in used], leaves[:3], [c for _, c in used])
    rounded = [t.to(dtype) for t in (*inputs, *cotangents)]
    got = kernels.fused_layer_backward(key, *rounded, center_ptr)
    composed = kernels.composed_layer_backward(form, *rounded, center_ptr)
    for name, g, c, e in zip(("env_weights", "harmonics", "features"), got, composed, expected):
        assert g.shape == e.shape and g.dtype == dtype, name
        assert relative_error(g, e) < TOLERANCE[dtype] / 10, name
        assert relative_error(c, e) < TOLERANCE[dtype] / 10, name


TILED_CASES = [  # (l_max, parity, channels, layer of 3, dtype, accumulator budget): the channel-tiled kernels
    (2, True, 33, 1, torch.float32, 1024),   # three blocks of 16 channels, two output chunks of 32, one pass
    (2, True, 33, 0, torch.float64, 64),     # at most two output columns per pass: a pass per output irrep
    # one block, fewer channels than it holds; l_max 3's middle-layer backward is the rMD17 preset's source (it
    # does not depend on n): minutes of ptxas on a GPU machine (float64: ~5 minutes on 2 cores)
    pytest.param(3, True, 5, 1, torch.float64, 1024, marks=pytest.mark.compile_heavy),
    (1, False, 40, 2, torch.float32, 1024),  # last layer: scalars only
]


@pytest.fixture
def tiled_layers(monkeypatch):
    """Route every fused layer through the channel-tiled kernels (used above 32 channels) at test sizes."""
    from allegro_fast.kernels import tensor_product as kernels

    monkeypatch.setattr(kernels, "TILE_CHANNELS_ABOVE", 0)

    def budget(elements):
        monkeypatch.setattr(kernels, "ACCUMULATOR_ELEMENTS", elements)

    return budget


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l_max,parity,channels,layer,dtype,budget", TILED_CASES)
def test_tiled_fused_layer_matches_reference(tiled_layers, device, l_max, parity, channels, layer, dtype, budget):
    """The channel-tiled forward and backward (a loop over channel blocks per center, the environment recomputed
    per block, the mixing accumulated in passes) against plain torch, like the one-block kernels."""
    from allegro_fast.kernels import tensor_product as kernels

    tiled_layers(budget)
    launch = kernels.layer_launch(channels, dtype, "cuda")
    assert launch.tiled and (launch.block_c < channels or channels < 16)
    check_fused_layer(device, l_max, parity, channels, layer, dtype)
    check_fused_layer_backward(device, l_max, parity, channels, layer, dtype)


def test_layer_launch_gives_small_float32_layers_few_warps():
    """The launches timed fastest on an H200 (tune_layer, FEW_WARPS_PRODUCT_COLUMNS): for float32 layers with n <= 16
    and a product of at most 35 columns (the default model's layers) 2 warps for the forward of a layer that mixes
    and the backward of one that does not, 4 for the other two; 8 for larger products, float64, and callers that
    do not say how many columns."""
    from allegro_fast.kernels import tensor_product as kernels

    launch = kernels.layer_launch
    assert launch(16, torch.float32, "cuda", 35).num_warps == 2  # mixes (the default), forward
    assert launch(16, torch.float32, "cuda", 35, backward=True).num_warps == 4
    assert launch(5, torch.float32, "cuda", 3, mixes=False).num_warps == 4  # BLOCK_N is 16 for any n <= 16
    assert launch(5, torch.float32, "cuda", 3, backward=True, mixes=False).num_warps == 2
    for backward in (False, True):
        assert launch(16, torch.float32, "cuda", 51, backward=backward).num_warps == 8  # an l_max 2 middle layer
        assert launch(16, torch.float64, "cuda", 35, backward=backward).num_warps == 8
        assert launch(16, torch.float32, "cuda", backward=backward).num_warps == 8
        assert launch(32, torch.float32, "cuda", 3, backward=backward, mixes=False).num_warps == 16
    # (l_max, layers) -> (forward, backward) warps per layer
    for config, warps in (((2, 2), [(2, 4), (4, 2)]), ((2, 3), [(8, 8), (8, 8), (4, 2)]), ((3, 2), [(8, 8), (4, 2)])):
        model = af.Allegro(af.AllegroConfig(type_names=("H",), l_max=config[0], num_layers=config[1],
                                            num_tensor_features=16), backend="torch")
        layers = [kernels._LAYERS[key] for key in model._triton_forms()]
        got = [tuple(kernels.fused_layer_launch(layer, 16, torch.float32, "cuda", backward).num_warps
                     for backward in (False, True)) for layer in layers]
        assert got == warps, (config, got)


def test_layer_launch_tiles_wide_layers():
    """Up to 32 channels one program holds them all; above, the kernels loop over blocks of 16 channels, mix
    into chunks of 32 output channels and at most ACCUMULATOR_ELEMENTS / BLOCK_O output columns per pass (the
    backward's transposed mixing: chunks of 16)."""
    from allegro_fast.kernels import tensor_product as kernels

    assert not kernels.layer_launch(32, torch.float32, "cuda").tiled
    assert kernels.layer_launch(5, torch.float32, "cuda").block_c == 16
    wide = kernels.layer_launch(128, torch.float32, "cuda")
    assert (wide.block_c, wide.block_o, wide.block_n, wide.columns_per_pass) == (16, 32, 128, 16)
    assert wide.constants(torch.float32)["DOT"] == 0
    assert wide.constants(torch.float32, backward=True)["BLOCK_O"] == 16
    assert kernels.layer_launch(40, torch.float64, "cuda").columns_per_pass == 16  # the same for every n > 32
    first = layer_form(3, True, 128, 0)  # the rMD17 preset's first layer: 31 output columns, 1-7 per irrep
    passes = kernels._mixing_passes(first, wide.columns_per_pass)
    assert len(passes) == 3 and all(sum(group.dim for group in groups) <= 16 for groups in passes)
    assert [group for groups in passes for group in groups] == list(first.mixing)
    assert len(kernels._mixing_passes(layer_form(3, True, 128, 1), wide.columns_per_pass)) == 1  # 16 columns



def test_generated_tiled_kernels_stay_small_for_wide_layers():
    """What made the rMD17 preset's backward (l_max 3, 128 channels) compile for sm_90 (ptxas: from 660k lines
    of PTX that did not finish in 20 minutes to about 2 minutes, and from 2.7 KB to 0.6-0.7 KB of spill): the
    transposed mixing loops over output chunks at runtime (one loop per path), so the source does not depend on
    the channel count; the forward loops over output chunks at runtime as well (one loop per pass), mixing each
    product column once per chunk;
    and no term multiplies a coefficient by A first (a product the same for every edge block, which the compiler
    hoists out of the edge loop and keeps live)."""
    import re

    from allegro_fast.kernels import tensor_product as kernels

    layer = layer_form(3, True, 128, 1)
    _, source = kernels._generate_layer_backward_tiled(layer)
    assert "outs_0" not in source and source.count("for out_start in range(0, num_channels, BLOCK_O):") == sum(
        group.num_paths for group in layer.mixing)
    assert source.count("mix_transposed(") == sum(group.num_paths * group.dim for group in layer.mixing)
    columns_per_pass = kernels.layer_launch(128, torch.float32, "cuda").columns_per_pass
    assert kernels.layer_launch(33, torch.float32, "cuda").columns_per_pass == columns_per_pass
    _, forward = kernels._generate_layer_tiled(layer, columns_per_pass)
    passes = kernels._mixing_passes(layer, columns_per_pass)
    assert forward.count("for out_start in range(0, num_channels, BLOCK_O):") == len(passes)
    assert forward.count(" = mix(") == sum(group.num_paths * group.dim for group in layer.mixing)
    assert forward.count("if out_start == 0:") == 1
    for name, generated in (("tiled", source), ("one-block", kernels._generate_layer_backward(layer)[1])):
        hoistable = re.findall(r"\bg\d+ \* env_row_\d+", generated)
        assert not hoistable, (name, hoistable[:3])
        assert re.search(r"\bg\d+ \* gt_\d+ \* env_row_\d+", generated), name

@pytest.mark.parametrize("device", DEVICES)
def test_trilinear_gradcheck_and_gradgradcheck(device):
    from allegro_fast.kernels import tensor_product as kernels

    channels = 2
    center_ptr, _ = random_csr([2, 0, 1, 3], device)
    environment, product = forms(1, True, channels, layer=1)
    generator = torch.Generator().manual_seed(2)
    for form in (environment, product):
        key = kernels.register_form(form)
        x = [t.requires_grad_(True) for t in operands(form, center_ptr, channels, torch.float64, device, generator)]
        for slot in range(3):
            first, second = (x[s] for s in range(3) if s != slot)

            def op(a, b, slot=slot, key=key):
                return kernels.trilinear_slot(key, slot, a, b, center_ptr)

            assert torch.autograd.gradcheck(op, (first, second), fast_mode=True)
            if form is product and slot == 2:  # the fused layer's gradgradcheck below runs every slot's double backward
                assert torch.autograd.gradgradcheck(op, (first, second), fast_mode=True)

    for index in (1, 0):  # a middle layer, and the first (which reads w0 and Y, not V^0)
        layer = layer_form(1, True, channels, layer=index)
        key = kernels.register_layer(layer)
        inputs = tuple(t.requires_grad_(True) for t in layer_inputs(layer, center_ptr, channels, torch.float64,
                                                                    device, generator))

        def fused(w, y, v, mixing, key=key):
            return kernels.fused_layer(key, w, y, v, mixing, center_ptr)

        assert torch.autograd.gradcheck(fused, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(fused, inputs, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_layer_backward_gradcheck_and_gradgradcheck(device):
    """The one-kernel backward is itself differentiable twice (force training differentiates it once; its
    derivative is taken through aliases of its inputs, so orders beyond that stay correct too)."""
    from allegro_fast.kernels import tensor_product as kernels

    channels = 2
    form = layer_form(1, True, channels, layer=0)
    key = kernels.register_layer(form)
    generator = torch.Generator().manual_seed(7)
    for neighbours, check in (([2, 0, 1], torch.autograd.gradcheck),
                              (HIGH_ORDER_NEIGHBOURS, torch.autograd.gradgradcheck)):
        center_ptr, _ = random_csr(neighbours, device)
        inputs = tuple(t.requires_grad_(True) for t in backward_inputs(form, center_ptr, channels, device, generator))

        def backward(*tensors, center_ptr=center_ptr):
            return kernels.fused_layer_backward(key, *tensors, center_ptr)

        assert check(backward, inputs, fast_mode=True), check.__name__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_index,partial", [(0, True), (0, False), (2, True), (2, False)])
def test_fused_layer_double_backward_gradcheck_and_gradgradcheck(device, layer_index, partial):
    """The double backward is one op (`fused_layer_double_backward`) whose derivative is autograd through its
    recomputed pieces: gradcheck, and with every input needed gradgradcheck (a layer's third and fourth
    derivatives), float64, in the first layer (its plain twin, V^0 formed) and the last. `partial`: V's cotangent
    left out (None) and the gradients of Y and gS not needed (an empty tensor for them). On HIGH_ORDER_NEIGHBOURS;
    the last layer's gradgradcheck takes ~2 minutes under the interpreter, the first layer's more (five minutes on
    three centers): CUDA only (its third derivative also runs in
    test_fused_layer_backward_gradcheck_and_gradgradcheck)."""
    from allegro_fast.kernels import tensor_product as kernels

    if device == "cpu" and layer_index == 0 and not partial:
        pytest.skip("minutes under the Triton interpreter: runs on CUDA")
    channels = 2
    center_ptr, _ = random_csr(HIGH_ORDER_NEIGHBOURS, device)
    form = layer_form(1, True, channels, layer=layer_index)
    key = kernels.register_layer(form)
    generator = torch.Generator().manual_seed(17 + layer_index)
    tensors = backward_inputs(form, center_ptr, channels, device, generator)
    cotangents = [torch.randn(x.shape, dtype=torch.float64, generator=generator).to(device) for x in tensors[:3]]
    needed = [True, False, True, True, False, True] if partial else [True] * 6
    present = [True, True, False] if partial else [True] * 3
    inputs = [t.clone().requires_grad_(True) for t in (*tensors, *(c for c, p in zip(cotangents, present) if p))]

    def double_backward(*args):
        given = iter(args[6:])
        cotangents = [next(given) if p else None for p in present]
        outputs = kernels.fused_layer_double_backward(key, *args[:6], *cotangents, center_ptr, needed)
        for out, x, need in zip(outputs, args, needed):
            assert out.shape == (x.shape if need else (0,))
        return tuple(out for out, need in zip(outputs, needed) if need)

    assert torch.autograd.gradcheck(double_backward, inputs, fast_mode=True)
    if not partial:  # undefined output gradients: checked at the third order above (gradcheck)
        assert torch.autograd.gradgradcheck(double_backward, inputs, fast_mode=True, check_undefined_grad=False)


class LargestOutput(TorchDispatchMode):
    """The largest tensor (in elements) that any op returns while the mode is on (a custom op counts as one op),
    views of an input's memory left out (in-place ops; the Triton interpreter's set_ and copy_ of a kernel's
    arguments)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {x.untyped_storage().data_ptr() for x in leaves if isinstance(x, torch.Tensor)}
        inputs |= {x.data_ptr() for x in leaves if isinstance(x, torch.UntypedStorage)}
        for tensor in (t for t in torch.utils._pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs):
            if tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), f"{func} -> {tuple(tensor.shape)}"
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_index", [0, 1])  # the first layer and a middle layer
def test_double_backward_never_forms_the_product(device, layer_index, monkeypatch):
    """Force training's double backward of the fused layer (loss.backward through the force pass) runs on the
    layer's kernels and on the product's slot kernel over ranges of edges: no op returns a tensor of the product's
    size (E, P, n) (it once held three, the peak of a training step). Its value: against autograd through the
    plain-torch layer, float64; in the first layer also against the other way to it (through the plain twin,
    what the third derivative differentiates). The eight ranges (bounds at multiples of 16 edges: 0, 0, 16, 16,
    32, 32, 48, 48, 71) include empty ones and cut through the edges of two centers; centers with zero and one
    neighbour."""
    from allegro_fast.kernels import tensor_product as kernels

    monkeypatch.setattr(kernels, "WEIGHT_GRADIENT_MIN_EDGES", 0)
    assert kernels.WEIGHT_GRADIENT_CHUNKS == 8
    channels = 3
    neighbours = [0, 13, 1, 25, 0, 2, 30]  # CSR pointers 0 0 13 14 39 39 41 71
    center_ptr, center = random_csr(neighbours, device)
    layer = layer_form(2, True, channels, layer=layer_index)
    key = kernels.register_layer(layer)
    generator = torch.Generator().manual_seed(11 + layer_index)
    num_edges = int(center_ptr[-1])
    inputs = backward_inputs(layer, center_ptr, channels, device, generator)
    cotangents = [torch.randn(x.shape, dtype=torch.float64, generator=generator).to(device) for x in inputs[:3]]

    def double_backward(backward):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        outputs = backward(*leaves)
        return torch.autograd.grad(outputs, leaves, cotangents)

    def reference(w, y, v, mixing, grad_scalars, grad_mixed):
        outputs = kernels.fused_layer_ref(layer, w, y, v, mixing, center, len(neighbours))
        return torch.autograd.grad(outputs, (w, y, v), (grad_scalars, grad_mixed), create_graph=True)

    largest = LargestOutput()  # the pieces, as fused_layer_double_backward (one op to the mode) runs them
    with largest:
        pieces = kernels.layer_backward_vjp(key, inputs, cotangents, [True] * 6, center_ptr, differentiable=False)
    product_size = num_edges * layer.product.operands[2].columns * channels
    assert largest.numel < product_size / 2, largest.op
    twin = kernels.layer_backward_vjp(key, inputs, cotangents, [True] * 6, center_ptr)
    got = double_backward(lambda *tensors: kernels.fused_layer_backward(key, *tensors, center_ptr))
    for name, g, p, t, e in zip(("w", "Y", "V", "W", "gS", "gV"), got, pieces, twin, double_backward(reference)):
        assert relative_error(g, e) < 1e-12, name
        assert relative_error(t, e) < 1e-12, name
        assert torch.equal(g, p), name


class LiveFeatureTensors(TorchDispatchMode):
    """The most buffers alive at once that ops return as tensors of the given shapes while the mode is on (a
    buffer counts once, with all its views; the inputs' buffers do not count)."""

    def __init__(self, shapes, inputs):
        super().__init__()
        self.shapes, self.alive, self.most = set(shapes), {}, 0
        self.inputs = {x.untyped_storage().data_ptr() for x in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
            buffer = tensor.untyped_storage().data_ptr()
            if tuple(tensor.shape) in self.shapes and buffer not in self.inputs:
                self.alive.setdefault(buffer, []).append(weakref.ref(tensor))
        self.alive = {key: refs for key, refs in self.alive.items() if any(ref() is not None for ref in refs)}
        self.most = max(self.most, len(self.alive))
        return out


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_holds_one_direction_at_a_time(device, monkeypatch):
    """The first layer's double backward (what the loss backward runs first, with the whole saved set live) holds
    at most two (E, D, n) tensors at a time: the sum of the forward outputs (added to in place) and one direction's
    output; no V^0, dV or V^0 cotangent (the first layer's kernels, Y for V^0 passed apart; V^0 formed per range of
    edges for the mixing weights). It held five: V^0 and dV together, and the sum besides the outputs of two
    directions (under inductor, of all three: the training step's peak); then three, through the plain twin, which
    the third derivative still takes."""
    from allegro_fast.kernels import tensor_product as kernels

    monkeypatch.setattr(kernels, "WEIGHT_GRADIENT_MIN_EDGES", 0)  # ranges of edges, as above 1024 edges
    channels = 2
    center_ptr, _ = random_csr([20, 0, 2, 1], device)  # 23 edges: ranges 0:16 and 16:23
    layer = layer_form(1, True, channels, layer=0)
    key = kernels.register_layer(layer)
    generator = torch.Generator().manual_seed(23)
    inputs = backward_inputs(layer, center_ptr, channels, device, generator)
    cotangents = [torch.randn(x.shape, dtype=torch.float64, generator=generator).to(device) for x in inputs[:3]]
    num_edges = int(center_ptr[-1])
    shapes = {(num_edges, columns, channels) for columns in (layer.product.operands[0].columns, layer.output_dim)}
    for differentiable, most in ((False, 2), (True, 3)):
        live = LiveFeatureTensors(shapes, [*inputs, *cotangents])
        with torch.no_grad(), live:  # as fused_layer_double_backward runs it, and the twin's way
            kernels.layer_backward_vjp(key, inputs, cotangents, [True] * 6, center_ptr, differentiable=differentiable)
        assert live.most == most, differentiable


@pytest.mark.parametrize("device", DEVICES)
def test_first_layer_double_backward_agrees_with_its_twin_for_every_set_of_cotangents(device):
    """The first layer's double backward runs one of two launches for the directions that vary V^0: the form of two
    feature pairs when both u_w0 and u_Y are given, the first layer's own kernels when one is. Every set of
    cotangents, against the twin's way (what its derivative differentiates), float64, to 1e-12."""
    from allegro_fast.kernels import tensor_product as kernels

    channels = 2
    center_ptr, _ = random_csr([3, 0, 1, 2], device)
    layer = layer_form(1, True, channels, layer=0)
    key = kernels.register_layer(layer)
    generator = torch.Generator().manual_seed(29)
    inputs = backward_inputs(layer, center_ptr, channels, device, generator)
    cotangents = [torch.randn(x.shape, dtype=torch.float64, generator=generator).to(device) for x in inputs[:3]]
    for present in ((True, False, True), (False, False, True), (False, True, True), (False, True, False)):
        given = [u if p else None for u, p in zip(cotangents, present)]
        own = kernels.fused_layer_double_backward(key, *inputs, *given, center_ptr, [True] * 6)
        twin = kernels.layer_backward_vjp(key, inputs, given, [True] * 6, center_ptr)
        for name, a, b in zip(("w", "Y", "w0", "W", "gS", "gV"), own, twin):
            assert relative_error(a, b) < 1e-12, (present, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l_max", [1, 3])
def test_edge_geometry_matches_reference_and_gradchecks(device, l_max):
    from allegro_fast.kernels.edge_geometry import edge_geometry, edge_geometry_ref

    generator = torch.Generator().manual_seed(l_max)
    vectors = (2.0 * torch.randn(23, 3, dtype=torch.float64, generator=generator)).to(device)
    frequencies = (torch.pi * torch.arange(1, 8, dtype=torch.float64) + 0.1).to(device)
    for got, expected in zip(edge_geometry(vectors, frequencies, 4.5, 6, l_max),
                             edge_geometry_ref(vectors, frequencies, 4.5, 6, l_max)):
        assert relative_error(got, expected) < 1e-13
    small = (vectors[:5].clone().requires_grad_(True), frequencies[:3].clone().requires_grad_(True))

    def op(v, f):
        return edge_geometry(v, f, 4.5, 5, l_max)

    assert torch.autograd.gradcheck(op, small, fast_mode=True)
    assert torch.autograd.gradgradcheck(op, small, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l_max", [0, 1, 2, 3])
def test_edge_geometry_double_backward_matches_torch_autograd(device, l_max):
    """The double-backward kernel's second derivatives against torch autograd twice through the reference formulas,
    for every envelope power p, with and without the frequencies' cotangent and gradient, edges beyond the cutoff
    and an odd count; float64 to 1e-12, float32 to 1e-5."""
    from allegro_fast.kernels.edge_geometry import double_backward_ref, edge_geometry_double_backward

    generator = torch.Generator().manual_seed(10 + l_max)

    def random(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    num_edges, num_basis = 37, 7
    for p in (1, 2, 3, 6):
        vectors = 2.0 * random(num_edges, 3)
        vectors[:3] = torch.tensor([[5.2, 0.1, 0.0], [0.0, -4.6, 0.3], [0.3, 0.2, 0.1]])  # two beyond r_max 4.5
        frequencies = torch.pi * torch.arange(1, num_basis + 1, dtype=torch.float64) + 0.1
        cotangents = [random(num_edges, num_basis), random(num_edges), random(num_edges, (l_max + 1) ** 2)]
        tensors = [vectors, frequencies, *cotangents, random(num_edges, 3)]
        for frequency_cotangent, frequency_grad in ((None, False), (random(num_basis), True), (None, True)):
            expected = double_backward_ref(*tensors, frequency_cotangent, 4.5, p, l_max)
            if not frequency_grad:
                expected[1] = torch.zeros_like(frequencies)
            for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                inputs = [t.to(device, dtype) for t in tensors]
                cotangent = None if frequency_cotangent is None else frequency_cotangent.to(device, dtype)
                got = edge_geometry_double_backward(*inputs, cotangent, 4.5, p, l_max, frequency_grad)
                for name, a, b in zip(("vectors", "frequencies", "bessel", "envelope", "harmonics"), got, expected):
                    assert a.dtype == dtype and a.shape == b.shape, name
                    error = relative_error(a.double().cpu(), b) if b.abs().max() > 0 else a.abs().max().item()
                    assert error < tolerance, (p, frequency_grad, dtype, name, error)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_geometry_backward_and_double_backward_gradcheck(device):
    """gradcheck and gradgradcheck of the backward (its derivative is the double-backward kernel) and of the double
    backward (third derivatives by torch autograd), with and without the frequencies' gradient."""
    from allegro_fast.kernels.edge_geometry import edge_geometry_backward, edge_geometry_double_backward

    generator = torch.Generator().manual_seed(3)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device).requires_grad_(True)

    l_max, p = 2, 5
    vectors, grad_bessel, grad_envelope, grad_harmonics = leaf(5, 3), leaf(5, 3), leaf(5), leaf(5, (l_max + 1) ** 2)
    frequencies = (torch.pi * torch.arange(1, 4, dtype=torch.float64) + 0.1).to(device).requires_grad_(True)
    cotangent_vectors, cotangent_frequencies = leaf(5, 3), leaf(3)
    for frequency_grad in (False, True):
        def backward(*inputs):
            return edge_geometry_backward(*inputs, 4.5, p, l_max, frequency_grad)

        inputs = (vectors, frequencies, grad_bessel, grad_envelope, grad_harmonics)
        assert torch.autograd.gradcheck(backward, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(backward, inputs, fast_mode=True)

        def double_backward(*inputs):
            cotangent = inputs[6] if frequency_grad else None
            return edge_geometry_double_backward(*inputs[:6], cotangent, 4.5, p, l_max, frequency_grad)

        inputs = (*inputs, cotangent_vectors) + ((cotangent_frequencies,) if frequency_grad else ())
        assert torch.autograd.gradcheck(double_backward, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(double_backward, inputs, fast_mode=True)


class OpCalls(TorchDispatchMode):
    """Counts the calls of each op (overload packet) under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_force_training_runs_the_geometry_double_backward_kernel(device, monkeypatch):
    """The loss backward of a force-training step differentiates the geometry's backward on the double-backward
    kernel (with the trainable Bessel frequencies' gradient), not by torch autograd through the reference formulas,
    which it replaced; and the parameter gradients are the torch backend's."""
    from allegro_fast.kernels import edge_geometry as geometry

    torch.manual_seed(0)
    model = af.Allegro(small_config(bessel_trainable=True), backend="triton").double().to(device).train()
    randomize_edge_scale(model)
    graph = af.AtomicGraph.from_ase(periodic_cho(), r_max=3.3).to(device)
    twin = af.Allegro(small_config(bessel_trainable=True), backend="torch").double().to(device).train()
    twin.load_state_dict(model.state_dict())

    def loss_of(potential):
        out = potential(graph)
        return out["energy"].sum() + out["forces"].square().sum() + out["stress"].square().sum()

    expected = torch.autograd.grad(loss_of(twin), list(twin.parameters()))

    def reference_called(*args, **kwargs):
        raise AssertionError("the geometry's double backward ran the reference formulas")

    monkeypatch.setattr(geometry, "edge_geometry_ref", reference_called)
    monkeypatch.setattr(geometry, "double_backward_ref", reference_called)
    loss = loss_of(model)
    with OpCalls() as counter:
        loss.backward()
    assert counter.calls.get("allegro_fast.edge_geometry_double_backward") == 1, counter.calls
    for (name, parameter), reference in zip(model.named_parameters(), expected):
        assert relative_error(parameter.grad, reference) < 1e-10, name
    assert model.bessel_frequencies.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [3, 40])  # the one-block and the channel-tiled kernels
def test_kernels_are_bitwise_deterministic(device, channels):
    from allegro_fast.kernels import tensor_product as kernels

    center_ptr, _ = random_csr(NEIGHBOURS, device)
    layer = layer_form(2, True, channels, layer=1)
    key = kernels.register_layer(layer)
    generator = torch.Generator().manual_seed(3)
    inputs = layer_inputs(layer, center_ptr, channels, torch.float32, device, generator)
    cotangents = [torch.randn(*shape, generator=generator).to(device) for shape in (
        (int(center_ptr[-1]), layer.scalar_columns[1] - layer.scalar_columns[0], channels),
        (int(center_ptr[-1]), layer.output_dim, channels))]

    def run():
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        outputs = kernels.fused_layer(key, *leaves, center_ptr)
        return [*outputs, *torch.autograd.grad(outputs, leaves, cotangents)]

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


MODEL_CASES = {  # (config overrides, structures, dtypes): together they cover first, middle and last layers
    "l2-parity-2layers": ({}, "periodic", (torch.float64, torch.float32)),
    "l1-no-parity-3layers": ({"l_max": 1, "parity": False, "num_layers": 3, "per_edge_species_scale": True}, "periodic",
                             (torch.float64,)),
    "l3-1layer-trainable-bessel": ({"l_max": 3, "num_layers": 1, "bessel_trainable": True,
                                    "num_tensor_features": 3},
                                   "molecule", (torch.float64,)),
    "l2-33-channels-tiled": ({"num_tensor_features": 33}, "periodic", (torch.float64,)),  # > 32: channel-tiled
}


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_triton_model_matches_reference(device, case):
    """Energies, forces, stress and parameter gradients of an energy + force loss (double backward through
    the kernels) against the reference with the same weights: float64 to 1e-10, float32 to 1e-5."""
    overrides, kind, dtypes = MODEL_CASES[case]
    config = small_config(r_max=2.6, **overrides)
    structures = [periodic_cho(5) if kind == "periodic" else ethanol(4), lonely_and_pair()]
    reference = af.reference.ReferenceAllegro(config).double()
    randomize_edge_scale(reference)
    for dtype in dtypes:
        graph = af.AtomicGraph.from_ase(structures, r_max=config.r_max, dtype=dtype).to(device=device)
        model = af.Allegro(config, backend="triton").to(device=device, dtype=dtype)
        model.load_state_dict(reference.state_dict())
        reference_out = reference.to(device)(graph.to(dtype=torch.float64))
        evaluated = model.eval()(graph)  # force evaluation: no graph kept, the mixing weights get no gradient
        model.train()
        out = model(graph)
        assert set(out) == set(reference_out)
        for key in reference_out:
            assert relative_error(out[key], reference_out[key]) < TOLERANCE[dtype], (key, dtype)
            assert relative_error(evaluated[key], reference_out[key]) < TOLERANCE[dtype], (key, dtype)

        def loss(outputs):
            return (outputs["energy"] ** 2).sum() + (outputs["forces"] ** 2).sum()

        grads = torch.autograd.grad(loss(out), list(model.parameters()))
        reference.train()
        expected = torch.autograd.grad(loss(reference(graph.to(dtype=torch.float64))), list(reference.parameters()))
        reference.eval()
        for (name, _), got, want in zip(model.named_parameters(), grads, expected):
            assert relative_error(got, want) < TOLERANCE[dtype], (name, dtype)


def test_gradient_wanted_asks_the_engine():
    """`gradient_wanted` is False only where the running backward pass will not use the gradient."""
    from allegro_fast.kernels._common import gradient_wanted

    answers = []

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            answers.append((gradient_wanted(a), gradient_wanted(b)))
            return grad * b, grad * a

    a, w = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    # 2 w is not a leaf: its grad_fn runs only where w's gradient is wanted
    torch.autograd.grad(Product.apply(a, 2 * w).sum(), [a])
    torch.autograd.grad(Product.apply(a, 2 * w).sum(), [w])
    Product.apply(a, 2 * w).sum().backward()
    assert answers == [(True, False), (True, True), (True, True)]  # a: a leaf, unknown, so True


@pytest.mark.parametrize("device", DEVICES)
def test_the_force_pass_of_training_skips_the_mixing_weight_gradient(device, monkeypatch):
    """Training computes forces with autograd.grad(energy, positions, create_graph=True): the fused layer's
    backward then needs no mixing-weight gradient (recomputing the product T and its matmuls), and skips it;
    the loss's backward computes it, with the same parameter gradients as when it is not skipped."""
    from allegro_fast.kernels import tensor_product as kernels

    calls = []
    original = kernels._mixing_weight_gradient
    monkeypatch.setattr(kernels, "_mixing_weight_gradient", lambda *args: calls.append(1) or original(*args))
    config = small_config(num_layers=2, num_tensor_features=3)
    model = af.Allegro(config, backend="triton").to(device=device, dtype=torch.float64).train()
    graph = af.AtomicGraph.from_ase([periodic_cho(2)], r_max=config.r_max, dtype=torch.float64).to(device=device)

    def parameter_gradients():
        out = model(graph)
        forward_calls = len(calls)
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        return forward_calls, torch.autograd.grad(loss, list(model.parameters()))

    forward_calls, skipped = parameter_gradients()
    # the first layer mixes: its weights' gradient, and its double backward's (one call: its two terms, the
    # directions that vary V^0 and those that vary the environment, go range by range together)
    assert forward_calls == 0 and len(calls) == 2
    monkeypatch.setattr(kernels, "gradient_wanted", lambda tensor: True)
    calls.clear()
    forward_calls, computed = parameter_gradients()
    assert forward_calls == 1 and len(calls) == 3
    for a, b in zip(skipped, computed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_compile_fullgraph_and_export(device):
    """The custom ops trace: torch.compile(fullgraph=True) (graph capture with AOT autograd, forward and
    backward) and torch.export give the eager numbers."""
    from allegro_fast.kernels import tensor_product as kernels
    from allegro_fast.kernels.edge_geometry import edge_geometry

    channels = 3
    center_ptr, _ = random_csr([2, 0, 1, 3], device)
    layer_key = kernels.register_layer(layer_form(1, True, channels, layer=1))
    generator = torch.Generator().manual_seed(5)
    weights, _, features, mixing = layer_inputs(kernels._LAYERS[layer_key], center_ptr, channels, torch.float64,
                                                device, generator)
    vectors = torch.randn(int(center_ptr[-1]), 3, dtype=torch.float64, generator=generator).to(device)
    frequencies = torch.pi * torch.arange(1, 5, dtype=torch.float64).to(device)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("frequencies", frequencies)
            self.register_buffer("center_ptr", center_ptr)
            self.mixing = torch.nn.Parameter(mixing)

        def forward(self, w, v, r):
            _, _, harmonics = edge_geometry(r, self.frequencies, 3.0, 6, 1)
            scalars, mixed = kernels.fused_layer(layer_key, w, harmonics, v, self.mixing, self.center_ptr)
            return scalars.square().sum() + mixed.square().sum()

    layer = Layer()

    def energy_and_grad(w, v, r):  # r requires grad: Dynamo in torch 2.11 cannot trace requires_grad_
        energy = layer(w, v, r)
        return energy.detach(), torch.autograd.grad(energy, r)[0].detach()

    leaf = vectors.detach().requires_grad_(True)
    eager = energy_and_grad(weights, features, leaf)
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # Dynamo traces autograd.grad only when asked
        compiled = torch.compile(energy_and_grad, fullgraph=True, backend="aot_eager")(weights, features, leaf)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)
    exported = torch.export.export(layer, (weights, features, vectors))
    assert torch.equal(exported.module()(weights, features, vectors), eager[0])


def _gpu_toolchain_missing() -> str | None:
    import os

    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed"
    tools = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, tool)) for tool in ("ptxas", "cuobjdump")):
        return f"triton's NVIDIA toolchain (ptxas, cuobjdump) is not in {tools}"
    return None


@pytest.mark.skipif(_gpu_toolchain_missing() is not None, reason=str(_gpu_toolchain_missing()))
def test_generated_kernels_compile_for_an_h100_without_a_gpu(tmp_path):
    """The interpreter accepts what a GPU rejects (tl.dot below 16, some dtypes): compile every generated
    kernel of a small model (layer forward and backward, the first layer's twin, all slots, the segment sums, the
    edge geometry) for sm_90 with Triton's own toolchain at the launchers' block sizes and warps, float32 and
    float64 (`bench/gpu/kernel_resources.py`, in a process without TRITON_INTERPRET)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "kernel_resources.py"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    output = tmp_path / "resources.json"
    result = subprocess.run([sys.executable, str(script), "--l-max", "1", "--channels", "3", "--layers", "2",
                             "--dtypes", "float32", "float64", "--slots", "--variants", "16x2r96",
                             "--output", str(output)], env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(output.read_text())
    # the layer kernels under a launch variant too (tune_layer.py's syntax): ptxas honours the register cap
    variant_rows = [row for row in rows if row["kernel"].endswith("@16x2r96")]
    assert len(variant_rows) == 2 * 8 and all(row["registers"] <= 96 and row["num_warps"] == 2 for row in variant_rows)
    rows = [row for row in rows if row not in variant_rows]
    # dtypes x (3 segment sums + 5 edge geometry (forward; backward and double backward, each with and without the
    # frequencies) + layers x (forward, backward, 3 slots of 2 forms) + the first layer's twin and its form of two
    # feature pairs (forward, backward))
    assert len(rows) == 2 * (3 + 5 + 2 * (2 + 6) + 2 + 2)
    assert {row["kernel"] for row in rows} >= {"edge_geometry.forward", "edge_geometry.backward.frequencies",
                                               "edge_geometry.double_backward.frequencies"}
    assert all(row["registers"] > 0 for row in rows)
    assert all(row["tf32_dots"] == 0 for row in rows), [row["kernel"] for row in rows if row["tf32_dots"]]
    # the layer kernels compiled with the specialisation their launch gives them (Triton's binder on the launcher's
    # own arguments), the others without
    kernel_kinds = {row["kernel"]: row["kernel"].startswith("layer") and row["kernel"].endswith(("forward", "backward"))
                    for row in rows}
    assert all(row["specialised"] == kernel_kinds[row["kernel"]] for row in rows)
    assert all(row["warp_instructions_per_edge"] > 0 for row in rows if kernel_kinds[row["kernel"]])
    # the SASS instruction mix and the warps an SM holds at once (registers, shared memory)
    assert all(row["num_warps"] <= row["resident_warps_per_sm"] <= 64 for row in rows)
    layers = {(row["kernel"], row["dtype"]): row["instructions"] for row in rows
              if row["kernel"].startswith("layer") and row["kernel"].endswith(("forward", "backward"))}
    assert all(mix["fp32_fma"] > 0 and not mix["fp64"] for (_, dtype), mix in layers.items() if dtype == "float32")
    assert all(mix["fp64"] > 0 for (_, dtype), mix in layers.items() if dtype == "float64")


@pytest.mark.skipif(_gpu_toolchain_missing() is not None, reason=str(_gpu_toolchain_missing()))
def test_channel_tiled_mixing_stays_a_float32_multiply_and_sum_on_a_gpu(tmp_path):
    """The channel-tiled layer kernels (above TILE_CHANNELS_ABOVE channels) mix by multiply and sum. Triton's combine
    pass may turn such a sum into a tt.dot, with TF32 inputs on Triton 3.6: an H200 gave relative errors of 8e-4 at
    33 channels in float32, which the interpreter cannot show. Compiled for sm_90, the tiled kernels must hold no
    dot at all, and the one-block kernels only IEEE ones (`kernel_resources.dot_precisions`)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "kernel_resources.py"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    rows = []
    for channels in (33, 16):
        output = tmp_path / f"resources-{channels}.json"
        result = subprocess.run([sys.executable, str(script), "--l-max", "1", "--channels", str(channels),
                                 "--layers", "2", "--dtypes", "float32", "--only", "layer", "--output", str(output)],
                                env=environment, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows += [{**row, "channels": channels} for row in json.loads(output.read_text())]
    tiled = [row for row in rows if row["channels"] == 33]
    one_block = [row for row in rows if row["channels"] == 16]
    # forward and backward of two layers, of the first one's twin and of its form of two feature pairs
    assert len(tiled) == len(one_block) == 8
    assert all(row["dots"] == 0 for row in tiled), [(row["kernel"], row["dots"]) for row in tiled]
    assert any(row["dots"] > 0 for row in one_block) and all(row["tf32_dots"] == 0 for row in one_block)


def test_triton_backend_warns_about_wide_models():
    config = small_config(num_tensor_features=96, l_max=1, num_layers=1)
    with pytest.warns(UserWarning, match="compare with backend='torch'"):
        af.Allegro(config, backend="triton")


def test_cpu_tensors_without_interpreter_get_a_clear_error(monkeypatch):
    from allegro_fast.kernels._common import ensure_triton_device

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*af.load\\(path, backend='torch'\\)"):
        ensure_triton_device(torch.zeros(3))


def test_an_interpreter_that_cannot_run_the_kernels_says_why(monkeypatch):
    """Triton 3.6's interpreter (torch 2.11's) under numpy >= 2.4 fails inside the layers' edge loops with a numpy
    TypeError; a launch on the CPU says so first, and how to fix it. Other pairs run."""
    import numpy
    import triton

    from allegro_fast.kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        for triton_version, numpy_version, fails in (("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                     ("3.7.1", "2.4.6", False), ("3.10.0", "3.0.0rc1", False),
                                                     ("3.5.1", "2.10.0", True)):
            monkeypatch.setattr(triton, "__version__", triton_version)
            monkeypatch.setattr(numpy, "__version__", numpy_version)
            _common.interpreter_problem.cache_clear()
            if fails:
                with pytest.raises(RuntimeError, match=f"Triton {triton_version} interpreter .* numpy "
                                                       f"{numpy_version}.*numpy<2.4, or Triton >= 3.7"):
                    _common.ensure_triton_device(torch.zeros(3))
            else:
                _common.ensure_triton_device(torch.zeros(3))
    finally:
        _common.interpreter_problem.cache_clear()  # the real versions' answer, for the tests after this one


def test_only_the_first_layer_takes_harmonics_for_its_features():
    """`feature_harmonics` (the Y that forms V^0, apart from the environment's) is an operand of the first layer's
    kernels only: a layer that reads V refuses it, before anything is launched."""
    from allegro_fast.kernels import tensor_product as kernels

    center_ptr, _ = random_csr([2, 1], "cpu")
    layer = layer_form(1, True, 2, layer=1)
    key = kernels.register_layer(layer)
    inputs = layer_inputs(layer, center_ptr, 2, torch.float64, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="first layer's kernels only"):
        kernels.layer_call(key, *inputs, center_ptr, feature_harmonics=inputs[1])


def test_an_unknown_form_key_says_where_forms_come_from():
    """What a process that never built the model (or runs a program of other versions) is told."""
    from allegro_fast.kernels import tensor_product as kernels

    with pytest.raises(LookupError, match="no fused layer form with key '0+' in this process.*load_exported"):
        kernels.layer_call("0" * 20, *[torch.zeros(1)] * 5)
    with pytest.raises(LookupError, match="no trilinear form"):
        kernels.trilinear_ref(kernels._FORMS["1" * 20], 0, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_triton_model_through_force_field_and_export(device, tmp_path):
    """The Triton backend behind the deployment paths: `ForceField` (plain tensors, the LAMMPS and
    AOTInductor entry) and `export_model` (make_fx + torch.export, dynamic sizes) give the eager numbers,
    also for a system of another size than the example."""
    from allegro_fast.export import (
        ForceField,
        export_model,
        graph_inputs,
        load_exported,
    )

    torch.manual_seed(0)
    config = small_config(num_layers=2, l_max=1, num_tensor_features=3)
    model = af.Allegro(config, backend="triton").double().to(device)
    example = af.AtomicGraph.from_ase(ethanol(1), r_max=config.r_max).to(device=device)
    other = af.AtomicGraph.from_ase(lonely_and_pair(), r_max=config.r_max).to(device=device)
    program = load_exported(export_model(model, example, tmp_path / "triton.pt2"))
    force_field = ForceField(model)
    for graph in (example, other):
        expected = model(graph, compute_stress=True, create_graph=False)
        for label, out in (("ForceField", force_field(*graph_inputs(graph))), ("export", program(graph))):
            for key in ("energy", "forces", "stress"):
                assert relative_error(out[key], expected[key].detach()) < TOLERANCE[torch.float64], (label, key)
