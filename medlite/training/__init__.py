"""The framework's reusable trainer (seeded, resumable, early stopping): :mod:`medlite.training.trainer`."""
