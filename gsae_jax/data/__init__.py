"""Activations for training: sources (cache, synthetic), the cache, text, harvest."""
