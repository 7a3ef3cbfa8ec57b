"""`save` and `load`: one file with config, weights and metadata, read with torch's weights_only loader.

The file is a dict of plain Python values and tensors:
    {"format": "allegro-fast", "format_version": 1, "config": {...}, "model": "Allegro" | "ReferenceAllegro",
     "backend": "torch" | None, "dtype": "float32" | "float64", "state_dict": {...}, "metadata": {...}}
It is written to a temporary file in the same folder and renamed, so a crash never leaves a torn file.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import torch

from .atomic_files import atomic_write
from .config import AllegroConfig
from .model import Allegro
from .potential import AllegroPotential

FORMAT = "allegro-fast"
FORMAT_VERSION = 1


def save(model: AllegroPotential, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write model (any backend or the reference) to path atomically."""
    from . import __version__
    from .reference import ReferenceAllegro

    if not isinstance(model, (Allegro, ReferenceAllegro)):
        raise TypeError(f"save expects an Allegro or ReferenceAllegro model, got {type(model).__name__}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": type(model).__name__,
        "backend": getattr(model, "backend", None),
        "dtype": str(model.dtype).removeprefix("torch."),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "metadata": {
            "allegro_fast_version": __version__,
            "torch_version": str(torch.__version__),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(metadata or {}),
        },
    }
    atomic_write(path, lambda stream: torch.save(payload, stream))


def load(path: str | os.PathLike, backend: str | None = None, map_location: str | torch.device = "cpu") -> AllegroPotential:
    """Read a model written by `save`. backend overrides the saved one ("torch", or "reference")."""
    from .reference import ReferenceAllegro

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable allegro-fast model file ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an allegro-fast model file (no '{FORMAT}' format marker)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer allegro-fast (format {payload['format_version']}); this one reads "
            f"format {FORMAT_VERSION}"
        )
    config = AllegroConfig.from_dict(payload["config"])
    chosen = backend or (payload.get("backend") if payload.get("model") == "Allegro" else "reference")
    model = ReferenceAllegro(config) if chosen == "reference" else Allegro(config, backend=chosen)
    model = model.to(getattr(torch, payload.get("dtype", "float32")))
    model.load_state_dict(payload["state_dict"])
    model.metadata = payload.get("metadata", {})
    return model.to(map_location)
