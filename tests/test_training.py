"""The trainer: loss, files written, resume after an interruption, NaN stop, stopping conditions, EMA."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import ase.io
import numpy as np
import pytest
import torch

import allegro_fast as af
from allegro_fast.demo import generate_silver_frames
from allegro_fast.evaluation import evaluate
from allegro_fast.run_config import ConfigError, load_run_config
from allegro_fast.training import (
    ExponentialMovingAverage,
    Trainer,
    TrainingDiverged,
    read_metrics,
    train,
)


@pytest.fixture(scope="module")
def silver_file(tmp_path_factory):
    """14 EMT-labelled frames of Ag31 with a vacancy (energy, forces, stress)."""
    frames = generate_silver_frames(14, seed=0, equilibration_steps=5, steps_between=2)
    path = tmp_path_factory.mktemp("data") / "silver.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def tiny_config(path, **training) -> dict:
    return {
        "seed": 1,
        "data": {"train_file": str(path), "n_train": 7, "n_val": 4, "n_test": 3},
        "model": {"r_max": 3.5, "l_max": 1, "num_layers": 1, "num_scalar_features": 8, "num_tensor_features": 3,
                  "num_bessels": 4, "two_body_mlp_hidden": [8], "latent_mlp_hidden": [8], "readout_mlp_hidden": [5]},
        "training": {"batch_size": 3, "max_epochs": 3, "dtype": "float64", "learning_rate": 0.01, "ema_decay": 0.9,
                     "progress_bar": False, "plots": False, "num_threads": 1, **training},
    }


def test_train_writes_model_metrics_and_plots(silver_file, tmp_path):
    result = train(tiny_config(silver_file, plots=True, stress_weight=1.0), tmp_path / "run", progress=False)
    assert result.epochs == 3 and result.stop_reason == "max_epochs"
    for name in ("model.pt", "checkpoint.pt", "metrics.jsonl", "config.yaml", "test_metrics.json",
                 "learning_curve.png", "parity.png"):
        assert (tmp_path / "run" / name).is_file(), name
    records = read_metrics(result.metrics_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert math.isclose(min(r["validation_loss"] for r in records), result.best_validation_loss)
    assert records[result.best_epoch - 1]["best"]
    model = af.load(result.model_path)
    assert model.config.type_names == ("Ag",) and model.config.avg_num_neighbors > 1
    assert model.dtype == torch.float64
    # model.pt holds the EMA weights of the best epoch: evaluating them again gives the test metrics
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    frames = ase.io.read(silver_file, index=":")
    again = evaluate(model, [frames[i] for i in np.random.default_rng(1).permutation(14)[11:]])
    assert math.isclose(again["forces_mae_meV_per_A"], test["forces_mae_meV_per_A"], rel_tol=1e-9)
    assert "stress_mae_meV_per_A3" in test and test["per_species"]["Ag"]["num_atoms"] == 3 * 31


def test_validation_loss_is_the_training_loss_formula(silver_file, tmp_path):
    """Validation loss = per-atom energy MSE + force-component MSE of the EMA model (weights 1)."""
    result = train(tiny_config(silver_file, max_epochs=1, force_weight=2.0), tmp_path / "run", progress=False)
    metrics = result.validation_metrics
    expected = (metrics["energy_per_atom_rmse_meV_per_atom"] / 1000) ** 2 + 2.0 * (metrics["forces_rmse_meV_per_A"] / 1000) ** 2
    assert math.isclose(result.best_validation_loss, expected, rel_tol=1e-9)


def test_resume_after_interruption_continues_exactly(silver_file, tmp_path):
    config = tiny_config(silver_file, max_epochs=4)
    straight = train(config, tmp_path / "straight", progress=False)

    def interrupt(event, info):
        if event == "batch_end" and info["epoch"] == 2 and info["batch"] == 1:  # in the middle of epoch 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=False, on_event=interrupt)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2  # only the current epoch was lost
    assert [r["epoch"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2]

    resumed = train(config, tmp_path / "resumed", progress=False)
    assert resumed.epochs == 4 and resumed.best_epoch == straight.best_epoch
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:  # model, EMA, optimizer moments, scheduler, RNG: all continue as if never stopped
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for k, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["shuffle_generator"], b["shuffle_generator"])
    assert [r["learning_rate"] for r in read_metrics(straight.metrics_path)] == \
        [r["learning_rate"] for r in read_metrics(resumed.metrics_path)]

    # Resuming a finished run does nothing more; a larger max_epochs continues it.
    assert train(config, tmp_path / "resumed", progress=False).epochs == 4
    config["training"]["max_epochs"] = 5
    assert train(config, tmp_path / "resumed", progress=False).epochs == 5
    # A different data or model section refuses to resume in the same folder.
    config["model"]["num_scalar_features"] = 9
    with pytest.raises(RuntimeError, match="different 'model' section"):
        train(config, tmp_path / "resumed", progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(silver_file, tmp_path):
    def poison(event, info):
        if event == "batch_end" and info["epoch"] == 1 and info["batch"] == 0:
            with torch.no_grad():
                next(info["trainer"].model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch 2, batch 2.*checkpoint.pt \(after epoch 1\) is kept"):
        train(tiny_config(silver_file), tmp_path / "run", progress=False, on_event=poison)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert all(torch.isfinite(p).all() for p in af.load(tmp_path / "run" / "model.pt").parameters())


def test_stopping_conditions(silver_file, tmp_path):
    # min_lr: with a tiny learning rate the validation loss stays put (within ReduceLROnPlateau's relative
    # threshold 1e-4), so with patience 0 the rate drops by 10 after the second epoch, below min_lr.
    result = train(tiny_config(silver_file, max_epochs=20, learning_rate=1e-6, lr_patience=0, lr_factor=0.1,
                               min_lr=5e-7), tmp_path / "lr", progress=False)
    assert result.stop_reason == "min_lr" and result.epochs == 2
    assert [r["learning_rate"] for r in read_metrics(result.metrics_path)] == pytest.approx([1e-6, 1e-7])

    def no_improvement_after_epoch_1(event, info):
        if event == "epoch_end" and info["epoch"] == 1:
            info["trainer"].best_validation_loss = 0.0  # nothing can beat this

    result = train(tiny_config(silver_file, max_epochs=50, early_stopping_patience=2), tmp_path / "patience",
                   progress=False, on_event=no_improvement_after_epoch_1)
    assert result.stop_reason == "early_stopping" and (result.epochs, result.best_epoch) == (3, 1)
    result = train(tiny_config(silver_file, max_epochs=1000, max_time_minutes=0.02), tmp_path / "time", progress=False)
    assert result.stop_reason == "max_time" and result.epochs < 1000


def test_ema_average_and_gradient_clipping(silver_file, tmp_path):
    model = torch.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(model, decay=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11) = 2/11
    for averaged, initial in zip(ema.model.parameters(), start):
        assert torch.allclose(averaged, initial + 9 / 11)

    # With a tiny clip norm every step moves the weights by at most lr * (Adam's normalised step); we just check
    # that clipping runs and training stays finite.
    result = train(tiny_config(silver_file, max_epochs=1, grad_clip_norm=1e-3), tmp_path / "clip", progress=False)
    assert math.isfinite(result.best_validation_loss)


def test_compiled_training_follows_the_eager_trajectory(silver_file, tmp_path, monkeypatch):
    """training.compile: true computes the same losses and weights as eager training (float64). The program is
    compiled with aot_eager here, which runs the same traced graph and backward as inductor without code
    generation (inductor itself: bench/compiled_training.py, gradients equal to eager's within 5e-7 in float32)."""
    from allegro_fast import export

    budgets = []

    class AotEagerTraining(export.TrainingForceField):
        def __init__(self, model, **options):
            super().__init__(model, backend="aot_eager", **options)
            budgets.append(self.activation_memory_budget)

    monkeypatch.setattr(export, "TrainingForceField", AotEagerTraining)
    eager = train(tiny_config(silver_file, max_epochs=2, stress_weight=1.0), tmp_path / "eager", progress=False)
    # the budget reaches the compiled step (aot_eager's partitioner keeps everything all the same)
    compiled = train(tiny_config(silver_file, max_epochs=2, stress_weight=1.0, compile=True,
                                 activation_memory_budget=0.5), tmp_path / "compiled", progress=False)
    assert budgets == [0.5]
    eager_records, compiled_records = read_metrics(eager.metrics_path), read_metrics(compiled.metrics_path)
    for a, b in zip(eager_records, compiled_records):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-9), (a, b)
        assert math.isclose(a["validation_loss"], b["validation_loss"], rel_tol=1e-9), (a, b)
    eager_weights, compiled_weights = af.load(eager.model_path).state_dict(), af.load(compiled.model_path).state_dict()
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-9, atol=1e-12)


