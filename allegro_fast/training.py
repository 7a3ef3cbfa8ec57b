"""Training: `train(config, workdir)` fits an Allegro model to labelled frames (Musaelian et al. 2023, Methods).

Loss of a batch of S structures with N atoms (eV units; weights from the run config):

    L = w_E * (1/S) sum_s ((E_s - E_s^ref) / N_s)^2  +  w_F * (1/(3N)) sum_{i,a} (F_ia - F_ia^ref)^2
        + w_sigma * (1/(9 S_sigma)) sum over the stress components of the S_sigma structures with stress labels

Adam or AMSGrad; ReduceLROnPlateau on the validation loss; an exponential moving average (EMA) of the
weights, used for validation and written as the model; stopping at max epochs, max time, early-stopping
patience or a learning rate below min_lr; gradient clipping by global norm. avg_num_neighbors and the
per-species energy shift and scale are fitted on the training frames before the first step.

A work folder holds everything a run writes:

    config.yaml        the run configuration as used
    checkpoint.pt      the state after the last finished epoch (model, EMA, optimiser, scheduler, RNG, timers);
                       written atomically, so an interrupted run resumes losing at most the current epoch
    model.pt           the EMA weights of the best validation epoch (allegro_fast.load reads it)
    metrics.jsonl      one JSON object per epoch: learning rate, losses, train and validation errors
    test_metrics.json  errors of model.pt on the test frames
    learning_curve.png, parity.png

Several processes (torchrun, or any initialised torch.distributed group) split each global batch of
`batch_size` structures between them and sum their gradients, which gives the gradient of one process
with the same global batch: every process normalises its partial loss by the counts of the whole global
batch (all processes hold the full dataset and the same batch order, so they know these counts).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic_files import atomic_write
from .data import LabelledDataset, read_frames, species_of, split_frames
from .evaluation import ErrorSums, format_metrics, metrics_from_predictions, predict
from .model import Allegro
from .run_config import ConfigError, RunConfig, load_run_config
from .serialization import save
from .statistics import fit_statistics

__all__ = ["ExponentialMovingAverage", "TrainResult", "Trainer", "TrainingDiverged", "loss_sums", "train"]

CHECKPOINT_FORMAT = "allegro-fast-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch and the checkpoint kept."""


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run produced. Paths are inside workdir; wall_seconds is the training time
    summed over resumes; stop_reason is one of max_epochs, max_time, early_stopping, min_lr."""

    workdir: Path
    model_path: Path
    metrics_path: Path
    checkpoint_path: Path
    epochs: int
    best_epoch: int
    best_validation_loss: float
    wall_seconds: float
    stop_reason: str
    validation_metrics: dict
    test_metrics: dict | None
    plot_paths: list[Path]


# ----------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------
def loss_sums(out: dict, batch, need_stress: bool) -> dict[str, torch.Tensor]:
    """Unnormalised squared-error sums of a batch: energy per atom, force components, stress components."""
    # Energy labels stay float64 (batch.energy): a float32 label of a large total energy (e.g. -17,000 eV for
    # aspirin) would be rounded by up to 1 meV before the difference is taken.
    energy_error = out["energy"].to(batch.energy.dtype) - batch.energy
    sums = {
        "energy": (energy_error / batch.graph.num_atoms.to(energy_error.dtype)).pow(2).sum(),
        "forces": (out["forces"] - batch.forces).pow(2).sum(),
    }
    if need_stress and "stress" in out:
        mask = batch.has_stress
        sums["stress"] = (out["stress"][mask] - batch.stress[mask]).pow(2).sum()
    return sums


class ExponentialMovingAverage:
    """A copy of the model whose parameters follow theta_ema <- d theta_ema + (1 - d) theta after each step,
    with d = min(decay, (1 + n) / (10 + n)) after n updates (short warm-up, so early averages are not
    dominated by the random initial weights). decay 0 keeps an exact copy of the current weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for averaged, current in zip(self.model.parameters(), model.parameters()):
            averaged.lerp_(current.detach(), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


def _atomic_torch_save(payload: Any, path: Path) -> None:
    atomic_write(path, lambda stream: torch.save(payload, stream))


def _atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda stream: stream.write(text), binary=False)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device is '{name}' but CUDA is not available")
    return device


