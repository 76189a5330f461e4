"""Vision towers: where their architecture, preprocessing and weights come from.

Three sources, in this order of authority for the *architecture*:

1. a local tower copy (``--vision-tower PATH``): ``config.json`` (a ``SiglipConfig`` with a
   ``vision_config`` or a ``SiglipVisionConfig``) + ``preprocessor_config.json``, weights optional;
2. the checkpoint's own config (Factory / HF Llava carry a full ``vision_config``);
3. shapes of the checkpoint's vision tensors plus shipped facts for well-known hub ids
   (:mod:`medlite.checkpoints.hubfacts`) for what shapes cannot reveal (head count).

Weights come from the checkpoint and/or the tower copy; when both carry them and they differ the
user must choose (``vision_weights="checkpoint"|"tower"``) — the original TinyLLaVA loader ignored
the checkpoint's copy and loaded the hub repo, so either can be "the model".
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medlite.checkpoints.hubfacts import known_tower
from medlite.checkpoints.pool import TensorPool
from medlite.errors import CheckpointError

_PATCH = "embeddings.patch_embedding.weight"
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def vision_prefix(pool: Optional[TensorPool], candidates: list[str]) -> Optional[str]:
    """The first prefix under which ``pool`` holds a SigLIP/CLIP vision transformer."""
    if pool is None:
        return None
    for p in candidates:
        if p + _PATCH in pool:
            return p
    return None


def layer_count(pool: TensorPool, prefix: str) -> int:
    idx = {int(m.group(1)) for k in pool.with_prefix(prefix) if (m := _LAYER.match(k[len(prefix):]))}
    if idx and idx != set(range(max(idx) + 1)):
        raise CheckpointError(f"{pool.label}: vision encoder layers are not contiguous: {sorted(idx)}")
    return len(idx)


def infer_from_shapes(pool: TensorPool, prefix: str) -> dict:
    """Vision config fields that tensor shapes reveal (no head count, no activation, no eps)."""
    hidden, ch, p, _ = pool.shape(prefix + _PATCH)
    npos = pool.shape(prefix + "embeddings.position_embedding.weight")[0]
    side = round(npos ** 0.5)
    if side * side != npos:
        raise CheckpointError(f"{pool.label}: {npos} position embeddings is not a square patch grid "
                              f"(a CLS token? only SigLIP-style towers are supported)")
    inter = pool.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0]
    # image_size: the smallest size giving this grid (the real one may be up to patch-1 px larger)
    return {"hidden_size": hidden, "num_channels": ch, "patch_size": p, "image_size": side * p,
            "intermediate_size": inter, "num_hidden_layers": layer_count(pool, prefix)}


@dataclass
class TowerCopy:
    """A local copy of a vision tower repository (``--vision-tower``)."""

    path: Path
    vision_config: dict
    preprocessor: dict
    pool: Optional[TensorPool]
    prefix: Optional[str]
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | str) -> "TowerCopy":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"--vision-tower {path}: no config.json (expected a local copy of the vision tower "
                                  f"repository, e.g. google/siglip-so400m-patch14-384)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
        vcfg = cfg["vision_config"] if isinstance(cfg.get("vision_config"), dict) else cfg
        mt = vcfg.get("model_type", "siglip_vision_model")
        if "siglip" not in mt:
            raise CheckpointError(f"{cfg_file}: vision tower type {mt!r} is not supported (SigLIP towers only)")
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        pool = TensorPool.open(path, label=f"vision tower {path}", required=False)
        pool = pool if pool.entries else None
        prefix = vision_prefix(pool, ["vision_model.", ""])
        if pool is not None and prefix is None:
            raise CheckpointError(f"--vision-tower {path}: weight files hold no SigLIP vision transformer "
                                  f"(no '*embeddings.patch_embedding.weight')")
        from medlite.fileio import sha256_file

        files = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
        return cls(path, dict(vcfg), pre, pool, prefix, files)

    def discard_non_vision(self) -> None:
        """SigLIP repos hold the text tower too; the VLM never uses it."""
        if self.pool is None:
            return
        keep = self.prefix or ""
        other = [k for k in self.pool.keys()
                 if not (k.startswith(keep) and (k[len(keep):].split(".")[0] in
                                                 ("embeddings", "encoder", "post_layernorm", "head")))]
        self.pool.discard(other, "SigLIP text tower / logit scale: not part of the vision-language model")


def resolve_vision_config(*, hub_id: Optional[str], tower: Optional[TowerCopy], pool: Optional[TensorPool],
                          prefix: Optional[str], base: Optional[dict], notes: list[str], where: str,
                          preprocessor: Optional[dict] = None) -> tuple[dict, dict]:
    """The full (as released) vision config and the preprocessor dict.

    ``base`` is a vision_config carried by the checkpoint itself (Factory / HF); ``preprocessor`` a
    preprocessor_config.json found in the checkpoint folder (it wins over the tower's). Returns
    ``(vision_config, preprocessor)``; ``vision_config['num_hidden_layers']`` is the tower's own count.
    """
    facts = known_tower(hub_id)
    if tower is not None:
        vcfg, pre = dict(tower.vision_config), dict(tower.preprocessor)
        if not pre and facts:
            pre = dict(facts["preprocessor"])
            notes.append(f"preprocessing of {hub_id} from medlite's shipped table ({tower.path} has no preprocessor_config.json)")
    elif base is not None:
        vcfg = dict(base)
        pre = dict(facts["preprocessor"]) if facts else {}
    elif facts is not None:
        vcfg, pre = dict(facts["vision_config"]), dict(facts["preprocessor"])
        notes.append(f"vision architecture of {hub_id} (head count, activation, eps, preprocessing) from medlite's "
                     f"shipped table of well-known towers")
    elif pool is not None and prefix is not None:
        shapes = infer_from_shapes(pool, prefix)
        raise CheckpointError(
            f"{where}: the vision tower {hub_id!r} is not described in the checkpoint; tensor shapes reveal "
            f"{shapes} but not the attention head count or the preprocessing. Pass --vision-tower PATH, a local "
            f"copy of {hub_id} (its config.json and preprocessor_config.json; weights optional)")
    else:
        raise CheckpointError(
            f"{where}: the checkpoint has no vision tower weights and names the hub repo {hub_id!r} for them "
            f"(the original loader downloaded it). medlite never downloads: pass --vision-tower PATH, a local copy "
            f"of {hub_id}")
    if pool is not None and prefix is not None:
        # the architecture must agree with the tensors actually present
        shapes = infer_from_shapes(pool, prefix)
        for k in ("hidden_size", "patch_size", "intermediate_size"):
            if k in vcfg and int(vcfg[k]) != shapes[k]:
                raise CheckpointError(f"{where}: vision {k} is {vcfg[k]} in the tower config but the checkpoint's "
                                      f"vision tensors say {shapes[k]}")
        # 384 px / patch 14 → a 27×27 grid (the conv drops the 6-pixel remainder): compare grids, not pixels
        side = shapes["image_size"] // shapes["patch_size"]
        if "image_size" in vcfg and int(vcfg["image_size"]) // int(vcfg.get("patch_size", shapes["patch_size"])) != side:
            raise CheckpointError(f"{where}: vision image_size {vcfg['image_size']} gives a different patch grid than "
                                  f"the checkpoint's {side}×{side} position embeddings")
    if preprocessor:
        pre = dict(preprocessor)
    if not pre:
        pre = {"size": {"height": int(vcfg.get("image_size", 384)), "width": int(vcfg.get("image_size", 384))},
               "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255}
        notes.append("no preprocessor_config.json: SigLIP defaults (mean/std 0.5, bicubic, 1/255) at the tower's image size")
    return vcfg, pre


def choose_vision_source(*, ckpt: Optional[TensorPool], ckpt_prefix: Optional[str], tower: Optional[TowerCopy],
                         layers_used: int, choice: Optional[str], notes: list[str], where: str,
                         hub_id: Optional[str]) -> tuple[TensorPool, str, Optional[str]]:
    """Pick the pool that supplies the vision weights; returns ``(pool, prefix, vision_weights)``.

    The other copy (if any) is discarded from its pool with a reason. Only the tensors the VLM
    uses (embeddings + the first ``layers_used`` layers) are compared.
    """
    t_pool = tower.pool if tower is not None else None
    t_prefix = tower.prefix if tower is not None else None
    if choice not in (None, "checkpoint", "tower"):
        raise CheckpointError(f"vision_weights must be 'checkpoint' or 'tower', not {choice!r}")
    if ckpt_prefix is None and t_pool is None:
        raise CheckpointError(
            f"{where}: no vision tower weights in the checkpoint{' or in --vision-tower ' + str(tower.path) if tower else ''}; "
            f"they belong to the hub repo {hub_id!r}, which medlite never downloads. Pass --vision-tower PATH, a local "
            f"copy of {hub_id} with its weights")
    if ckpt_prefix is None:
        if choice == "checkpoint":
            raise CheckpointError(f"{where}: vision_weights='checkpoint' but the checkpoint has no vision weights")
        return t_pool, t_prefix, "tower"
    if t_pool is None:
        if choice == "tower":
            raise CheckpointError(f"{where}: vision_weights='tower' but --vision-tower has no weight files")
        return ckpt, ckpt_prefix, None
    differ = _first_difference(ckpt, ckpt_prefix, t_pool, t_prefix, layers_used)
    if differ is None:
        picked = choice or "checkpoint"
        notes.append(f"vision weights in the checkpoint and in {tower.path} are identical (compared "
                     f"{layers_used} layers + embeddings at the lower of the two precisions); using the {picked} copy")
        vw = choice
    elif choice is None:
        raise CheckpointError(
            f"{where}: the checkpoint's vision weights differ from those in {tower.path} (first difference: "
            f"{differ}). The original TinyLLaVA loader ignored the checkpoint's copy and used the tower repo, so "
            f"either may be the model you evaluated: choose with --vision-weights checkpoint|tower")
    else:
        picked, vw = choice, choice
        notes.append(f"vision weights differ between checkpoint and {tower.path} ({differ}); using the {choice} copy "
                     f"as asked")
    drop_pool, drop_prefix = (t_pool, t_prefix) if picked == "checkpoint" else (ckpt, ckpt_prefix)
    keep_pool, keep_prefix = (ckpt, ckpt_prefix) if picked == "checkpoint" else (t_pool, t_prefix)
    drop = [k for k in drop_pool.with_prefix(drop_prefix) if k not in drop_pool.consumed
            and k[len(drop_prefix):].split(".")[0] in ("embeddings", "encoder", "post_layernorm", "head")]
    drop_pool.discard(drop, f"vision weights superseded by the {picked} copy")
    return keep_pool, keep_prefix, vw


def _difference(x, y, rest: str) -> Optional[str]:
    """Two copies of one tensor (both numpy arrays or both torch tensors), compared at the lower precision."""
    if tuple(x.shape) != tuple(y.shape):
        return f"{rest} shape {tuple(x.shape)} vs {tuple(y.shape)}"
    is_torch = hasattr(x, "element_size")
    sx, sy = (x.element_size(), y.element_size()) if is_torch else (x.itemsize, y.itemsize)
    # a half-precision checkpoint copy of an fp32 tower repo is the same weights: compare at the lower precision
    if x.dtype != y.dtype and sx != sy:
        low = x.dtype if sx < sy else y.dtype
        x, y = (x.to(low), y.to(low)) if is_torch else (x.astype(low), y.astype(low))
    if is_torch:
        import torch

        xf, yf = x.float(), y.float()
        return None if torch.equal(xf, yf) else f"{rest} (max abs diff {float((xf - yf).abs().max()):.3g})"
    import numpy as np

    xf, yf = x.astype(np.float32), y.astype(np.float32)
    return None if np.array_equal(xf, yf) else f"{rest} (max abs diff {float(np.abs(xf - yf).max()):.3g})"


def _first_difference(a: TensorPool, ap: str, b: TensorPool, bp: str, layers: int) -> Optional[str]:
    """The first vision tensor that differs between the two copies (numpy where it can: no torch import)."""
    names = [k[len(ap):] for k in a.with_prefix(ap)
             if k[len(ap):].startswith("embeddings.") or
             ((m := _LAYER.match(k[len(ap):])) and int(m.group(1)) < layers)]
    for rest in sorted(names):
        if bp + rest not in b:
            return f"{rest} missing in the tower copy"
        x, y = a.read_numpy(ap + rest), b.read_numpy(bp + rest)
        if x is None or y is None:
            x, y = a.read(ap + rest), b.read(bp + rest)
        found = _difference(x, y, rest)
        if found:
            return found
    return None


def siglip_config(vcfg: dict, *, layers: int):
    """A transformers ``SiglipVisionConfig`` with ``layers`` encoder layers and no pooling head (imports torch)."""
    from medlite.checkpoints.configspec import vision_spec

    return vision_spec(vcfg, layers=layers).to_transformers()