def test_static_padded_training_follows_the_eager_trajectory(silver_file, tmp_path, monkeypatch):
    """What training.cuda_graphs runs, without the graphs (the CPU has none): the compiled step traced for static
    shapes on padded edges and atoms (aot_eager), with optimizer steps between calls and a last, smaller batch per
    epoch. Its losses and weights are eager training's (float64)."""
    from allegro_fast import export

    programs = []

    class StaticPaddedTraining(export.TrainingForceField):
        def __init__(self, model, **options):
            super().__init__(model, backend="aot_eager", dynamic=False, edge_headroom=0.2)
            programs.append(self._programs)

    monkeypatch.setattr(export, "TrainingForceField", StaticPaddedTraining)
    eager = train(tiny_config(silver_file, max_epochs=2), tmp_path / "eager", progress=False)
    static = train(tiny_config(silver_file, max_epochs=2, compile=True), tmp_path / "static", progress=False)
    for a, b in zip(read_metrics(eager.metrics_path), read_metrics(static.metrics_path)):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-9), (a, b)
        assert math.isclose(a["validation_loss"], b["validation_loss"], rel_tol=1e-9), (a, b)
    eager_weights, static_weights = af.load(eager.model_path).state_dict(), af.load(static.model_path).state_dict()
    for key, value in eager_weights.items():
        torch.testing.assert_close(static_weights[key], value, rtol=1e-9, atol=1e-12)
    assert len(programs) == 1 and len(programs[0]) == 2  # batches of 3 structures and the last one of 1


