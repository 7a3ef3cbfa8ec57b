"""Hyperparameters of an Allegro model (DESIGN section 1) and named presets.

`AllegroConfig` is a plain frozen dataclass: every backend and the reference build the same function
from it, and `save`/`load` store it as a dict. Statistics fitted from data (avg_num_neighbors, the
per-species energy shifts and scales) live here too, so that a model is fully described by its config
plus its weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Sequence

from ase.data import atomic_numbers as _ASE_ATOMIC_NUMBERS


@dataclasses.dataclass(frozen=True)
class AllegroConfig:
    """Every hyperparameter of the Allegro function; defaults follow the authors' current package.

    type_names: chemical symbols of the species the model knows, in the order of its one-hot encoding.
    r_max: cutoff radius r_c in Å. l_max: largest spherical-harmonic degree (1 to 3).
    parity: True for an E(3)-equivariant model (irreps carry parity), False for SE(3) only.
    num_scalar_features: width F of the scalar latent x^{ij}; num_tensor_features: channels n of V^{ij}.
    *_mlp_hidden: hidden widths of the two-body, latent and readout MLPs (SiLU between layers).
    avg_num_neighbors: the 1/sqrt normalisation of the environment sum and of the edge-energy sum.
    per_species_energy_shift / per_species_energy_scale: mu_Z and sigma_Z, one per type name (eV).
    """

    type_names: tuple[str, ...] = ("H",)
    r_max: float = 5.0
    l_max: int = 2
    parity: bool = True
    num_layers: int = 2
    num_scalar_features: int = 64
    num_tensor_features: int = 16
    num_bessels: int = 8
    bessel_trainable: bool = False
    polynomial_p: int = 6
    two_body_mlp_hidden: tuple[int, ...] = (64,)
    latent_mlp_hidden: tuple[int, ...] = (64,)
    readout_mlp_hidden: tuple[int, ...] = (32,)
    residual_old_weight: float = 1.0 / math.sqrt(2.0)
    residual_new_weight: float = 1.0 / math.sqrt(2.0)
    per_edge_species_scale: bool = True
    avg_num_neighbors: float = 1.0
    per_species_energy_shift: tuple[float, ...] | None = None
    per_species_energy_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists from YAML/JSON but store tuples so the config stays hashable and immutable.
        for name in ("type_names", "two_body_mlp_hidden", "latent_mlp_hidden", "readout_mlp_hidden",
                     "per_species_energy_shift", "per_species_energy_scale"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"AllegroConfig: {message}")

        if len(self.type_names) == 0:
            fail("type_names is empty; give the chemical symbols of the species, e.g. ['Ag']")
        for symbol in self.type_names:
            if symbol not in _ASE_ATOMIC_NUMBERS:
                close = difflib.get_close_matches(str(symbol), list(_ASE_ATOMIC_NUMBERS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                fail(f"type name '{symbol}' is not a chemical symbol{hint}")
        if len(set(self.type_names)) != len(self.type_names):
            fail(f"type_names has duplicates: {list(self.type_names)}")
        if not (math.isfinite(self.r_max) and self.r_max > 0):
            fail(f"r_max must be a positive number of Å, got {self.r_max}")
        if self.l_max not in (1, 2, 3):
            fail(f"l_max must be 1, 2 or 3, got {self.l_max}")
        for name in ("num_layers", "num_scalar_features", "num_tensor_features", "num_bessels", "polynomial_p"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        for name in ("two_body_mlp_hidden", "latent_mlp_hidden", "readout_mlp_hidden"):
            if any((not isinstance(width, int)) or width < 1 for width in getattr(self, name)):
                fail(f"{name} must be a list of positive integers, got {list(getattr(self, name))}")
        if not (math.isfinite(self.avg_num_neighbors) and self.avg_num_neighbors > 0):
            fail(f"avg_num_neighbors must be positive, got {self.avg_num_neighbors}")
        for name in ("per_species_energy_shift", "per_species_energy_scale"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.type_names):
                fail(f"{name} has {len(value)} entries but there are {len(self.type_names)} type_names")

    @property
    def num_types(self) -> int:
        return len(self.type_names)

    @property
    def atomic_numbers(self) -> tuple[int, ...]:
        return tuple(_ASE_ATOMIC_NUMBERS[symbol] for symbol in self.type_names)

    def replace(self, **changes: Any) -> "AllegroConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AllegroConfig":
        """Build from a plain dict; an unknown key is an error that suggests the closest valid one."""
        valid = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"AllegroConfig: unknown key '{key}'{hint}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, type_names: Sequence[str], **overrides: Any) -> "AllegroConfig":
        """One of PRESETS by name, for the given species, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
        return cls(type_names=tuple(type_names), **{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' current package defaults (nequip-allegro): 2 layers, l_max 2, F = 64, n = 16.
    "default": {},
    # The paper's rMD17 model (Musaelian et al. 2023, Methods): 3 layers, l_max 3, 128 tensor features,
    # two-body MLP [128, 256, 512, 1024], latent MLPs [1024, 1024, 1024], readout [128].
    "rmd17": dict(
        r_max=5.0, l_max=3, num_layers=3, num_scalar_features=1024, num_tensor_features=128,
        two_body_mlp_hidden=(128, 256, 512), latent_mlp_hidden=(1024, 1024), readout_mlp_hidden=(128,),
    ),
    # The paper's speed model for large-scale MD (Li3PO4 / Ag): one layer, l_max 1, small MLPs.
    "speed": dict(
        r_max=4.0, l_max=1, num_layers=1, num_scalar_features=32, num_tensor_features=32,
        two_body_mlp_hidden=(32,), latent_mlp_hidden=(32,), readout_mlp_hidden=(32,),
    ),
}
