"""What every kernel launcher shares: the device check, nvtx ranges, and the kernel selection of precompile."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run our kernels, or None. Triton 3.6's (torch 2.11's) fails under
    numpy >= 2.4 on every loop whose bounds a kernel loads from memory, as the layers' loops over a center's edges
    do, with "only 0-dimensional arrays can be converted to Python scalars"; 3.7 and later run them."""
    import numpy
    import triton

    def release(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int("".join(digit for digit in minor if digit.isdigit()) or 0)

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter cannot run these kernels with numpy "
                f"{numpy.__version__}: it fails on loops with bounds loaded from memory under numpy >= 2.4. "
                "Install numpy<2.4, or Triton >= 3.7")
    return None


def ensure_triton_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under an interpreter that runs them; say which is missing."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            continue
        if tensor.device.type == "cpu" and interpreter_enabled():
            problem = interpreter_problem()
            if problem is not None:
                raise RuntimeError(problem)
            continue
        raise RuntimeError(
            f"the Triton kernels got a tensor on '{tensor.device}': they run on CUDA devices, or on the CPU "
            "only under the Triton interpreter (export TRITON_INTERPRET=1 before Python starts; about 100x "
            "slower than the torch backend, for tests). On a CPU use Allegro(cfg, backend='torch'), or for a saved "
            "model af.load(path, backend='torch') (--backend torch on the command line): the same function and "
            "weights."
        )


def gradient_wanted(tensor: torch.Tensor) -> bool:
    """Whether the running backward pass will use a gradient for `tensor`, an input a custom op saved. A custom
    op's ctx.needs_input_grad only says that the input requires grad; the force pass of training,
    torch.autograd.grad(energy, positions, create_graph=True), wants no parameter gradient. Asks the autograd
    engine whether it will run the tensor's grad_fn; True where that cannot be known (a leaf, a traced
    backward, an engine without the query)."""
    node = tensor.grad_fn
    if node is None or torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


def nvtx_range(name: str):
    """An nvtx range (visible in Nsight Systems) on CUDA machines, nothing elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Kernel selection: which generated kernels this process launches (allegro_fast.kernels.precompile)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelSelection:
    """Under `kernel_selection`: the names of the generated kernels asked for, in order of first request, and
    the seconds each selected kernel's first launch took (compiling it, or reading Triton's disk cache)."""

    launch: frozenset[str] | None
    requested: list[str] = dataclasses.field(default_factory=list)
    first_launch_s: dict[str, float] = dataclasses.field(default_factory=dict)


_SELECTION: KernelSelection | None = None


@contextlib.contextmanager
def kernel_selection(launch: Iterable[str] | None) -> Iterator[KernelSelection]:
    """Launch only the generated kernels named in `launch` (None: all); the others become stand-ins that launch
    nothing and leave their outputs as allocated. A precompile worker runs a model under this to compile its
    share of the kernels; with `launch=()` a run lists the kernels without compiling any."""
    global _SELECTION
    previous, _SELECTION = _SELECTION, KernelSelection(None if launch is None else frozenset(launch))
    try:
        yield _SELECTION
    finally:
        _SELECTION = previous


class _NotLaunched:
    def __getitem__(self, grid):
        return lambda *arguments, **options: None


class _FirstLaunchTimer:
    def __init__(self, kernel, name: str, selection: KernelSelection) -> None:
        self.kernel, self.name, self.selection = kernel, name, selection

    def __getitem__(self, grid):
        def launch(*arguments, **options):
            begin = time.perf_counter()
            result = self.kernel[grid](*arguments, **options)
            self.selection.first_launch_s.setdefault(self.name, time.perf_counter() - begin)
            return result

        return launch


def selected_kernel(name: str, load: Callable[[], object]):
    """The generated kernel `name` (built by `load`) as this process launches it: itself, or under
    `kernel_selection` a stand-in that launches nothing (not selected) or times its first launch (selected)."""
    selection = _SELECTION
    if selection is None:
        return load()
    if name not in selection.requested:
        selection.requested.append(name)
    if selection.launch is not None and name not in selection.launch:
        return _NotLaunched()
    return _FirstLaunchTimer(load(), name, selection)
