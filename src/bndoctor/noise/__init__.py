"""Batch-size science: gradient noise scale, tail index of gradient noise, and advice on the logical batch."""

from .advice import advise
from .scale import GradientNoiseScale, NoiseSample
from .tail import tail_index

__all__ = ["GradientNoiseScale", "NoiseSample", "advise", "tail_index"]