class _Distributed:
    """Rank and world size, and the collective calls the trainer needs (no-ops for one process)."""

    def __init__(self, device: torch.device) -> None:
        self.owns_group = False
        dist = torch.distributed
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        if self.active:
            for parameter in model.parameters():
                torch.distributed.broadcast(parameter.data, src=0)

    def any(self, flag: bool) -> bool:
        """True on every process if flag is True on any (keeps decisions such as stopping in step)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self.all_sum(value).item() > 0)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------
class Trainer:
    """Holds data, model, optimiser and state of one run; `run()` trains to a stopping condition."""

    def __init__(self, config: RunConfig, workdir: Path, *, resume: bool = True, progress: bool = True,
                 on_event: Callable[[str, dict], None] | None = None) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.progress = progress
        self.on_event = on_event
        settings = config.training
        if settings.num_threads is not None:
            torch.set_num_threads(settings.num_threads)
        self.device = _pick_device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        self.dist = _Distributed(self.device)
        self.show = progress and self.dist.is_main
        self.checkpoint_path = self.workdir / "checkpoint.pt"
        self.model_path = self.workdir / "model.pt"
        self.metrics_path = self.workdir / "metrics.jsonl"

        self._load_data()
        self._build_model()
        # fused on CUDA: one kernel per step instead of a dozen multi-tensor launches
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate,
                                          weight_decay=settings.weight_decay,
                                          amsgrad=settings.optimizer == "amsgrad",
                                          fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience)
        self.ema = ExponentialMovingAverage(self.model, settings.ema_decay)
        # Every gradient accumulates in place into a buffer allocated here, once (zero_grad keeps it). Otherwise the
        # first backward hands autograd's own output over as .grad, and with training.cuda_graphs that is memory of
        # the graphs' pool, overwritten by the next step's replay ("accessing tensor output of CUDAGraphs that has
        # been overwritten by a subsequent run", H200, 2026-12-04).
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        self.compiled_step = None
        if settings.compile:
            from .export import CUDA_GRAPHS, TrainingForceField

            if settings.cuda_graphs and self.device.type != "cuda":
                raise ConfigError(f"training.cuda_graphs needs a CUDA device; this run's device is {self.device}")
            options = dict(CUDA_GRAPHS if settings.cuda_graphs else {})
            if settings.activation_memory_budget is not None:  # only when set: a subclass may not take it
                options["activation_memory_budget"] = settings.activation_memory_budget
            self.compiled_step = TrainingForceField(self.model, **options)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed + 1)
        self.epoch = 0
        self.best_epoch = 0
        self.best_validation_loss = math.inf
        self.best_validation_metrics: dict = {}
        self.elapsed_before = 0.0  # training seconds of earlier invocations
        self.stop_reason: str | None = None
        if resume and self.checkpoint_path.is_file():
            self._resume()
        elif self.dist.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            # Starting over: remove what an earlier run left, so that nothing stale is resumed or reported.
            for name in ("checkpoint.pt", "model.pt", "metrics.jsonl", "test_metrics.json", "learning_curve.png",
                         "parity.png"):
                (self.workdir / name).unlink(missing_ok=True)
            _atomic_write_text(config.to_yaml(), self.workdir / "config.yaml")
        self.dist.barrier()

    # -- setup ---------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.show:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def _load_data(self) -> None:
        data = self.config.data
        options = {"format": data.format, "energy_unit": data.energy_unit, "length_unit": data.length_unit,
                   "energy_key": data.energy_key, "forces_key": data.forces_key, "stress_key": data.stress_key}
        frames = read_frames(data.train_file, **options)
        split = split_frames(frames, data.n_train, data.n_val,
                             n_test=(0 if data.test_file else data.n_test), seed=self.config.split_seed,
                             source=data.train_file)
        self.train_frames, self.validation_frames = split.train, split.validation
        if data.test_file:
            test = read_frames(data.test_file, **options)
            self.test_frames = test if data.n_test is None else test[:_count(data.n_test, len(test))]
        else:
            self.test_frames = split.test
        self.test_source = data.test_file or data.train_file
        units = "" if (data.energy_unit, data.length_unit) in (("eV", "Å"), ("eV", "Angstrom")) else \
            f" (converted from {data.energy_unit} and {data.length_unit} to eV and Å)"
        self._log(f"data: {len(self.train_frames)} train, {len(self.validation_frames)} validation, "
                  f"{len(self.test_frames)} test frames{units}")

    def _build_model(self) -> None:
        config = self.config
        type_names = species_of(self.train_frames)
        model_config = config.model_config(type_names)
        for name, frames in (("validation", self.validation_frames), ("test", self.test_frames)):
            extra = sorted(set(species_of(frames)) - set(model_config.type_names))
            if extra:
                raise ValueError(f"the {name} frames contain species {extra} that no training frame has; "
                                 f"add model.type_names or training frames with them")
        self.statistics = fit_statistics(self.train_frames, model_config)
        model_config = self.statistics.apply(model_config)
        self._log(f"statistics of the training set: avg_num_neighbors {model_config.avg_num_neighbors:.3f}, "
                  f"energy shift per species {_species_values(model_config)} eV, "
                  f"scale {model_config.per_species_energy_scale[0]:.4f} eV/Å")
        torch.manual_seed(config.seed)
        if config.backend == "reference":
            from .reference import ReferenceAllegro
            model = ReferenceAllegro(model_config)
        else:
            model = Allegro(model_config, backend=config.backend)
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.dist.broadcast_parameters(self.model)
        self.model_config = model_config
        num_parameters = sum(p.numel() for p in self.model.parameters())
        self._log(f"model: {num_parameters} parameters, backend {config.backend}, {self.config.training.dtype}, "
                  f"device {self.device}, {torch.get_num_threads()} threads, {self.dist.world_size} process(es)")
        if config.backend == "triton" and self.device.type == "cuda":
            self._precompile_kernels()
        r_max, dtype = model_config.r_max, self.dtype
        self.train_set = LabelledDataset(self.train_frames, r_max, dtype, self.device, source="training frames")
        self.validation_set = LabelledDataset(self.validation_frames, r_max, dtype, self.device,
                                              source="validation frames")
        if config.training.stress_weight > 0 and not self.train_set.has_any_stress:
            raise ValueError("training.stress_weight > 0 but no training frame has a stress label")

    def _precompile_kernels(self) -> None:
        """Compile the Triton kernels of a training step in parallel processes before the first step (serially,
        on first use, a model with many channels waits minutes); the other ranks wait and read Triton's cache."""
        if self.dist.is_main:
            from .kernels.precompile import precompile

            report = precompile(self.model, training=True)
            self._log(f"compiled {len(report['kernels'])} Triton kernels in {report['seconds']:.0f} s "
                      f"({report['processes']} processes at a time)")
            for name, error in report["errors"].items():
                self._log(f"warning: kernel '{name}' did not precompile ({error}); the first step will say why")
        self.dist.barrier()

    # -- checkpoints ---------------------------------------------------------------
    def _checkpoint_payload(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(), "model_config": self.model_config.to_dict(),
            "epoch": self.epoch, "best_epoch": self.best_epoch, "best_validation_loss": self.best_validation_loss,
            "best_validation_metrics": json.dumps(self.best_validation_metrics),
            "elapsed_seconds": self._elapsed(), "stop_reason": self.stop_reason,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "shuffle_generator": self.shuffle_generator.get_state(), "torch_rng": torch.get_rng_state(),
        }

    def _resume(self) -> None:
        try:
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        except Exception as error:
            raise RuntimeError(f"cannot read the checkpoint {self.checkpoint_path} ({error}); "
                               "delete it or train with resume=False (--restart) to start over") from error
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{self.checkpoint_path} is not an allegro-fast checkpoint")
        saved = state["config"]
        current = self.config.to_dict()
        for section in ("data", "model", "seed"):
            if saved[section] != current[section]:
                raise RuntimeError(
                    f"{self.checkpoint_path} belongs to a run with a different '{section}' section; use another "
                    f"work folder, or resume=False (--restart) to start this one over")
        changed = [key for key in current["training"] if saved["training"].get(key) != current["training"][key]]
        if changed:
            self._log(f"resuming with changed training settings: {', '.join(changed)}")
        if state["model_config"] != self.model_config.to_dict():
            raise RuntimeError(f"{self.checkpoint_path}: the fitted statistics differ from this data's")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A changed lr_patience / lr_factor in the config applies from now on.
        self.scheduler.patience = self.config.training.lr_patience
        self.scheduler.factor = self.config.training.lr_factor
        self.shuffle_generator.set_state(state["shuffle_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.best_epoch = int(state["epoch"]), int(state["best_epoch"])
        self.best_validation_loss = float(state["best_validation_loss"])
        self.best_validation_metrics = json.loads(state["best_validation_metrics"])
        self.elapsed_before = float(state["elapsed_seconds"])
        self.stop_reason = state["stop_reason"]
        if self.dist.is_main and self.metrics_path.is_file():
            # Drop lines of an epoch that finished after this checkpoint was written.
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] <= self.epoch]
            _atomic_write_text("".join(line + "\n" for line in kept), self.metrics_path)
        self._log(f"resumed from {self.checkpoint_path} after epoch {self.epoch} "
                  f"({self.elapsed_before:.0f} s of training so far)")

    def _write_checkpoint(self) -> None:
        if self.dist.is_main:
            _atomic_torch_save(self._checkpoint_payload(), self.checkpoint_path)
        self.dist.barrier()

    # -- the loop ------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._started)

    def _event(self, name: str, **values) -> None:
        if self.on_event is not None:
            self.on_event(name, {"trainer": self, "epoch": self.epoch, **values})

    def _stop_reason(self) -> str | None:
        settings = self.config.training
        if self.epoch >= settings.max_epochs:
            return "max_epochs"
        if settings.max_time_minutes is not None and self._elapsed() >= 60 * settings.max_time_minutes:
            return "max_time"
        if settings.early_stopping_patience is not None and self.epoch - self.best_epoch >= settings.early_stopping_patience:
            return "early_stopping"
        if self.optimizer.param_groups[0]["lr"] < settings.min_lr:
            return "min_lr"
        return None

    def _train_epoch(self) -> dict:
        settings = self.config.training
        rank, world = self.dist.rank, self.dist.world_size
        order = torch.randperm(len(self.train_set), generator=self.shuffle_generator).tolist()
        global_batches = [order[k:k + settings.batch_size] for k in range(0, len(order), settings.batch_size)]
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        need_stress = settings.stress_weight > 0
        sums = ErrorSums()
        loss_total, loss_count = 0.0, 0
        bar = None
        if self.show and settings.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(global_batches), desc=f"epoch {self.epoch + 1}", leave=False, dynamic_ncols=True)
        self.model.train()
        time_limited = settings.max_time_minutes is not None
        for batch_index, global_batch in enumerate(global_batches):
            # Each process takes every world-th structure of the global batch; counts are global.
            local = global_batch[rank::world]
            num_structures = len(global_batch)
            num_atoms = int(self.train_set.num_atoms[global_batch].sum())
            num_stress = sum(self.train_set.stresses[i] is not None for i in global_batch) if need_stress else 0
            self.optimizer.zero_grad(set_to_none=False)
            if local:
                batch = self.train_set.batch(local)
                if self.compiled_step is not None:
                    out = self.compiled_step(batch.graph)
                else:
                    out = self.model(batch.graph, compute_stress=need_stress and bool(batch.graph.pbc.any()))
                parts = loss_sums(out, batch, need_stress)
                loss = settings.energy_weight * parts["energy"] / num_structures \
                    + settings.force_weight * parts["forces"] / (3 * num_atoms)
                if "stress" in parts and num_stress > 0:
                    loss = loss + settings.stress_weight * parts["stress"] / (9 * num_stress)
                loss.backward()
                sums.add(out["energy"].detach().double() - batch.energy, batch.graph.num_atoms,
                         out["forces"].detach() - batch.forces, batch.graph.atomic_numbers)
                local_loss = loss.detach()
            else:
                local_loss = torch.zeros((), dtype=self.dtype, device=self.device)
            # torch's DistributedDataParallel only supports gradients accumulated by .backward() and "doesn't
            # work with torch.autograd.grad" (its documentation); the forces come from autograd.grad with
            # create_graph=True inside the forward, and processes may hold different numbers of structures.
            # So the gradients (and the loss, for the NaN check) are summed explicitly, in one buffer.
            flat = torch.cat([torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
                              for p in parameters] + [local_loss.reshape(1)])
            flat = self.dist.all_sum(flat)
            loss_value = float(flat[-1])
            if not math.isfinite(loss_value):
                if bar is not None:
                    bar.close()
                kept = (f"the last good checkpoint {self.checkpoint_path} (after epoch {self.epoch}) is kept"
                        if self.checkpoint_path.is_file() else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"the loss is {loss_value} at epoch {self.epoch + 1}, batch {batch_index + 1}; training stopped. "
                    f"{kept}. Try a smaller learning_rate, a grad_clip_norm, or check the data for outliers.")
            if self.dist.active:
                offset = 0
                for p in parameters:
                    p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
            if settings.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip_norm)
            self.optimizer.step()
            self.ema.update(self.model)
            loss_total += loss_value
            loss_count += 1
            if bar is not None:
                bar.update(1)
                if batch_index % 5 == 0 or batch_index == len(global_batches) - 1:
                    local_metrics = sums.metrics()
                    bar.set_postfix(loss=f"{loss_total / loss_count:.4g}",
                                    F_mae=f"{local_metrics.get('forces_mae_meV_per_A', float('nan')):.1f} meV/Å")
            self._event("batch_end", batch=batch_index, loss=loss_value)
            if time_limited and self.dist.any(self._elapsed() >= 60 * settings.max_time_minutes):
                break  # out of time: validate what we have and stop
        if bar is not None:
            bar.close()
        sums.values = self.dist.all_sum(sums.values)
        metrics = sums.metrics()
        metrics.pop("per_species", None)
        return {"loss": loss_total / max(loss_count, 1), **metrics}

    def _validate(self) -> tuple[float, dict]:
        """Loss and errors of the EMA model on the validation frames (shared between processes)."""
        settings = self.config.training
        if len(self.validation_set) == 0:
            return math.nan, {}
        indices = list(range(self.dist.rank, len(self.validation_set), self.dist.world_size))
        type_numbers = list(self.model_config.atomic_numbers)
        sums = ErrorSums(type_numbers)
        need_stress = settings.stress_weight > 0 or self.validation_set.has_any_stress
        model = self.ema.model.eval()
        batch_size = settings.validation_batch_size or settings.batch_size
        for start in range(0, len(indices), batch_size):
            batch = self.validation_set.batch(indices[start:start + batch_size])
            out = model(batch.graph, compute_stress=need_stress and bool(batch.graph.pbc.any()), create_graph=False)
            stress_error = None
            if "stress" in out:
                stress_error = (out["stress"].detach() - batch.stress)[batch.has_stress]
            sums.add(out["energy"].detach().double() - batch.energy, batch.graph.num_atoms,
                     out["forces"].detach() - batch.forces, batch.graph.atomic_numbers, stress_error)
        sums.values = self.dist.all_sum(sums.values)
        metrics = sums.metrics()
        # The same weighted loss as in training, over the whole validation set (from the squared sums).
        values = sums.values.view(-1, 3)
        loss = settings.energy_weight * float(values[1, 2] / values[1, 0]) \
            + settings.force_weight * float(values[2, 2] / values[2, 0])
        if settings.stress_weight > 0 and values[3, 0] > 0:
            loss += settings.stress_weight * float(values[3, 2] / values[3, 0])
        return loss, metrics

    def run(self) -> TrainResult:
        self._started = time.perf_counter()
        if self.stop_reason is not None:
            self.stop_reason = self._stop_reason()  # the config may allow more now (e.g. a larger max_epochs)
        if self.stop_reason is None:
            self.stop_reason = self._stop_reason()
        while self.stop_reason is None:
            epoch_start = time.perf_counter()
            train_metrics = self._train_epoch()
            self.epoch += 1
            validation_loss, validation_metrics = self._validate()
            monitored = validation_loss if math.isfinite(validation_loss) else train_metrics["loss"]
            self.scheduler.step(monitored)
            improved = monitored < self.best_validation_loss
            if improved:
                self.best_validation_loss, self.best_epoch = monitored, self.epoch
                self.best_validation_metrics = validation_metrics
                if self.dist.is_main:
                    save(self.ema.model, self.model_path, metadata=self._model_metadata())
            self.stop_reason = self._stop_reason()
            record = {
                "epoch": self.epoch, "wall_seconds": round(self._elapsed(), 3),
                "epoch_seconds": round(time.perf_counter() - epoch_start, 3),
                "learning_rate": self.optimizer.param_groups[0]["lr"],
                **{f"train_{key}": value for key, value in train_metrics.items()},
                "validation_loss": validation_loss,
                **_flatten({f"validation_{key}": value for key, value in validation_metrics.items()}),
                "best": improved,
            }
            if self.dist.is_main:
                with open(self.metrics_path, "a") as stream:
                    stream.write(json.dumps(record) + "\n")
            self._log(_epoch_line(record))
            self._write_checkpoint()
            self._event("epoch_end", record=record)
        self.training_seconds = self._elapsed()
        self._log(f"stopped: {self.stop_reason} after {self.epoch} epochs, {self._elapsed():.0f} s of training; "
                  f"best validation loss {self.best_validation_loss:.5g} at epoch {self.best_epoch}")
        return self._finish()

    def _model_metadata(self) -> dict:
        return {"epoch": self.epoch, "validation_loss": self.best_validation_loss,
                "train_file": self.config.data.train_file, "ema_decay": self.config.training.ema_decay}

    def _finish(self) -> TrainResult:
        test_metrics, plot_paths = None, []
        if self.dist.is_main:
            if not self.model_path.is_file():  # e.g. max_epochs 0: write what we have
                save(self.ema.model, self.model_path, metadata=self._model_metadata())
            from .serialization import load
            best = load(self.model_path, map_location=self.device)
            parity_frames, parity_name = (self.test_frames, "test") if self.test_frames else \
                (self.validation_frames, "validation")
            predictions = None
            if parity_frames:
                predictions = predict(best, parity_frames, batch_size=self.config.training.validation_batch_size
                                      or self.config.training.batch_size, progress=self.show,
                                      source=f"{parity_name} frames")
            if self.test_frames:
                test_metrics = metrics_from_predictions(predictions)
                _atomic_write_text(json.dumps(test_metrics, indent=2) + "\n", self.workdir / "test_metrics.json")
                self._log(format_metrics(test_metrics, f"test errors of {self.model_path} "
                                                       f"({len(self.test_frames)} frames from {self.test_source}):"))
            if self.config.training.plots:
                from . import plots
                plot_paths.append(plots.learning_curve(self.metrics_path, self.workdir / "learning_curve.png"))
                if predictions is not None:
                    plot_paths.append(plots.parity(predictions, self.workdir / "parity.png",
                                                   title=f"{parity_name} set, EMA model of epoch {self.best_epoch}"))
        self.dist.barrier()
        return TrainResult(
            workdir=self.workdir, model_path=self.model_path, metrics_path=self.metrics_path,
            checkpoint_path=self.checkpoint_path, epochs=self.epoch, best_epoch=self.best_epoch,
            best_validation_loss=self.best_validation_loss, wall_seconds=self.training_seconds,
            stop_reason=self.stop_reason, validation_metrics=self.best_validation_metrics,
            test_metrics=test_metrics, plot_paths=plot_paths,
        )


