"""absl entrypoints: `python -m launch.<name> --config=... [--workdir=...]`.

Each is a few lines over one library call; launch/cli.py holds what they
share (the one-line handling of bad input).
"""
