"""Structured pruning: MLP channels, GQA-aware attention groups, decoder layers, vision layers.

Torch-free entry points for the registry live in :mod:`.options` (options model, ``rules``, ``plan``);
the runner is :func:`medlite.compress.prune.stage.run` (imports torch).
"""
