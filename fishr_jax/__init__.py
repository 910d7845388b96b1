"""fishr-jax: Fishr (invariant gradient variances) in JAX."""

__version__ = "0.1.0"
