"""Runnable examples (``python -m lowrank_jax.examples.<name>``)."""
