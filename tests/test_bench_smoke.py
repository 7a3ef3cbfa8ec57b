"""The benchmark harness works: the end-to-end runner writes valid JSON on a tiny case, and the kernel
profiles collect (they live in bench/kernels, outside CI's testpaths, so nothing else would notice)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from allegro_fast import bench_cli

REPO = Path(__file__).resolve().parents[1]


def test_summary_statistics():
    stats = bench_cli.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats["median_ms"], stats["min_ms"], stats["max_ms"]) == (3.0, 1.0, 5.0)
    assert stats["min_ms"] <= stats["p25_ms"] <= stats["median_ms"] <= stats["p75_ms"] <= stats["max_ms"]


def test_runner_writes_valid_json(tmp_path):
    output = tmp_path / "e2e.json"
    bench_cli.main(["--device", "cpu", "--jobs", "ag32:default:inference", "--providers", "torch", "triton",
                    "--repeats", "2", "--warmup", "0", "--threads", "1", "--output", str(output)])
    result = json.loads(output.read_text())
    for key in ("date", "device", "cpu", "commit", "versions", "loadavg_at_start", "settings", "rows"):
        assert key in result, key
    rows = {row["provider"]: row for row in result["rows"]}
    torch_row = rows["torch"]
    assert "error" not in torch_row, torch_row.get("error")
    assert torch_row["num_atoms"] == 32 and torch_row["num_edges"] > 0
    assert len(torch_row["times_ms"]) == 2 and torch_row["median_ms"] > 0
    assert torch_row["us_per_atom_step"] > 0
    assert torch_row["repeat_force_difference"] == 0.0  # one thread on a CPU: bitwise repeatable
    assert rows["triton"]["skipped"]  # never timed on a CPU, with the reason


def test_a_worker_stopped_by_the_timeout_keeps_the_rows_of_its_finished_jobs():
    """On CUDA one worker runs all jobs of a provider: a timeout in its last job must not lose the others."""
    worker = ("import json, time\n"
              "print(json.dumps({'job_row': {'case': 'ag256', 'times_ms': [1.0]}}), flush=True)\n"
              "print('some log line', flush=True)\n"
              "time.sleep(60)\n")
    rows, error = bench_cli.run_subprocess([sys.executable, "-c", worker], timeout=3)
    assert rows == [{"case": "ag256", "times_ms": [1.0]}] and error == "timed out after 3 s"
    rows, error = bench_cli.run_subprocess([sys.executable, "-c", "import sys; sys.exit('no GPU here')"], timeout=30)
    assert rows == [] and error == "exit 1: no GPU here"


def test_a_failed_worker_reports_its_exception_not_the_warnings_logged_after_it():
    """On the H200, nequip's AOTInductor job failed and the row said only `W1204 ... is missing a c-shim`, an
    inductor warning printed after the traceback."""
    worker = ("import sys\n"
              "print('Traceback (most recent call last):', file=sys.stderr)\n"
              "print('torch._inductor.exc.InductorError: RuntimeError: out of shared memory', file=sys.stderr)\n"
              "print('W1204 13:41:29.706000 3795 torch/_inductor/ir.py:8256] missing a c-shim', file=sys.stderr)\n"
              "sys.exit(3)\n")
    rows, error = bench_cli.run_subprocess([sys.executable, "-c", worker], timeout=30)
    assert rows == [] and error == "exit 3: torch._inductor.exc.InductorError: RuntimeError: out of shared memory"
    assert bench_cli.failure_line("W1204 13:41:29 1 x.py:1] only a warning\nKilled\n") == "Killed"


def test_host_profile_says_where_a_call_spends_its_time():
    import torch

    weight = torch.randn(64, 64, requires_grad=True)

    def step():
        x = torch.randn(128, 64)
        return torch.autograd.grad((x @ weight).tanh().sum(), weight)[0]

    profile = bench_cli.host_profile(step, calls=3, device=torch.device("cpu"))
    assert profile["calls"] == 3 and profile["wall_ms_per_call"] > 0
    assert 0 < profile["ops_self_cpu_ms_per_call"] <= profile["wall_ms_per_call"]
    assert profile["kernel_launches_per_call"] == 0 and profile["gpu_kernel_ms_per_call"] is None  # no GPU
    ops = {row["op"]: row for row in profile["top_ops"]}
    assert ops["aten::mm"]["calls_per_call"] >= 2  # forward and the gradient
    assert ops["aten::tanh"]["calls_per_call"] == 1


def test_kernel_profiles_collect():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "bench/kernels",
         "--bench-sizes", "quick", "--bench-device", "cpu"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = [line for line in result.stdout.splitlines() if "test_profile[" in line]
    assert any("layer-middle" in line and "double_backward" in line for line in collected)
    assert any("edge_geometry" in line for line in collected) and any("readout" in line for line in collected)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("threshold,tiled", [(None, False), (0, True)])
def test_kernel_profile_times_the_tiled_layer_kernels_on_request(tmp_path, threshold, tiled):
    """--bench-tile-channels-above moves the layer's kernel choice (the GPU suite's kernels_layer_tiled_float32 stage
    times n = 32 both ways), and every triton layer row says which kernels ran. Under the interpreter: one call."""
    output = tmp_path / "profile.json"
    option = [] if threshold is None else ["--bench-tile-channels-above", str(threshold)]
    # without the PYTEST_XDIST_* variables of an xdist worker, under which pytest-benchmark writes no JSON
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    environment["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/kernels", "--bench-sizes", "quick",
         "--bench-device", "cpu", "--bench-ops", "layer", "--bench-providers", "triton", "--bench-dtypes", "float32",
         *option, "-k", "middle and n8 and l1 and forward", "--benchmark-json", str(output)],
        capture_output=True, text=True, cwd=REPO, check=False, env=environment,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(output.read_text())["benchmarks"]
    assert len(rows) == 1 and rows[0]["extra_info"]["tiled"] is tiled


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("provider,task", [("triton-compiled", "inference"), ("triton-compiled", "train"),
                                           ("triton-graphs", "inference"), ("triton-graphs", "train")])
def test_triton_compiled_worker_times_the_compiled_triton_model(tmp_path, monkeypatch, provider, task):
    """The "triton-compiled" provider's worker builds the triton backend, runs it through `compile_model` /
    `TrainingForceField`, and (inference) checks its forces against the torch backend's; "triton-graphs" is the
    same with CUDA graphs (mode="reduce-overhead", static shapes, padded edges; here without the graphs). Under the
    interpreter, with a small model and aot_eager (the graph inductor would compile) to keep it short."""
    import ase.io
    from ase.build import bulk

    import allegro_fast as af
    from allegro_fast import export

    if not torch_cuda_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernels need TRITON_INTERPRET=1 before triton is imported")
    small = dict(r_max=3.2, num_scalar_features=8, num_tensor_features=3, num_bessels=4, two_body_mlp_hidden=(8,),
                 latent_mlp_hidden=(8,), readout_mlp_hidden=(5,))
    preset = af.AllegroConfig.preset
    monkeypatch.setattr(af.AllegroConfig, "preset", classmethod(
        lambda cls, name, type_names, **overrides: preset(name, type_names, **{**small, **overrides})))
    compile_model, training = export.compile_model, export.TrainingForceField

    class SmallPadding(export.EdgePadding):  # capacities in multiples of 16 edges, not 256 (5x the 48 real ones)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{"multiple": 16, **kwargs})

    monkeypatch.setattr(export, "EdgePadding", SmallPadding)
    options = []
    monkeypatch.setattr(export, "compile_model",
                        lambda model, **kwargs: options.append(kwargs) or compile_model(model, backend="aot_eager"))
    monkeypatch.setattr(export, "TrainingForceField", lambda model, **kwargs: options.append(kwargs) or training(
        model, backend="aot_eager", **{key: value for key, value in kwargs.items() if key != "mode"}))

    atoms = bulk("Ag", "fcc", a=4.09, cubic=True)  # 4 atoms: the interpreter is slow
    atoms.rattle(0.05, seed=0)
    frames_path = tmp_path / "ag4.extxyz"
    ase.io.write(frames_path, [atoms], format="extxyz")
    job = {"case": "ag4", "model": "default", "task": task, "dtype": "float64", "type_names": ["Ag"],
           "frames_path": str(frames_path), "num_atoms": 4}
    settings = {"device": "cpu", "repeats": 1, "warmup": 0, "seed": 0, "threads": 1, "batch_size": 1}
    row = bench_cli.run_our_job(provider, job, settings)
    assert row["num_edges"] == 4 * 12 and len(row["times_ms"]) == 1  # nearest neighbours only at r_max 3.2
    graphs = {"mode": "reduce-overhead", "dynamic": False, "edge_headroom": "auto"}  # export.CUDA_GRAPHS
    assert options == [graphs if provider == "triton-graphs" else {}]
    if task == "inference":
        assert row["force_error_vs_torch"] < 1e-10 and row["repeat_force_difference"] == 0.0
    else:
        assert "force_error_vs_torch" not in row and row["repeat_gradient_difference"] == 0.0


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_layer_launch_tuner_checks_every_variant_against_the_default(tmp_path):
    """bench/gpu/tune_layer.py (the GPU suite's tune_layer stage), under the interpreter: every variant's outputs
    are compared with the default launch's, and the JSON says what ran (times here are not timings)."""
    output = tmp_path / "tune.json"
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "tune_layer.py"), "--device", "cpu",
                             "--edges", "64", "--variants", "16x4s1r128", "--repeats", "1", "--output", str(output)],
                            capture_output=True, text=True, cwd=REPO, env=environment, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    every_row = json.loads(output.read_text())["rows"]
    rows = [r for r in every_row if r["pass"] != "double_backward"]
    assert {(r["position"], r["pass"], r["variant"]) for r in rows} == {
        (position, name, variant) for position in ("first", "last") for name in ("forward", "backward")
        for variant in ("default", "16x4s1r128")}
    assert all(r["relative_difference"] < 1e-5 and r["median_ms"] > 0 for r in every_row)
    assert {(r["num_stages"], r["max_registers"]) for r in rows if r["variant"] != "default"} == {(1, 128)}
    # the double backward at the default launches, the first layer's both ways (agreeing to rounding)
    assert {(r["position"], r["variant"]) for r in every_row if r["pass"] == "double_backward"} == {
        ("first", "own kernels"), ("first", "twin"), ("last", "default")}
    # the forward rows' fraction of the fused core's roofline, with the work of this (the default, 2-layer) model:
    # the first layer has 11 paths (roofline.py's 3-layer model: 15)
    assert all(r["roofline_fraction"] > 0 for r in rows if r["pass"] == "forward")
    assert not any("roofline_fraction" in r for r in rows if r["pass"] == "backward")
    assert json.loads(output.read_text())["work"]["first"]["needed_paths"] == 11


