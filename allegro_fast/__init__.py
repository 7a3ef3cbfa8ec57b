"""allegro-fast: Allegro, the strictly local equivariant interatomic potential, fast on CPUs and GPUs."""

from .config import PRESETS, AllegroConfig
from .graph import AtomicGraph
from .calculator import AllegroCalculator
from .model import BACKENDS, Allegro
from .serialization import load, save
from .tensor_product import LayerTensorProduct, describe_layers
from . import reference
from . import statistics, testing

__version__ = "0.1.0"

__all__ = ["Allegro", "AllegroCalculator", "BACKENDS", "AllegroConfig", "AtomicGraph", "LayerTensorProduct", "PRESETS", "describe_layers", "load", "reference", "save", "statistics", "testing"]
