"""Prints docs/configs.md, every config field with its default and description.

python -m launch.config_reference > docs/configs.md
"""

from gsae_jax import config as config_lib

if __name__ == '__main__':
  print(config_lib.reference_markdown(), end='')