def test_loop_weighted_instruction_count_weighs_loop_bodies_by_their_trips():
    """kernel_resources.loop_weighted_instructions on a SASS listing as cuobjdump prints it: a prologue of 2, a loop
    of 3 (closed by a predicated backward branch) with a loop of 2 inside, an exit of 2."""
    spec = importlib.util.spec_from_file_location("kernel_resources", REPO / "bench" / "gpu" / "kernel_resources.py")
    resources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resources)
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                   /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   FFMA R2, R3, R4, R2 ;                    /* 0x0000000403027223 */
        /*0030*/                   LDS.64 R4, [R5] ;                        /* 0x0000000005047984 */
        /*0040*/               @P0 BRA 0x30 ;                               /* 0xfffffffc00000947 */
        /*0050*/              @!P1 BRA 0x20 ;                               /* 0xfffffffc0000a947 */
        /*0060*/                   STG.E [R6.64], R2 ;                      /* 0x0000000206007986 */
        /*0070*/                   EXIT ;                                   /* 0x000000000000794d */
"""
    assert resources.instruction_mix(sass)["total"] == 8
    # trips 3: 2 outside + 0x20 and 0x50 in one loop (3 each) + 0x30 and 0x40 in two (9 each) + 2 outside
    assert resources.loop_weighted_instructions(sass, 3) == 2 + 2 * 3 + 2 * 9 + 2
    assert resources.loop_weighted_instructions(sass, 1) == 8


def test_gpu_suite_merges_around_a_stage_killed_while_writing(tmp_path):
    """The H200 suite call died when a kernel-profile stage, killed at its timeout, left an empty JSON that the
    merge read: a truncated file is now skipped, the rows of the others are kept."""
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    stats = {"median": 1.0, "iqr": 0.1, "min": 0.9, "max": 1.2, "rounds": 5}
    (tmp_path / "kernels-layer-float32.json").write_text(json.dumps(
        {"benchmarks": [{"group": "layer", "name": "test_profile[x]", "stats": stats}]}))
    (tmp_path / "kernels-layer-float64.json").write_text("")  # killed while pytest-benchmark wrote it
    (tmp_path / "e2e-headline.json").write_text(json.dumps({"rows": [{"provider": "triton"}], "speedups": {}}))
    (tmp_path / "e2e-training.json").write_text('{"rows": [')
    assert [row["name"] for row in suite.merge_kernel_profiles(tmp_path)] == ["test_profile[x]"]
    assert suite.merge_e2e(tmp_path)["rows"] == [{"provider": "triton"}]
    out = tmp_path / "out"
    out.mkdir()
    runner = suite.Suite(tmp_path, out, budget=60)
    runner.add({"stage": "kernels_layer_float64", "status": "timeout", "seconds": 1.0})
    assert {"summary.txt", "summary.json", "kernels.json", "e2e.json", "suite.tar.gz"} <= {p.name for p in out.iterdir()}


def test_silver_cases_build_their_frames():
    """The Ag cases: one rattled supercell, or (ag2048x2) two with different rattles, a batch of 2 structures for
    nequip's compiled training, which runs eagerly on single-frame batches."""
    type_names, frames = bench_cli.build_frames("ag32")
    assert type_names == ["Ag"] and [len(atoms) for atoms in frames] == [32]
    _, frames = bench_cli.build_frames("ag2048x2")
    assert [len(atoms) for atoms in frames] == [2048, 2048]
    assert not (frames[0].positions == frames[1].positions).all()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_op_counts_of_the_triton_backends_training_step():
    """bench/op_counts.py counts the ops of an eager call (the launches of an eager GPU step) with the kernels not
    launched: the triton backend's training step runs every derivative of the edge geometry in its kernels (one
    double backward; no sin, cos, sqrt or norm op of torch autograd through the reference formulas), and its
    inference call the two layers' forward and backward kernels."""
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "op_counts.py"), "--top", "1000"], env=environment,
                            capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    inference, training = (json.loads(line) for line in result.stdout.splitlines())
    assert inference["call"] == "inference" and training["call"] == "training"
    custom = inference["custom"]
    assert custom["allegro_fast.fused_layer"] == custom["allegro_fast.fused_layer_backward"] == 2
    assert training["custom"]["allegro_fast.edge_geometry_double_backward"] == 1
    assert training["not_views"] == training["ops"] - training["views"] > training["loss_backward"]["not_views"] > 0
    ops = {name for name, _ in training["top"]}
    assert not ops & {"sin", "cos", "sqrt", "linalg_vector_norm"}, ops
