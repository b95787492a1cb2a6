"""oscbench: weight oscillation in quantization-aware training, every method under one recipe."""

__version__ = "0.1.0"
