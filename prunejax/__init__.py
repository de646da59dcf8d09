"""prunejax: data pruning and model pruning in JAX."""

__version__ = "0.1.0"
