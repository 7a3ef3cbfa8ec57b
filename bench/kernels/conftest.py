"""Options of the kernel profiles (bench/kernels); see test_ops_profile.py.

    pytest bench/kernels --bench-device cuda --bench-sizes gpu --benchmark-json out.json
    pytest bench/kernels --bench-ops layer --bench-providers triton --bench-tile-channels-above 0   # tiled kernels
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ops.py


def pytest_addoption(parser):
    group = parser.getgroup("allegro-fast kernel profiles")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda where available)")
    group.addoption("--bench-sizes", default=None, choices=["quick", "cpu", "gpu"],
                    help="size grid (default: gpu on CUDA, cpu otherwise)")
    group.addoption("--bench-dtypes", default="float32,float64", help="comma-separated dtypes")
    group.addoption("--bench-ops", default="edge_geometry,layer,readout", help="comma-separated ops")
    group.addoption("--bench-providers", default="torch,reference,triton", help="comma-separated providers")
    group.addoption("--bench-tile-channels-above", type=int, default=None,
                    help="the triton layer runs its channel-tiled kernels above this many channels (default: the "
                         "library's TILE_CHANNELS_ABOVE); 0 times the tiled kernels at every size")


def pytest_configure(config):
    threshold = config.getoption("bench_tile_channels_above", default=None)
    if threshold is not None:
        from allegro_fast.kernels import tensor_product

        tensor_product.TILE_CHANNELS_ABOVE = threshold
