"""Distillation from the untouched source model (teacher) into the working, pruned model (student).

Torch-free entry points for the registry live in :mod:`.options` (options model, ``rules``, ``plan``);
the runner is :func:`medlite.compress.distill.stage.run` (imports torch).
"""
