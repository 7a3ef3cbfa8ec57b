"""The run configuration: one YAML file (or dict) with the data, model and training sections.

    seed: 0                          # data split, weight initialisation and batch order
    data:    DataConfig fields       # files, format, units, split sizes
    model:   AllegroConfig fields    # plus `preset` and `backend`; type_names default to the data's species
    training: TrainingConfig fields  # loss weights, optimiser, schedule, stopping, dtype, device

Every key is checked on load: an unknown or misspelt key is an error that names it (with its section) and
suggests the closest valid key, also when the key belongs to another section. Relative file paths in a
YAML file are taken relative to the folder of that file; in a dict, relative to the working directory.
The statistics of the model (avg_num_neighbors, per-species energy shift and scale) are never given here:
the trainer fits them from the training set.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from .config import PRESETS, AllegroConfig

__all__ = [
    "ENERGY_UNITS",
    "LENGTH_UNITS",
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "TrainingConfig",
    "load_run_config",
]

# Energies are converted to eV and lengths to Å on reading (1 kcal/mol = 0.0433641 eV, from ASE's units).
ENERGY_UNITS = ("eV", "meV", "kcal/mol", "kJ/mol", "Hartree", "Ry")
LENGTH_UNITS = ("Å", "Angstrom", "Bohr", "nm")

# Model fields the trainer fits from the training data; setting them by hand is refused.
FITTED_MODEL_FIELDS = ("avg_num_neighbors", "per_species_energy_shift", "per_species_energy_scale")


class ConfigError(ValueError):
    """A run configuration that cannot be used: names the key (section.key) and, where known, the file."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the labelled structures come from and how they are split.

    train_file: frames to train on (any ASE-readable file, e.g. extxyz, or an rMD17-style .npz with keys
        nuclear_charges, coords, energies, forces). format: ASE format name or "npz"; None guesses from
        the suffix. energy_unit / length_unit: units in the file (forces are energy/length, stress
        energy/length^3); everything is converted to eV and Å.
    energy_key / forces_key / stress_key: names of the labels in ASE files (info / arrays entries, or the
        calculator's results when the key is the standard name).
    n_train, n_val: counts (int) or fractions of train_file (float in (0, 1)); frames are shuffled with
        split_seed (default: the run's seed) and the first n_train train, the next n_val validate.
    test_file: a separate test set (all its frames, or the first n_test). Without it, the test set is the
        next n_test frames of train_file after the validation frames (None: all that remain).
    """

    train_file: str = ""
    format: str | None = None
    energy_unit: str = "eV"
    length_unit: str = "Å"
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    n_train: int | float = 0.8
    n_val: int | float = 0.1
    test_file: str | None = None
    n_test: int | float | None = None
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.train_file:
            raise ConfigError("data.train_file is required: the file of labelled frames to train on")
        if self.energy_unit not in ENERGY_UNITS:
            raise ConfigError(f"data.energy_unit '{self.energy_unit}' is not one of {list(ENERGY_UNITS)}"
                              + _suggest(self.energy_unit, ENERGY_UNITS))
        if self.length_unit not in LENGTH_UNITS:
            raise ConfigError(f"data.length_unit '{self.length_unit}' is not one of {list(LENGTH_UNITS)}"
                              + _suggest(self.length_unit, LENGTH_UNITS))
        for name in ("n_train", "n_val", "n_test"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float) and not 0.0 < value < 1.0:
                raise ConfigError(f"data.{name} = {value}: a fraction must lie strictly between 0 and 1 "
                                  "(give a whole number for a count)")
            if isinstance(value, int) and value < (1 if name == "n_train" else 0):
                raise ConfigError(f"data.{name} = {value}: a count must be {'positive' if name == 'n_train' else '>= 0'}")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How to train (Musaelian et al. 2023, Methods).

    Loss = energy_weight * mean_s((E_s - E_s^ref) / N_s)^2 + force_weight * mean over force components
    (F - F^ref)^2 + stress_weight * mean over stress components (sigma - sigma^ref)^2, in eV, eV/Å and
    eV/Å^3. optimizer: "adam" or "amsgrad"; learning_rate and weight_decay as in torch.optim.Adam.
    batch_size: structures per step (the global batch, split across processes under torchrun).
    ema_decay: exponential moving average of the weights, used for validation and the saved model
        (0 disables it). lr_patience / lr_factor: ReduceLROnPlateau on the validation loss (epochs).
    Stopping: max_epochs, max_time_minutes (total training time, summed over resumes), early_stopping_patience
        (epochs without a better validation loss), min_lr (stop when the learning rate falls below it).
    grad_clip_norm: clip the gradient's global L2 norm (None: no clipping). dtype: float32 or float64.
    num_threads: torch CPU threads (None: torch's default). device: "cpu", "cuda", "cuda:1" or "auto".
    compile: run each training step's energy, forces and stress through one compiled program
        (`allegro_fast.export.TrainingForceField`: make_fx, then torch.compile with dynamic shapes), so the
        force loss needs no double backward through eager ops. The first step of each batch size compiles
        (1-2 minutes on a CPU); on the aspirin benchmark step it was 1.4-1.6x faster on 2 CPU cores.
    cuda_graphs: with compile on a CUDA device, replay the compiled step's forward and loss backward as CUDA graphs
        (torch.compile mode="reduce-overhead"): static shapes, the edges and atoms padded to (1 + h) times the first
        batch's counts, h = 20 / sqrt(count) between 2 % and 20 % (`export.auto_headroom`), in a ghost structure
        that the loss never sees (`export.EdgePadding`). One program per number of structures in a batch (the last,
        smaller batch of an epoch gets its own) and per pair of capacities, raised with a new program when a batch
        exceeds them; the Python and launch overhead of a step is gone (Ag 2048 atoms on an H200: 9.4 ms per step
        against 38.0 ms eager; 2 x 2048 atoms: 15.2 ms against nequip-allegro's compiled 61.5 ms, bench/README).
    activation_memory_budget: with compile, the fraction (0 to 1) of the tensors the compiled step would keep for
        the loss backward that it keeps, the rest recomputed (torch._functorch.config.activation_memory_budget;
        None: keep all). 0.5 lowered the default model's peak per edge from 13.4 to 11.5 KB on a CPU; its time cost
        on a GPU is not measured.
    """

    energy_weight: float = 1.0
    force_weight: float = 1.0
    stress_weight: float = 0.0
    optimizer: str = "adam"
    learning_rate: float = 0.002
    weight_decay: float = 0.0
    batch_size: int = 5
    ema_decay: float = 0.99
    lr_patience: int = 25
    lr_factor: float = 0.5
    max_epochs: int = 1000
    max_time_minutes: float | None = None
    early_stopping_patience: int | None = 100
    min_lr: float = 1e-6
    grad_clip_norm: float | None = None
    dtype: str = "float32"
    num_threads: int | None = None
    device: str = "auto"
    validation_batch_size: int | None = None
    progress_bar: bool = True
    plots: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    activation_memory_budget: float | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ConfigError(f"training.{message}")

        for name in ("energy_weight", "force_weight", "stress_weight", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                fail(f"{name} must be a non-negative number, got {getattr(self, name)}")
        if self.energy_weight == 0 and self.force_weight == 0 and self.stress_weight == 0:
            fail("energy_weight, force_weight and stress_weight are all 0: nothing to train on")
        if self.optimizer not in ("adam", "amsgrad"):
            fail(f"optimizer '{self.optimizer}' is not 'adam' or 'amsgrad'" + _suggest(self.optimizer, ("adam", "amsgrad")))
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            fail(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                fail(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.validation_batch_size is not None and self.validation_batch_size < 1:
            fail(f"validation_batch_size must be at least 1, got {self.validation_batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            fail(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lr_patience < 0:
            fail(f"lr_patience must be >= 0, got {self.lr_patience}")
        if not 0.0 < self.lr_factor < 1.0:
            fail(f"lr_factor must lie in (0, 1), got {self.lr_factor}")
        if self.max_time_minutes is not None and not self.max_time_minutes > 0:
            fail(f"max_time_minutes must be positive, got {self.max_time_minutes}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            fail(f"early_stopping_patience must be at least 1, got {self.early_stopping_patience}")
        if not self.min_lr >= 0:
            fail(f"min_lr must be >= 0, got {self.min_lr}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            fail(f"grad_clip_norm must be positive, got {self.grad_clip_norm}")
        if self.dtype not in ("float32", "float64"):
            fail(f"dtype must be 'float32' or 'float64', got '{self.dtype}'")
        if self.num_threads is not None and self.num_threads < 1:
            fail(f"num_threads must be at least 1, got {self.num_threads}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            fail(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got '{self.device}'")
        if self.cuda_graphs and not self.compile:
            fail("cuda_graphs replays the compiled step: it needs compile: true")
        if self.cuda_graphs and self.device == "cpu":
            fail("cuda_graphs needs a CUDA device, got device: cpu")
        if self.activation_memory_budget is not None:
            if not self.compile:
                fail("activation_memory_budget applies to the compiled step: it needs compile: true")
            if not 0.0 <= self.activation_memory_budget <= 1.0:
                fail(f"activation_memory_budget must lie in [0, 1], got {self.activation_memory_budget}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: seed, data, model (AllegroConfig fields, `preset`, `backend`) and training sections.

    model is kept as a plain dict of the given keys; `model_config(type_names)` builds the AllegroConfig.
    """

    data: DataConfig
    model: dict = dataclasses.field(default_factory=dict)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_model_section(self.model)

    @property
    def split_seed(self) -> int:
        return self.seed if self.data.split_seed is None else self.data.split_seed

    @property
    def backend(self) -> str:
        return self.model.get("backend", "torch")

    def model_config(self, type_names: list[str] | None = None) -> AllegroConfig:
        """The AllegroConfig of this run (statistics not yet fitted); type_names from the data unless given."""
        fields = {key: value for key, value in self.model.items() if key not in ("preset", "backend")}
        if "type_names" not in fields:
            if type_names is None:
                raise ConfigError("model.type_names is not given and no data species were passed")
            fields["type_names"] = tuple(type_names)
        try:
            if "preset" in self.model:
                names = fields.pop("type_names")
                return AllegroConfig.preset(self.model["preset"], names, **fields)
            return AllegroConfig(**fields)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "data": dataclasses.asdict(self.data),
            "model": {key: (list(value) if isinstance(value, tuple) else value) for key, value in self.model.items()},
            "training": dataclasses.asdict(self.training),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: str | os.PathLike | None = None,
                  source: str | None = None) -> RunConfig:
        """Validate and build; relative data paths are resolved against base_dir (default: cwd).

        source (a file name) is prefixed to error messages.
        """
        try:
            return _build_run_config(values, Path(base_dir) if base_dir is not None else None)
        except ConfigError as error:
            if source:
                raise ConfigError(f"{source}: {error}") from None
            raise

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> RunConfig:
        return load_run_config(path)


def load_run_config(config: RunConfig | dict | str | os.PathLike) -> RunConfig:
    """A RunConfig from a RunConfig (returned as is), a dict, or a YAML file path."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return RunConfig.from_dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"no run configuration file at {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping with sections data, model, training; got {type(values).__name__}")
    return RunConfig.from_dict(values, base_dir=path.resolve().parent, source=str(path))


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
_SECTIONS = {"data": DataConfig, "training": TrainingConfig}
_MODEL_KEYS = tuple(field.name for field in dataclasses.fields(AllegroConfig)) + ("preset", "backend")
_TOP_LEVEL_KEYS = ("seed", "data", "model", "training")


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _all_qualified_keys() -> list[str]:
    keys = [f"{section}.{field.name}" for section, cls in _SECTIONS.items() for field in dataclasses.fields(cls)]
    return keys + [f"model.{key}" for key in _MODEL_KEYS] + list(_TOP_LEVEL_KEYS)


def _unknown_key(section: str, key: str, valid: tuple[str, ...]) -> ConfigError:
    """An error naming section.key, suggesting the closest key in the section, else in any section."""
    where = f"{section}.{key}" if section else str(key)
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
    hint = f"; did you mean '{section + '.' if section else ''}{close[0]}'?" if close else ""
    if not hint:
        qualified = _all_qualified_keys()
        close = difflib.get_close_matches(str(key), [q.split(".")[-1] for q in qualified], n=1, cutoff=0.75)
        if close:
            owner = next(q for q in qualified if q.split(".")[-1] == close[0])
            hint = f"; did you mean '{owner}' (in another section)?"
    return ConfigError(f"unknown key '{where}'{hint}")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _build_section(section: str, cls, values: Any):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    valid = tuple(hints)
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(section, key, valid)
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{section}.{key} = {value!r} must be {_type_name(hints[key])}")
    return cls(**values)


def _check_model_section(model: dict) -> None:
    for key in model:
        if key in FITTED_MODEL_FIELDS:
            raise ConfigError(f"model.{key} is fitted from the training set before training; remove it from the config")
        if key not in _MODEL_KEYS:
            raise _unknown_key("model", key, _MODEL_KEYS)
    if "preset" in model and model["preset"] not in PRESETS:
        raise ConfigError(f"model.preset '{model['preset']}' is not one of {sorted(PRESETS)}"
                          + _suggest(model["preset"], PRESETS))
    if "backend" in model and model["backend"] not in ("torch", "triton", "reference"):
        raise ConfigError(f"model.backend '{model['backend']}' is not one of torch, triton, reference")
    # Build once with placeholder species so that a bad value fails now, not after the data is read.
    fields = {key: value for key, value in model.items() if key not in ("preset", "backend")}
    fields.setdefault("type_names", ("H",))
    try:
        if "preset" in model:
            names = fields.pop("type_names")
            AllegroConfig.preset(model["preset"], names, **fields)
        else:
            AllegroConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model: {error}") from None


def _build_run_config(values: dict[str, Any], base_dir: Path | None) -> RunConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"a run configuration is a mapping with sections data, model, training; got {type(values).__name__}")
    for key in values:
        if key not in _TOP_LEVEL_KEYS:
            raise _unknown_key("", key, _TOP_LEVEL_KEYS)
    if "data" not in values:
        raise ConfigError("section 'data' is missing (it needs at least data.train_file)")
    seed = values.get("seed", 0)
    if not _type_ok(seed, int):
        raise ConfigError(f"seed = {seed!r} must be an int")
    data_values = dict(values["data"] or {}) if isinstance(values["data"], dict) else values["data"]
    if isinstance(data_values, dict) and base_dir is not None:
        for key in ("train_file", "test_file"):
            if isinstance(data_values.get(key), str) and data_values[key] and not os.path.isabs(data_values[key]):
                data_values[key] = str(base_dir / data_values[key])
    data = _build_section("data", DataConfig, data_values)
    training = _build_section("training", TrainingConfig, values.get("training"))
    model = values.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"section 'model' must be a mapping of keys to values, got {type(model).__name__}")
    return RunConfig(data=data, model=dict(model), training=training, seed=seed)
