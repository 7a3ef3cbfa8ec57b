"""Kernel profiles: each Allegro op, forward / backward / double backward, per provider, size and dtype.

    pytest bench/kernels                                      # CPU grid (or GPU grid where CUDA exists)
    pytest bench/kernels --bench-sizes quick                  # seconds: tiny sizes
    pytest bench/kernels --bench-device cuda --benchmark-json profiles.json --benchmark-max-time 0.2
    pytest bench/kernels -k "layer and double_backward"       # one slice
    pytest bench/kernels --bench-ops layer --bench-providers triton --bench-tile-channels-above 0  # tiled kernels

Ops and passes are defined in bench/ops.py. Every benchmark's group names the op, pass, dtype and size
("layer[middle] double_backward float32 E=2048 n=16 l_max=2"), so pytest-benchmark's table lists the
providers side by side within each group. Triton under TRITON_INTERPRET=1 runs only at "quick" sizes
and lands in its own groups marked "interpreter" (correctness of the harness, not a timing).

Sizes vary one at a time around a base (edges E, tensor channels n, l_max); "first" and "last"
layer positions only at the base size. The scalar latent width is 64 (the default model).
On CUDA every timed call ends with torch.cuda.synchronize(); out-of-memory skips with a reason.
"""

from __future__ import annotations

import ops
import pytest
import torch

SIZE_GRIDS = {
    # (base E, n, l_max), edge counts, channel counts, l_max values
    "quick": ((256, 8, 2), (256,), (8,), (1, 2)),
    "cpu": ((2048, 16, 2), (512, 2048, 8192), (8, 16, 32), (1, 2, 3)),
    "gpu": ((65536, 16, 2), (8192, 65536, 262144), (16, 32, 64), (1, 2, 3)),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
INTERPRETER_EDGES = 48  # the Triton interpreter is ~100x slower than torch: one call, a few dozen edges


def size_points(grid: str, op: str) -> list[tuple[int, int, int, str]]:
    """(E, n, l_max, position) points for one op: one-at-a-time variations around the base."""
    (base_edges, base_n, base_l), edges, channels, degrees = SIZE_GRIDS[grid]
    points = [(e, base_n, base_l) for e in edges]
    if op == "layer":
        points += [(base_edges, c, base_l) for c in channels]
    if op in ("layer", "edge_geometry"):
        points += [(base_edges, base_n, l) for l in degrees]
    if op != "layer":  # n does not enter edge geometry or readout, l_max not the readout
        points = [(e, base_n, l if op == "edge_geometry" else base_l) for e, _, l in points]
    unique = list(dict.fromkeys(points))
    out = [(e, n, l, "middle") for e, n, l in unique]
    if op == "layer":
        out += [(base_edges, base_n, base_l, "first"), (base_edges, base_n, base_l, "last")]
    return out


def bench_device(config) -> torch.device:
    name = config.getoption("bench_device", default=None)
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "profile_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench_device(config)
    grid = config.getoption("bench_sizes", default=None) or ("gpu" if device.type == "cuda" else "cpu")
    dtypes = config.getoption("bench_dtypes", default="float32,float64").split(",")
    op_names = config.getoption("bench_ops", default=",".join(ops.OPS)).split(",")
    providers = config.getoption("bench_providers", default=",".join(ops.PROVIDERS)).split(",")
    cases, ids = [], []
    for op in op_names:
        for edges, channels, l_max, position in size_points(grid, op):
            for dtype in dtypes:
                for provider in providers:
                    for pass_name in ops.PASSES:  # innermost: the three passes reuse one built case
                        cases.append((op, position, edges, channels, l_max, dtype, provider, pass_name, grid, device.type))
                        ids.append(f"{op}-{position}-E{edges}-n{channels}-l{l_max}-{dtype}-{provider}-{pass_name}")
    metafunc.parametrize("profile_case", cases, ids=ids)


_cache: dict = {}


def built_case(key, **kwargs) -> ops.OpCase:
    """Keep only the last built case: the passes of one case run one after another."""
    if key not in _cache:
        _cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _cache[key] = ops.make_op(**kwargs)
    return _cache[key]


def test_profile(benchmark, profile_case):
    op, position, edges, channels, l_max, dtype_name, provider, pass_name, grid, device = profile_case
    reason = ops.provider_unavailable(provider, op, torch.device(device))
    if reason:
        pytest.skip(reason)
    interpreter = provider == "triton" and device != "cuda"
    if interpreter:
        if grid != "quick":
            pytest.skip("Triton under the interpreter: only at --bench-sizes quick (correctness, not timing)")
        edges = INTERPRETER_EDGES
    key = (op, position, edges, channels, l_max, dtype_name, provider, device)
    try:
        case = built_case(key, op=op, provider=provider, num_edges=edges, channels=channels, l_max=l_max,
                          dtype=DTYPES[dtype_name], device=device, position=position)
        timed = ops.prepare_pass(case, pass_name)
    except torch.cuda.OutOfMemoryError as error:
        _cache.clear()
        pytest.skip(f"out of memory: {str(error).splitlines()[0]}")

    def run():
        result = timed()
        ops.synchronize(device)
        return result

    size = {"layer": f"E={edges} n={channels} l_max={l_max}", "edge_geometry": f"E={edges} l_max={l_max}",
            "readout": f"E={edges}"}[op]
    label = f"{op}[{position}]" if op == "layer" else op
    benchmark.group = f"{label} {pass_name} {dtype_name} {size}" + (
        " (interpreter, not a timing)" if interpreter else "")
    benchmark.extra_info.update(op=op, position=position, provider=provider, pass_=pass_name, dtype=dtype_name,
                                num_edges=edges, num_nodes=case.num_nodes, channels=channels, l_max=l_max,
                                device=device, interpreter=interpreter)
    if provider == "triton" and op == "layer":  # which layer kernels ran: one-block or channel-tiled
        from allegro_fast.kernels.tensor_product import layer_launch

        benchmark.extra_info["tiled"] = layer_launch(channels, DTYPES[dtype_name], device).tiled
    try:
        result = benchmark.pedantic(run, rounds=1, iterations=1) if interpreter else benchmark(run)
    except torch.cuda.OutOfMemoryError as error:
        _cache.clear()
        pytest.skip(f"out of memory: {str(error).splitlines()[0]}")
    values = [t for t in result if t is not None]
    assert values and all(bool(torch.isfinite(t).all()) for t in values), "non-finite output"
