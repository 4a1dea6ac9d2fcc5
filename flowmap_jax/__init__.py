"""flowmap-jax: distil diffusers teachers into few-step flow maps X(x_s, s, t), in JAX.

This package import is deliberately light (no jax import here), so pure-Python configuration
modules can be shared with the PyTorch reference in `torch_ref`.
"""

__version__ = "0.1.0"
