"""Structured pruning: MLP channels, GQA-aware attention groups, decoder layers, vision layers.

Torch-free entry points for the registry live in :mod:`.options` (options model, ``rules``, ``plan``);
the runner is :func:`medlite.compress.prune.stage.run` (imports torch).
"""

# The recipe registry imports this package's options; importing the registry first means importing
# ``medlite.compress.prune.options`` on its own never meets a half-initialised ``medlite.recipes``.
import medlite.recipes  # noqa: F401,E402
