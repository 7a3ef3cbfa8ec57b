"""torch.compile's disk caches and this package's source: programs compiled here carry `compile_cache_tag` in their
cache keys, so that a program compiled from other source (an upgrade, an edit) is never read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ethanol, small_config

import allegro_fast as af
from allegro_fast.export import TrainingForceField, compile_cache_tag, compile_model, source_digest

REPO = Path(__file__).resolve().parents[1]


def test_source_digest_sees_every_byte_and_every_name(tmp_path):
    def tree(name: str, files: dict[str, bytes]) -> Path:
        root = tmp_path / name
        for path, content in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(content)
        return root

    files = {"a.py": b"x = 1\n", "sub/b.py": b"y = 2\n", "notes.txt": b"not source"}
    digest = source_digest([tree("same", files)])
    assert source_digest([tree("copy", files)]) == digest, "the same source elsewhere"
    assert source_digest([tree("text", {**files, "notes.txt": b"changed"})]) == digest, "only .py files count"
    assert source_digest([tree("byte", {**files, "sub/b.py": b"y = 3\n"})]) != digest
    assert source_digest([tree("moved", {"a.py": files["a.py"], "b.py": files["sub/b.py"]})]) != digest
    assert source_digest([tree("one", {"a.py": files["a.py"]}), tree("two", {"sub/b.py": files["sub/b.py"]})]) != \
        source_digest([tree("one_and_two", {"a.py": files["a.py"]})])


def _installed_copy(root: Path) -> Path:
    """The package laid out as a wheel installs it (kernels and reference inside allegro_fast)."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "allegro_fast", root / "allegro_fast", ignore=ignore)
    shutil.copytree(REPO / "kernels", root / "allegro_fast" / "kernels", ignore=ignore)
    shutil.copytree(REPO / "reference", root / "allegro_fast" / "reference", ignore=ignore)
    return root


def _tag_of(root: Path) -> dict:
    probe = ("import json, allegro_fast, allegro_fast.export as e, importlib.util as u; "
             "print(json.dumps({'tag': e.compile_cache_tag(), 'package': allegro_fast.__file__, "
             "'kernels': u.find_spec('allegro_fast.kernels').origin}))")
    env = {**os.environ, "PYTHONPATH": str(root)}
    # run in root: `python -c` puts the working directory first on sys.path, and the repository's would win
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=root, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_tag_changes_with_the_kernels_source_where_the_package_is_installed(tmp_path):
    root = _installed_copy(tmp_path / "site")
    before = _tag_of(root)
    assert before["package"].startswith(str(root)) and before["kernels"].startswith(str(root)), before
    kernels = root / "allegro_fast" / "kernels" / "tensor_product.py"
    kernels.write_text(kernels.read_text() + "\n# an edit\n")
    after = _tag_of(root)
    assert after["tag"] != before["tag"] and after["tag"].startswith("allegro_fast-")
    assert compile_cache_tag().startswith("allegro_fast-") and len(compile_cache_tag()) == len(after["tag"])


def test_programs_compile_under_the_tag_after_the_users_own_and_put_the_config_back():
    """A backend that records the tag in force while it compiles (and runs the graph as it is)."""
    seen = []

    def recording_backend(graph_module, example_inputs):
        seen.append(torch.compiler.config.cache_key_tag)
        return graph_module.forward

    torch.manual_seed(0)
    model = af.Allegro(small_config(num_layers=1, l_max=1)).double()
    graph = af.AtomicGraph.from_ase(ethanol(3), r_max=model.config.r_max)
    torch._dynamo.reset()
    with torch.compiler.config.patch(cache_key_tag="mine"):
        compile_model(model, backend=recording_backend)(graph)
        TrainingForceField(model, backend=recording_backend)(graph)
        assert torch.compiler.config.cache_key_tag == "mine"
    assert len(seen) >= 2 and set(seen) == {f"mine+{compile_cache_tag()}"}, seen
    seen.clear()
    torch._dynamo.reset()
    compile_model(model, backend=recording_backend)(graph)
    assert seen and set(seen) == {compile_cache_tag()}
    assert torch.compiler.config.cache_key_tag == "" and not torch._dynamo.config.trace_autograd_ops


# A training step through one of our custom ops (segment_expand, the backward of segment_sum, is differentiated by
# its registered derivative in the loss backward), compiled with inductor under a given tag, with that derivative
# as registered or doubled: prints the parameter's gradient, compiled and eager.
STEP = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[1]
import torch
from torch.fx.experimental.proxy_tensor import make_fx
import allegro_fast.export as export
from allegro_fast.kernels import segments

export.compile_cache_tag = lambda: sys.argv[2]
if sys.argv[3] == "doubled":
    segments.segment_expand.register_autograd(lambda ctx, grad: tuple(None if g is None else 2 * g
                                                                      for g in segments._expand_backward(ctx, grad)),
                                              setup_context=segments._setup)


def forces(weight, positions, ptr, segment_of):
    positions = positions.detach().requires_grad_()
    energy = (segments.segment_sum(weight * positions ** 3, ptr, segment_of) ** 2).sum()
    return torch.autograd.grad(energy, positions, create_graph=True)[0]


def gradient(program):
    weight = torch.linspace(0.5, 1.5, 3, dtype=torch.float64).requires_grad_()
    positions = torch.linspace(-1.0, 2.0, 21, dtype=torch.float64).reshape(7, 3)
    (program(weight, positions, *SEGMENTS) ** 2).sum().backward()
    return weight.grad.tolist()


SEGMENTS = torch.tensor([0, 2, 2, 7]), torch.tensor([0, 0, 2, 2, 2, 2, 2])  # ptr, and the segment of each row
traced = make_fx(forces, tracing_mode="fake", _allow_non_fake_inputs=True)(
    torch.ones(3, dtype=torch.float64), torch.zeros(7, 3, dtype=torch.float64), *SEGMENTS)
program = torch.compile(traced, dynamic=False)
with export._CompileSettings():
    compiled = gradient(program)
print(json.dumps({"compiled": compiled, "eager": gradient(forces)}))
"""


def _step(cache: Path, tag: str, derivative: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, str(cache), tag, derivative], capture_output=True, text=True,
                         env={**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_changed_derivative_compiles_anew_under_another_tag(tmp_path):
    """Same cache folder; the second process's source differs (another tag) and so does the derivative. Without
    the tag in the key it would read back the first process's program, with the old derivative (also shown by
    bench/training_memory.py's history; not asserted here, since it is torch's behaviour, not ours)."""
    first = _step(tmp_path, "allegro_fast-0000000000000000", "registered")
    assert first["compiled"] == pytest.approx(first["eager"], rel=1e-12)
    second = _step(tmp_path, "allegro_fast-1111111111111111", "doubled")
    assert second["eager"] != pytest.approx(first["eager"], rel=1e-3), "the doubled derivative changes the gradient"
    assert second["compiled"] == pytest.approx(second["eager"], rel=1e-12), "a program of the old source was read"


def test_without_a_cache_tag_in_torch_programs_compile_without_the_caches(monkeypatch):
    """torch before 2.7 has no torch.compiler.config.cache_key_tag."""
    from allegro_fast.export import _CompileSettings

    monkeypatch.delattr(torch.compiler, "config")
    before = torch._inductor.config.force_disable_caches
    with _CompileSettings((torch._dynamo.config, "trace_autograd_ops", True)):
        assert torch._inductor.config.force_disable_caches and torch._dynamo.config.trace_autograd_ops
    assert torch._inductor.config.force_disable_caches == before and not torch._dynamo.config.trace_autograd_ops
