"""The SAE definitions and losses (models), the optimizer, schedules and resampling (optim)."""
