"""`kernels.precompile`: the example run asks for every kernel a real training step launches, with the same
arguments as far as Triton specialises on them (so the binaries it leaves are the ones a real run looks up),
and the workers launch each kernel once and report failures by kernel.

On a machine without CUDA the kernels run under the Triton interpreter (nothing is compiled there: these tests
check the bookkeeping and the arguments); on a CUDA machine the same tests run on the device.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import TRITON_DEVICES, ethanol, lonely_and_pair, periodic_cho, small_config

import allegro_fast as af

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


CONFIG = dict(l_max=2, num_tensor_features=5, num_layers=2)


def _training_step(model, graph) -> None:
    """What the trainer does: energy, forces and stress with create_graph, a loss of all three, backward."""
    model.train()
    out = model(graph, compute_stress=True)
    loss = out["energy"].square().sum() + out["forces"].square().sum() + out["stress"].square().sum()
    loss.backward()


def _structures(device, dtype):
    """Two batches unlike the precompile example: periodic (stress), zero and one neighbours, more atoms."""
    small = af.AtomicGraph.from_ase([periodic_cho(1)], r_max=3.3, dtype=dtype).to(device=device)
    large = af.AtomicGraph.from_ase([periodic_cho(2), periodic_cho(3)], r_max=3.3, dtype=dtype).to(device=device)
    mixed = af.AtomicGraph.from_ase([ethanol(), lonely_and_pair()], r_max=3.3, dtype=dtype).to(device=device)
    return small, large, mixed


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_the_example_run_asks_for_every_kernel_of_a_training_step(device):
    from allegro_fast.kernels._common import kernel_selection
    from allegro_fast.kernels.precompile import kernel_names

    config = small_config(**CONFIG)
    device = torch.device(device)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    training = kernel_names(config, torch.float64, device, training=True)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is left as it was
    inference = kernel_names(config, torch.float64, device, training=False)
    assert len(set(training)) == len(training)
    assert set(inference) < set(training)
    assert sum(name.startswith("layer ") for name in inference) == 2 * config.num_layers  # forward, backward
    assert any(name.startswith("slot ") for name in training)  # the double backward's kernels

    model = af.Allegro(config, backend="triton").to(device=device, dtype=torch.float64)
    _, _, mixed = _structures(device, torch.float64)
    with kernel_selection(()) as selection:  # nothing launched: only the names are wanted
        _training_step(model, mixed)
    assert set(selection.requested) <= set(training)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiled", [False, True])
def test_what_triton_specialises_on_does_not_depend_on_the_structure(device, tiled, monkeypatch):
    """Triton keys a compiled kernel by its arguments' dtypes, pointer alignment (16 bytes), integer values
    equal to 1 or divisible by 16 (and their width), and the constexprs. The layer and slot kernels get the same
    integers and alignments on the precompile molecule as on other structures; the edge geometry kernels take the
    number of edges (cheap to compile again). `tiled`: the channel-tiled layer kernels (above 32 channels), at 3."""
    from allegro_fast.kernels import _common
    from allegro_fast.kernels import tensor_product as kernels
    from allegro_fast.kernels.precompile import run_example

    if tiled:
        monkeypatch.setattr(kernels, "TILE_CHANNELS_ABOVE", 0)

    seen: dict[str, set] = {}

    class Recorder(_common._FirstLaunchTimer):
        def __getitem__(self, grid):
            def launch(*arguments, **options):
                signature = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                                  for a in arguments) + tuple(sorted(options.items()))
                seen.setdefault(run, {}).setdefault(self.name, set()).add(signature)
                return self.kernel[grid](*arguments, **options)

            return launch

    monkeypatch.setattr(_common, "_FirstLaunchTimer", Recorder)
    config = small_config(l_max=1, num_tensor_features=3, num_layers=2)  # the interpreter is slow
    device = torch.device(device)
    with _common.kernel_selection(None):
        run = "example"
        run_example(config, torch.float64, device, training=True)
        run = "two periodic cells"  # more atoms and edges, stress
        _training_step(af.Allegro(config, backend="triton").to(device=device, dtype=torch.float64),
                       _structures(device, torch.float64)[1])
    example, other = seen["example"], seen["two periodic cells"]
    assert set(other) <= set(example)
    # two layers' forward and backward (the first layer's double backward runs on its own), and the environment's
    # and the product's slot 2 (the mixing weights' gradient)
    assert sum(name.startswith(("layer ", "slot ")) for name in other) >= 6
    for name, signatures in other.items():
        if not name.startswith("edge_geometry"):
            assert signatures == example[name], f"{name}: launched with other arguments than in the example"


def test_workers_take_each_kernel_once_the_layer_kernels_alone():
    from allegro_fast.kernels.precompile import worker_groups

    names = ["edge_geometry l_max 2", "layer a forward", "layer a backward", "slot 0 of form x", "slot 1 of form x",
             "layer b forward, tiled (16, 32, 8)", "layer b backward, tiled", "slot 2 of form x",
             "edge_geometry backward l_max 2"]
    for processes in (1, 3, 6, 16):
        groups = worker_groups(names, processes)
        flat = [name for group in groups for name in group]
        assert sorted(flat) == sorted(names)
        assert all(len(group) == 1 for group in groups if group[0].startswith("layer "))
        assert [group[0] for group in groups[:2]] == ["layer a backward", "layer b backward, tiled"]
        assert len(groups) == 4 + max(1, min(5, processes - 4))


@pytest.mark.interpreter
def test_precompile_runs_every_kernel_in_a_worker_and_reports_failures(tmp_path):
    from allegro_fast.kernels import precompile as precompile_module
    from allegro_fast.kernels._common import interpreter_enabled
    from allegro_fast.kernels.precompile import kernel_names, precompile

    if not interpreter_enabled():
        pytest.skip("runs the workers on CPU tensors: needs TRITON_INTERPRET=1")
    config = small_config(l_max=1, num_tensor_features=3, num_layers=2)
    model = af.Allegro(config, backend="triton").double()
    af.save(model, tmp_path / "model.pt")
    assert precompile_module.main(["--model", str(tmp_path / "model.pt"), "--device", "cpu", "--dtype", "float64",
                                   "--training", "--processes", "2", "--output", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["errors"] == {}
    assert sorted(report["kernels"]) == sorted(kernel_names(config, torch.float64, torch.device("cpu"), True))
    assert all(seconds >= 0 for seconds in report["kernels"].values())
    again = precompile(af.Allegro(config, backend="triton").double(), training=True)  # same sizes: all done
    assert again["kernels"] == {} and again["errors"] == {} and again["workers"] == 0
    precompile_module._PRECOMPILED.clear()

    failed = precompile(model, processes=2, timeout=0.01)  # no worker starts Python that fast
    assert failed["kernels"] == {} and failed["errors"]
    assert all("did not finish within" in error for error in failed["errors"].values())

    with pytest.raises(ValueError, match="backend 'triton'"):
        precompile(af.Allegro(config, backend="torch"))
