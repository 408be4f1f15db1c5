"""ensembling: deep ensembles and weight averaging in JAX/Flax, as pure functions on pytrees."""

__version__ = "0.1.0"
