"""Distillation from the untouched source model (teacher) into the working, pruned model (student).

Torch-free entry points for the registry live in :mod:`.options` (options model, ``rules``, ``plan``);
the runner is :func:`medlite.compress.distill.stage.run` (imports torch).
"""

# The recipe registry imports this package's options; importing the registry first means importing
# ``medlite.compress.distill.options`` on its own never meets a half-initialised ``medlite.recipes``.
import medlite.recipes  # noqa: F401,E402
