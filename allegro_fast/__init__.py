"""allegro-fast: Allegro, the strictly local equivariant interatomic potential, fast on CPUs and GPUs."""

from .config import PRESETS, AllegroConfig
from .graph import AtomicGraph
from .calculator import AllegroCalculator
from .model import BACKENDS, Allegro
from .serialization import load, save
from .tensor_product import LayerTensorProduct, describe_layers
from . import reference
from . import data, evaluation, run_config, statistics, testing, training
from .data import read_frames
from .evaluation import evaluate
from .run_config import RunConfig
from .training import train

__version__ = "0.1.0"

__all__ = [
    "Allegro", "AllegroCalculator", "BACKENDS", "AllegroConfig", "AtomicGraph", "LayerTensorProduct", "PRESETS",
    "RunConfig", "data", "describe_layers", "evaluate", "evaluation", "load", "read_frames", "reference", "run_config",
    "save", "statistics", "testing", "train", "training",
]
