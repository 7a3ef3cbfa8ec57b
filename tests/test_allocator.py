"""`retain_freed_memory`: large tensors reuse pages instead of faulting in new ones at every call."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "retain":
    import allegro_fast
    assert allegro_fast.retain_freed_memory()
for _ in range(3):
    torch.ones(16 * 2**20).sum()  # 64 MiB, allocated and freed: the heap grows to hold it
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20).sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 / 4096
    assert faults_per_call("default") > 0.5 * pages  # glibc maps a fresh 64 MiB block at every call
    assert faults_per_call("retain") < 0.01 * pages
