"""Image-token pooling inside the canonical model: the vision tower's tokens are pooled *before* the projector.

transformers' ``LlavaModel.get_image_features`` (and medlite's export ``VisionGraph``) call
``multi_modal_projector(features)``; a forward pre-hook on the projector pools ``features
[B, tokens_in, C]`` to ``[B, tokens_out, C]`` first, so every consumer — generation, training,
calibration, the ONNX trace — sees the reduced count without a code path of its own.

The pooling is recorded in the model config (``config.medlite_image_token_pool``), which the
stage-output cache and every rebuild from a config read back (:func:`install_from_config`). It has no
parameters and its matrix is a non-persistent buffer: the state dict, and every weight name the
other stages use, are unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from medlite.image_tokens import METHODS, geometry, pool_matrix

CONFIG_KEY = "medlite_image_token_pool"
CHILD = "medlite_token_pool"


class ImageTokenPool(nn.Module):
    """``[B, tokens_in, C]`` → ``[B, tokens_out, C]``: one MatMul with the pooling matrix.

    ``avg``: ``P @ x``. ``salient``: each token weighted by its feature norm inside its window,
    ``(P @ (w·x)) / (P @ w)`` with ``w = ‖x‖`` — static shapes, so it exports like ``avg``.
    Computed in fp32 and cast back (fp16 norms of wide features can lose digits).
    """

    def __init__(self, tokens_in: int, tokens_out: int, method: str = "avg"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"image-token pooling method {method!r}: one of {', '.join(METHODS)}")
        self.geometry = geometry(tokens_in, tokens_out)
        self.method = method
        self.register_buffer("matrix", torch.from_numpy(pool_matrix(self.geometry)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.matrix.float()
        xf = x.float()
        if self.method == "avg":
            return torch.matmul(p, xf).to(x.dtype)
        w = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)                 # [B, N, 1]
        return (torch.matmul(p, w * xf) / torch.matmul(p, w).clamp_min(1e-12)).to(x.dtype)

    def spec(self) -> dict:
        return {"tokens_in": self.geometry.tokens_in, "tokens_out": self.geometry.tokens_out, "method": self.method}


def _pool_before_projector(module: nn.Module, args: tuple):
    # a module-level function (not a closure): the model stays deep-copyable
    pool = getattr(module, CHILD, None)
    if pool is None or not args:
        return None
    return (pool(args[0]),) + tuple(args[1:])


def current_pool(model) -> Optional[ImageTokenPool]:
    """The pooling installed on ``model``'s projector, if any."""
    return getattr(model.model.multi_modal_projector, CHILD, None)


def install(model, tokens_in: int, tokens_out: int, method: str = "avg") -> ImageTokenPool:
    """Pool the image tokens of ``model`` (a ``LlavaForConditionalGeneration``) to ``tokens_out`` before its
    projector, and record it in the config. Refuses a model that already pools (pooling twice would
    need the first pool's grid, which is not square in general)."""
    proj = model.model.multi_modal_projector
    if getattr(proj, CHILD, None) is not None:
        raise ValueError("the model already pools its image tokens "
                         f"({getattr(proj, CHILD).spec()}): one image-token reduction per model")
    pool = ImageTokenPool(tokens_in, tokens_out, method)
    ref = next(proj.parameters(), None)
    if ref is not None and ref.device.type != "meta":
        pool.to(ref.device)
    setattr(proj, CHILD, pool)
    proj.register_forward_pre_hook(_pool_before_projector)
    setattr(model.config, CONFIG_KEY, pool.spec())
    model.config.image_seq_length = int(tokens_out)
    return pool


def install_from_config(model) -> Optional[ImageTokenPool]:
    """Re-install the pooling a config records (a model rebuilt from ``config.to_dict()``)."""
    spec = getattr(model.config, CONFIG_KEY, None)
    if not spec or current_pool(model) is not None:
        return current_pool(model)
    delattr(model.config, CONFIG_KEY)          # install() records it again
    return install(model, int(spec["tokens_in"]), int(spec["tokens_out"]), str(spec.get("method", "avg")))


__all__ = ["ImageTokenPool", "install", "install_from_config", "current_pool", "CONFIG_KEY"]
