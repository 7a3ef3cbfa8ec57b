"""allegro-fast: Allegro, the strictly local equivariant interatomic potential, fast on CPUs and GPUs."""

from .allocator import retain_freed_memory
from .config import PRESETS, AllegroConfig
from .graph import AtomicGraph
from .calculator import AllegroCalculator
from .model import BACKENDS, Allegro
from .serialization import load, save
from .tensor_product import LayerTensorProduct, describe_layers
from . import reference
from . import data, evaluation, export, run_config, statistics, testing, training
from .data import read_frames
from .evaluation import evaluate
from .md import ENSEMBLES, MDResult, run_md
from .run_config import RunConfig
from .training import train

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ENSEMBLES",
    "PRESETS",
    "Allegro",
    "AllegroCalculator",
    "AllegroConfig",
    "AtomicGraph",
    "LayerTensorProduct",
    "MDResult",
    "RunConfig",
    "data",
    "describe_layers",
    "evaluate",
    "evaluation",
    "export",
    "load",
    "read_frames",
    "retain_freed_memory",
    "reference",
    "run_config",
    "run_md",
    "save",
    "statistics",
    "testing",
    "train",
    "training",
]
