"""gsae_jax: sweeps of Gated sparse autoencoders on cached LM activations."""

from gsae_jax.api import SAE, load

__all__ = ['SAE', 'load']
__version__ = '0.1.0'