def _species_values(model_config) -> str:
    return ", ".join(f"{symbol} {shift:.4f}" for symbol, shift in
                     zip(model_config.type_names, model_config.per_species_energy_shift))


def _count(value, total: int) -> int:
    return round(value * total) if isinstance(value, float) else int(value)


def _flatten(values: dict) -> dict:
    """validation_per_species: {C: {forces_mae_meV_per_A: x}} -> validation_forces_mae_meV_per_A_C: x."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key.endswith("per_species"):
            prefix = key[: -len("per_species")]
            for symbol, inner in value.items():
                for name, number in inner.items():
                    if name != "num_atoms":
                        flat[f"{prefix}{name}_{symbol}"] = number
        else:
            flat[key] = value
    return flat


def _epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:4d}", f"lr {record['learning_rate']:.1e}",
             f"train loss {record['train_loss']:.4g}"]
    if math.isfinite(record.get("validation_loss", math.nan)):
        parts.append(f"val loss {record['validation_loss']:.4g}")
        if "validation_energy_per_atom_mae_meV_per_atom" in record:
            parts.append(f"E {record['validation_energy_per_atom_mae_meV_per_atom']:.2f} meV/atom")
        if "validation_forces_mae_meV_per_A" in record:
            parts.append(f"F {record['validation_forces_mae_meV_per_A']:.1f} meV/Å")
    parts.append(f"{record['wall_seconds']:.0f} s")
    return "  ".join(parts) + ("  *" if record["best"] else "")


def train(config: RunConfig | dict | str | os.PathLike, workdir: str | os.PathLike, *, resume: bool = True,
          progress: bool = True, on_event: Callable[[str, dict], None] | None = None) -> TrainResult:
    """Train a model as described by config (a RunConfig, a dict, or a YAML path) in workdir.

    resume: continue from workdir/checkpoint.pt when it exists (False starts over). progress: progress bars
    and one line per epoch (on the main process). on_event(name, info) is called after every batch
    ("batch_end") and epoch ("epoch_end"); an exception raised there stops training like an interruption.
    Under torchrun (or with torch.distributed initialised) each process must call train with the same config.
    """
    config = load_run_config(config)
    trainer = Trainer(config, Path(workdir), resume=resume, progress=progress, on_event=on_event)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