def test_cuda_graphs_need_compile_and_a_cuda_device(silver_file, tmp_path):
    """training.cuda_graphs: a clear error where it cannot apply (no compile; a CPU run)."""
    with pytest.raises(ConfigError, match="cuda_graphs replays the compiled step: it needs compile: true"):
        train(tiny_config(silver_file, cuda_graphs=True), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device, got device: cpu"):
        train(tiny_config(silver_file, cuda_graphs=True, compile=True, device="cpu"), tmp_path / "b", progress=False)
    if not torch.cuda.is_available():  # device "auto" resolves to the CPU here
        with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device; this run's device is cpu"):
            train(tiny_config(silver_file, cuda_graphs=True, compile=True), tmp_path / "c", progress=False)


def test_activation_memory_budget_needs_compile_and_a_fraction(silver_file, tmp_path):
    """training.activation_memory_budget: a clear error without compile and outside [0, 1]."""
    with pytest.raises(ConfigError, match="activation_memory_budget applies to the compiled step"):
        train(tiny_config(silver_file, activation_memory_budget=0.5), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match=r"activation_memory_budget must lie in \[0, 1\], got 1.5"):
        train(tiny_config(silver_file, activation_memory_budget=1.5, compile=True), tmp_path / "b", progress=False)


def test_compiled_training_passes_the_memory_budget_only_when_set(silver_file, tmp_path, monkeypatch):
    """A TrainingForceField subclass whose __init__ takes the model alone (as a user's may, written before
    activation_memory_budget existed) still serves training.compile when no budget is set."""
    from allegro_fast import export

    class Built(Exception):
        pass

    class ModelOnly(export.TrainingForceField):
        def __init__(self, model):  # a TypeError here if the trainer passed a keyword
            raise Built

    monkeypatch.setattr(export, "TrainingForceField", ModelOnly)
    with pytest.raises(Built):
        train(tiny_config(silver_file, compile=True), tmp_path / "a", progress=False)


def test_gradients_accumulate_into_buffers_the_trainer_allocated(silver_file, tmp_path):
    """Every parameter's gradient stays the buffer the trainer allocated, step after step: a gradient handed over
    by autograd would, with training.cuda_graphs, be memory of the CUDA graphs' pool that the next step's replay
    overwrites (test_cuda_graph_training_follows_the_eager_trajectory failed so on an H200)."""
    trainer = Trainer(load_run_config(tiny_config(silver_file)), tmp_path / "run", progress=False)
    try:
        buffers = {name: p.grad.data_ptr() for name, p in trainer.model.named_parameters() if p.requires_grad}
        assert buffers
        for _ in range(2):
            trainer._train_epoch()
            trainer.epoch += 1
        assert {name: p.grad.data_ptr() for name, p in trainer.model.named_parameters() if p.requires_grad} == buffers
        assert any(bool(p.grad.abs().sum() > 0) for p in trainer.model.parameters())
    finally:
        trainer.dist.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cuda_graph_training_follows_the_eager_trajectory(silver_file, tmp_path):
    """training.cuda_graphs with the triton backend (float64): the compiled step replayed as CUDA graphs, with
    padded edges, gives the losses and weights of eager training."""
    runs = {}
    for name, options in (("eager", {}), ("graphs", {"compile": True, "cuda_graphs": True})):
        config = tiny_config(silver_file, max_epochs=2, device="cuda", **options)
        config["model"]["backend"] = "triton"
        runs[name] = train(config, tmp_path / name, progress=False)
    for a, b in zip(read_metrics(runs["eager"].metrics_path), read_metrics(runs["graphs"].metrics_path)):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-9), (a, b)
        assert math.isclose(a["validation_loss"], b["validation_loss"], rel_tol=1e-9), (a, b)
    eager, graphs = (af.load(runs[name].model_path).state_dict() for name in ("eager", "graphs"))
    for key, value in eager.items():
        torch.testing.assert_close(graphs[key], value, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_training_with_the_triton_backend_precompiles_its_kernels(silver_file, tmp_path, capsys):
    config = tiny_config(silver_file, max_epochs=1, device="cuda", progress_bar=False)
    config["model"]["backend"] = "triton"
    result = train(config, tmp_path / "run", progress=True)
    assert result.epochs == 1 and math.isfinite(result.best_validation_loss)
    assert re.search(r"compiled \d+ Triton kernels in \d+ s", capsys.readouterr().out)
