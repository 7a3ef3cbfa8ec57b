"""The plain e3nn reference implementation of Allegro (installed as allegro_fast.reference): the oracle."""

from .model import ReferenceAllegro

__all__ = ["ReferenceAllegro"]
