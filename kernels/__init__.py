"""Triton kernels for Allegro (installed as allegro_fast.kernels)."""
