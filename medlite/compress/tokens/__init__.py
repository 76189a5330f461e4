"""Fewer image tokens: the vision tower's token grid pooled before the projector.

Torch-free entry points for the registry live in :mod:`.options` (options model, ``rules``, ``plan``,
``estimate``); the runner is :func:`medlite.compress.tokens.stage.run` (imports torch). The pooling
itself lives with the model (:mod:`medlite.checkpoints.token_pool`), its geometry in
:mod:`medlite.image_tokens`.
"""
