"""The train tests' tiny synthetic run."""

from experiments import synthetic as synthetic_exp


def tiny_config(**overrides):
  """A seconds-long synthetic run (d_in 16, d_sae 32, batch 64), overridden."""
  c = synthetic_exp.get_config('test')
  for name, value in overrides.items():
    section, field = name.split('__')
    c[section][field] = value
  return c
