"""The allegro-fast command line: train, evaluate, md, demo, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import ase
import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase.build import molecule

from allegro_fast.cli import main
from allegro_fast.demo import generate_silver_frames


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A YAML config, its data and the model trained from it with `allegro-fast train` (2 epochs)."""
    folder = tmp_path_factory.mktemp("cli")
    ase.io.write(folder / "silver.extxyz", generate_silver_frames(10, seed=1, equilibration_steps=5, steps_between=2),
                 format="extxyz")
    config = {
        "data": {"train_file": "silver.extxyz", "n_train": 6, "n_val": 2},  # relative to the YAML file
        "model": {"r_max": 3.5, "l_max": 1, "num_layers": 1, "num_scalar_features": 8, "num_tensor_features": 3,
                  "two_body_mlp_hidden": [8], "latent_mlp_hidden": [8], "readout_mlp_hidden": [5]},
        "training": {"batch_size": 3, "max_epochs": 2, "num_threads": 1, "plots": False},
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(folder / "run.yaml"), "--workdir", str(folder / "run"), "--quiet"]) == 0
    return folder


def test_train_and_evaluate(trained, capsys):
    assert (trained / "run" / "model.pt").is_file() and (trained / "run" / "test_metrics.json").is_file()
    capsys.readouterr()
    out_json = trained / "metrics.json"
    assert main(["evaluate", str(trained / "run" / "model.pt"), str(trained / "silver.extxyz"), "--index", ":4",
                 "--json", str(out_json), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "on 4 frames" in printed and "forces" in printed and "meV/Å" in printed
    metrics = json.loads(out_json.read_text())
    assert metrics["num_structures"] == 4 and metrics["forces_mae_meV_per_A"] > 0
    assert "stress_mae_meV_per_A3" in metrics and metrics["per_species"]["Ag"]["num_atoms"] == 4 * 31


def test_md(trained, capsys):
    assert main(["md", str(trained / "run" / "model.pt"), str(trained / "silver.extxyz"), "--steps", "4",
                 "--log-interval", "2", "--temperature", "500", "--trajectory", str(trained / "md.traj"),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ns/day" in printed and "drift" in printed
    assert len(ase.io.read(trained / "md.traj", index=":")) == 3


def test_md_runs_the_backend_and_device_it_is_told(trained, capsys, tmp_path):
    """--backend triton (the kernels; on the CPU under the interpreter) follows the torch backend's trajectory, and
    the summary says what ran."""
    from allegro_fast.kernels._common import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the triton backend on the CPU needs TRITON_INTERPRET=1")
    finals = {}
    for backend in ("torch", "triton"):
        assert main(["md", str(trained / "run" / "model.pt"), str(trained / "silver.extxyz"), "--steps", "3",
                     "--temperature", "500", "--trajectory", str(tmp_path / f"{backend}.traj"), "--quiet",
                     "--backend", backend, "--device", "cpu"]) == 0
        assert f"model: Allegro, {backend} backend, float32, eager, on cpu" in capsys.readouterr().out
        finals[backend] = ase.io.read(tmp_path / f"{backend}.traj", index=-1).positions
    assert abs(finals["triton"] - finals["torch"]).max() < 1e-5


def test_md_starts_from_a_frame_of_an_rmd17_style_npz(trained, tmp_path):
    """The same run as from that frame written as a cluster (rMD17 frames have no cell) in an extxyz file."""
    frames = ase.io.read(trained / "silver.extxyz", index=":2")
    np.savez(tmp_path / "silver.npz", nuclear_charges=frames[0].numbers, coords=np.stack([f.positions for f in frames]),
             energies=np.zeros(2), forces=np.zeros((2, len(frames[0]), 3)))
    cluster = ase.Atoms(frames[1].numbers, positions=frames[1].positions)
    ase.io.write(tmp_path / "cluster.extxyz", [cluster, cluster], format="extxyz")
    finals = []
    for structure in (tmp_path / "silver.npz", tmp_path / "cluster.extxyz"):
        trajectory = tmp_path / f"{structure.suffix[1:]}.traj"
        assert main(["md", str(trained / "run" / "model.pt"), str(structure), "--index", "1", "--steps", "2",
                     "--trajectory", str(trajectory), "--quiet"]) == 0
        finals.append(ase.io.read(trajectory, index=-1).positions)
    np.testing.assert_array_equal(*finals)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_md_on_a_gpu_on_the_kernels_as_cuda_graphs(trained, capsys, tmp_path):
    """What the README tells a GPU user to run: the kernels precompile, then CUDA graphs replay the steps, along the
    torch backend's trajectory."""
    finals = {}
    for options in (["--backend", "torch"], ["--backend", "triton", "--cuda-graphs"]):
        path = tmp_path / f"{options[1]}.traj"
        assert main(["md", str(trained / "run" / "model.pt"), str(trained / "silver.extxyz"), "--steps", "3",
                     "--temperature", "500", "--trajectory", str(path), "--quiet", "--device", "cuda", *options]) == 0
        finals[options[1]] = ase.io.read(path, index=-1).positions
    assert "model: Allegro, triton backend, float32, CUDA graphs, on cuda" in capsys.readouterr().out
    assert abs(finals["triton"] - finals["torch"]).max() < 1e-5


def test_bad_input_is_one_line_naming_the_problem(trained, capsys, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train_file: x.xyz\ntraining:\n  learnig_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    error = capsys.readouterr().err
    assert "bad.yaml: unknown key 'training.learnig_rate'; did you mean 'training.learning_rate'?" in error
    assert "Traceback" not in error

    water = molecule("H2O")
    water.info["energy"] = -1.0
    water.arrays["forces"] = water.positions * 0.1
    ase.io.write(tmp_path / "water.extxyz", [water], format="extxyz")
    assert main(["evaluate", str(trained / "run" / "model.pt"), str(tmp_path / "water.extxyz")]) == 2
    error = capsys.readouterr().err
    assert "water.extxyz, frame 0: species ['H', 'O'] not in the model's type_names ['Ag']" in error

    (tmp_path / "cut.extxyz").write_text((trained / "silver.extxyz").read_text()[:3000])
    assert main(["evaluate", str(trained / "run" / "model.pt"), str(tmp_path / "cut.extxyz")]) == 2
    error = capsys.readouterr().err
    assert "cut.extxyz, frame 0: cannot read the frame" in error and "Frame has 17 atoms, expected 31" in error

    assert main(["md", str(tmp_path / "missing.pt"), str(tmp_path / "water.extxyz")]) == 2
    assert "no model file" in capsys.readouterr().err

    model, silver = str(trained / "run" / "model.pt"), str(trained / "silver.extxyz")
    assert main(["md", model, silver, "--index", "0:2"]) == 2
    assert "silver.extxyz: --index 0:2 selects 2 frames; MD starts from one" in capsys.readouterr().err
    assert main(["md", model, silver, "--cuda-graphs"]) == 2
    assert "cuda_graphs needs a CUDA device, the model is on cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["md", model, silver, "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device here" in capsys.readouterr().err
    monkeypatch.setattr("allegro_fast.kernels._common.interpreter_enabled", lambda: False)
    for command in (["md", model, silver], ["evaluate", model, silver]):
        assert main([*command, "--backend", "triton"]) == 2
        assert "triton backend runs on CUDA devices (add --device cuda)" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.05", "--frames", "12", "--md-steps", "6", "--threads", "1",
                 "--workdir", str(workdir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "allegro-fast demo finished" in printed and "ns/day" in printed and "force MAE" in printed
    for name in ("run.yaml", "train/model.pt", "train/metrics.jsonl", "train/learning_curve.png", "train/parity.png",
                 "md.traj", "summary.json", "data/ag_vacancy_emt_train.extxyz", "data/ag_vacancy_emt_test.extxyz"):
        assert (workdir / name).is_file(), name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["md"]["steps"] == 6 and summary["test"]["forces_mae_meV_per_A"] > 0
    # the written run.yaml is a valid configuration that `allegro-fast train` accepts
    from allegro_fast.run_config import load_run_config

    assert load_run_config(workdir / "run.yaml").training.max_time_minutes == 0.05


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("allegro-fast") is None, reason="the allegro-fast script is not installed")
def test_installed_script_shows_help():
    result = subprocess.run(["allegro-fast", "--help"], capture_output=True, text=True, timeout=120, check=True)
    for command in ("train", "evaluate", "md", "demo"):
        assert command in result.stdout
