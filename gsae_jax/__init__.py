"""gsae_jax: sweeps of Gated sparse autoencoders on cached LM activations."""

import importlib

from gsae_jax.api import SAE, load

__all__ = ['SAE', 'load']
__version__ = '0.1.0'

_LAZY_MODULES = ('backends', 'data', 'evaluate', 'lm', 'sae', 'train')


def __getattr__(name):
  # `gsae_jax.lm.load()` works after a plain `import gsae_jax`, without paying
  # for the LM's imports in every process that only loads SAEs.
  if name in _LAZY_MODULES:
    return importlib.import_module(f'gsae_jax.{name}')
  raise AttributeError(f'module gsae_jax has no attribute {name!r}')
