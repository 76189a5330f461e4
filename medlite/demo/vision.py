"""Stage 1 of the demo model's training: warming up the SigLIP-style vision tower on its own.

Why a separate stage: LLaVA starts from a vision tower that is already trained; the demo has none
(nothing may be downloaded), and Micro Med-VQA is balanced so that neither the question nor the
image alone predicts an answer (it is an XOR of the two). A decoder trained from scratch on such
data sits at chance for hundreds of steps, and a tower trained only through it learns features of
the dozen training *sources*, not of lesions. So the tower is trained first with linear probes
(discarded afterwards) on its last layer — the layer the legacy format feeds to the projector:

* probes on the *mean* of the tokens (modality, region, colour, lesion side, lesion polarity):
  the tower spreads these into every token, where the decoder's initially uniform attention sees
  them from its first step;
* a per-token probe of where a lesion was drawn (dense labels, one per patch), which makes lesion
  detection a *local* feature — the kind that carries over to anatomy never seen in training.

The lesions of this stage are drawn fresh at every step on lesion-free views (with Micro Med-VQA's
own :func:`medlite.demo.lesions.add_lesion`), and a quarter of the images are 2×2 mosaics
of four views or intensity-inverted views: a dozen sources give few backgrounds, and a lesion
detector must not learn them. Global labels of mosaics / inverted images are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODALITIES = ("CT", "MR", "CR", "US", "NM", "fundus", "pathology")


@dataclass
class ViewBank:
    """Every distinct view of a sample list, rendered once (uint8 ``[n, size, size, 3]``)."""

    shown: np.ndarray        # as the samples show it (with its lesion, if any)
    clean: np.ndarray        # the same view without a lesion (warm-up backgrounds)
    labels: np.ndarray       # int64 [n, 3]: modality, region, colour (-100 = unknown)
    is_color: np.ndarray     # bool [n]
    index: list[int]         # row of each sample
    regions: tuple[str, ...]


def render_views(samples, ctx) -> ViewBank:
    """Render the views of Micro Med-VQA ``samples`` (their ``image_fn`` is a ``ViewImage``)."""
    from medlite.demo.micro_vqa import REGION_PHRASES

    regions = tuple(sorted(REGION_PHRASES))
    rows: dict[int, int] = {}
    shown, clean, labels, colour, index = [], [], [], [], []
    with ctx.progress("render views", total=len(samples)) as advance:
        for s in samples:
            key = id(s.image_fn)
            if key not in rows:
                rows[key] = len(shown)
                shown.append(np.asarray(s.load_image().convert("RGB"), dtype=np.uint8))
                bg = s.image_fn.background() if hasattr(s.image_fn, "background") else s.load_image()
                clean.append(np.asarray(bg.convert("RGB"), dtype=np.uint8))
                is_color = bool(dict(s.meta).get("is_color", False))
                labels.append((MODALITIES.index(s.modality) if s.modality in MODALITIES else -100,
                               regions.index(s.region) if s.region in regions else -100, int(is_color)))
                colour.append(is_color)
            index.append(rows[key])
            advance()
    return ViewBank(np.stack(shown), np.stack(clean), np.asarray(labels, dtype=np.int64),
                    np.asarray(colour, dtype=bool), index, regions)


def token_labels(placement, size: int, patch: int) -> np.ndarray:
    """Per-patch lesion class (0 none, 1/2 bright left/right, 3/4 dark left/right), row-major.

    A patch is a lesion patch when at least 10 % of it lies inside the disc.
    """
    g = size // patch
    if placement is None:
        return np.zeros(g * g, dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disc = ((xx - placement.cx) ** 2 + (yy - placement.cy) ** 2 <= placement.radius ** 2).astype(np.float32)
    frac = disc.reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1)
    cls = (1 if placement.cx < size / 2 else 2) + (0 if placement.bright else 2)
    return np.where(frac >= 0.1, cls, 0).astype(np.int64)


def _mosaic(bank: ViewBank, rows, size: int) -> tuple[np.ndarray, bool]:
    """2×2 tiles of four views, each downsampled 2×2 (mean)."""
    half = size // 2
    out = np.empty((size, size, 3), np.float32)
    for k, r in enumerate(rows):
        tile = bank.clean[r].astype(np.float32)[: half * 2, : half * 2].reshape(half, 2, half, 2, 3).mean(axis=(1, 3))
        y, x = divmod(k, 2)
        out[y * half:(y + 1) * half, x * half:(x + 1) * half] = tile
    return out, bool(bank.is_color[list(rows)].any())


# Non-medical photographs that ship inside the scikit-image wheel (skimage/data/): backgrounds for
# the lesion detector only (never a Micro Med-VQA question). Coins are round and bright, text and
# bricks are high-contrast edges: the hard negatives a dozen medical sources do not provide.
TEXTURE_FILES = ("brick.png", "camera.png", "cell.png", "coins.png", "grass.png", "gravel.png", "moon.png",
                 "page.png", "text.png", "phantom.png", "hubble_deep_field.jpg", "chelsea.png", "coffee.png",
                 "astronaut.png", "horse.png", "rocket.jpg", "motorcycle_left.png", "clock_motion.png")


def texture_backgrounds(size: int, per_file: int = 24, seed: int = 0) -> np.ndarray:
    """Random crops (20–100 % of the short side, resized to ``size``) of :data:`TEXTURE_FILES`,
    uint8 ``[n, size, size, 3]``; files missing from the installed wheel are skipped."""
    from importlib.resources import files

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for name in TEXTURE_FILES:
        try:
            img = Image.open(files("skimage") / "data" / name).convert("RGB")
        except (FileNotFoundError, ModuleNotFoundError, OSError):
            continue
        w, h = img.size
        for _ in range(per_file):
            c = int(min(w, h) * rng.uniform(0.2, 1.0))
            x0, y0 = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
            crop = img.crop((x0, y0, x0 + c, y0 + c)).resize((size, size), Image.Resampling.BICUBIC)
            out.append(np.asarray(crop, dtype=np.uint8))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def warmup_batch(bank: ViewBank, rows, rng: np.random.Generator, patch: int, recipe_mosaic: float = 0.125,
                 recipe_invert: float = 0.125, textures: np.ndarray | None = None, recipe_texture: float = 0.25):
    """``(uint8 images [B,H,W,3], global targets [B,5], token targets [B,P])`` for one step."""
    from medlite.demo.lesions import Lesion, add_lesion

    size = bank.clean.shape[1]
    n = len(bank.clean)
    images, glob, toks = [], [], []
    for r in rows:
        kind = rng.random()
        g = [-100, -100, -100, 0, -100]
        if textures is not None and len(textures) and kind < recipe_texture:
            t = textures[int(rng.integers(len(textures)))].astype(np.float32)
            t = t[:, ::-1] if rng.random() < 0.5 else t
            is_color = bool(rng.random() < 0.5)
            arr = np.ascontiguousarray(255.0 - t if rng.random() < 0.3 else t)
        elif kind < recipe_texture * (textures is not None) + recipe_mosaic:
            arr, is_color = _mosaic(bank, [r] + [int(x) for x in rng.integers(0, n, 3)], size)
        elif kind < recipe_texture * (textures is not None) + recipe_mosaic + recipe_invert:
            arr, is_color = 255.0 - bank.clean[r].astype(np.float32), bool(bank.is_color[r])
        else:
            arr, is_color = bank.clean[r].astype(np.float32), bool(bank.is_color[r])
            g[:3] = [int(v) for v in bank.labels[r]]
        placement = None
        if rng.random() < 0.5:
            lesion = Lesion(side="left" if rng.random() < 0.5 else "right", bright=bool(rng.random() < 0.5))
            arr, placement = add_lesion(arr, lesion, rng)
            g[3], g[4] = (1 if lesion.side == "left" else 2), int(lesion.bright)
        if not is_color:
            arr = np.repeat(arr.mean(axis=2, keepdims=True), 3, axis=2)
        g[2] = int(is_color)  # known for every kind of image: colour must be a pixel feature, not a source
        images.append(np.clip(arr, 0, 255).round().astype(np.uint8))
        glob.append(g)
        toks.append(token_labels(placement, size, patch))
    return np.stack(images), np.asarray(glob, dtype=np.int64), np.stack(toks)


def dark_ok(clean: np.ndarray) -> bool:
    """Whether a dark lesion shows on this lesion-free image (Micro Med-VQA's rule, per image)."""
    return float((np.asarray(clean, dtype=np.float32).mean(axis=2) >= 90).mean()) >= 0.10


def random_background(bank: ViewBank, row: int, rng: np.random.Generator, textures=None,
                      p_other: float = 0.4) -> tuple[np.ndarray, bool]:
    """``(float image, is_colour)``: view ``row`` without its lesion, or (with ``p_other``) a
    texture crop, the view inverted or a mosaic — the warm-up's backgrounds, so that stage 2 also
    asks about images that identify no training source."""
    kind = rng.random()
    if kind >= p_other:
        return bank.clean[row].astype(np.float32), bool(bank.is_color[row])
    kind /= p_other
    if textures is not None and len(textures) and kind < 0.5:
        t = textures[int(rng.integers(len(textures)))].astype(np.float32)
        is_color = bool(rng.random() < 0.5)
        if not is_color:
            t = np.repeat(t.mean(axis=2, keepdims=True), 3, axis=2)
        return np.ascontiguousarray(t[:, ::-1] if rng.random() < 0.5 else t), is_color
    if kind < 0.75:
        return 255.0 - bank.clean[row].astype(np.float32), bool(bank.is_color[row])
    return _mosaic(bank, [row] + [int(x) for x in rng.integers(0, len(bank.clean), 3)], bank.clean.shape[1])


def fresh_lesion(arr: np.ndarray, is_color: bool, rng: np.random.Generator, *, present: bool = True):
    """``(uint8 image, Lesion or None)``: ``arr`` with a new random lesion drawn on it (or none).

    Stage 2 asks the lesion questions about a lesion drawn afresh at every step (same rules as the
    dataset: :func:`medlite.demo.lesions.add_lesion`): with one fixed lesion per view the
    decoder memorises views instead of reading the tower's lesion features.
    """
    from medlite.demo.lesions import Lesion, add_lesion

    lesion = None
    if present:
        bright = bool(rng.random() < 0.5) or not dark_ok(arr)
        lesion = Lesion(side="left" if rng.random() < 0.5 else "right", bright=bright)
        arr, _ = add_lesion(arr, lesion, rng)
    if not is_color:
        arr = np.repeat(arr.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(arr, 0, 255).round().astype(np.uint8), lesion


def warm_up_vision(model, bank: ViewBank, recipe, ctx, normalise, *, return_probes: bool = False):
    """Train ``model.model.vision_tower`` with the probes described above; returns the loss curve
    (and the probes ``(mean_heads, token_head)`` with ``return_probes``, for diagnostics).

    ``normalise`` maps uint8 NHWC tensors to the model's pixel values.
    """
    import torch

    tower = model.model.vision_tower
    sizes = (len(MODALITIES), len(bank.regions), 2, 3, 2)
    heads = torch.nn.ModuleList([torch.nn.Linear(recipe.vision_hidden, k) for k in sizes])
    token_head = torch.nn.Linear(recipe.vision_hidden, 5)
    params = list(tower.parameters()) + list(heads.parameters()) + list(token_head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=recipe.weight_decay)
    token_weight = torch.tensor([1.0, 4.0, 4.0, 4.0, 4.0])  # lesion patches are ~5 % of all patches
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    rng = np.random.default_rng(recipe.seed + 2)
    order: list[int] = []
    losses: list[float] = []
    textures = texture_backgrounds(bank.clean.shape[1], seed=recipe.seed)
    with ctx.progress("warm up vision tower", total=recipe.vision_steps) as advance:
        for _ in range(recipe.vision_steps):
            if len(order) < recipe.vision_batch:
                order += torch.randperm(len(bank.clean), generator=gen).tolist()
            rows, order = order[:recipe.vision_batch], order[recipe.vision_batch:]
            imgs, glob, toks = warmup_batch(bank, rows, rng, recipe.patch_size, textures=textures)
            states = tower(normalise(torch.from_numpy(imgs)), output_hidden_states=True).hidden_states
            local, feats = states[-2], states[-1]
            # what the whole image shows from the mean of the tokens; whether / where / how bright a
            # lesion is from their max (a few tokens carry it; averaging 49 of them drowns it) ...
            pooled = (feats.mean(dim=1),) * 3 + (feats.amax(dim=1),) * 2
            y = torch.from_numpy(glob)
            loss = sum(torch.nn.functional.cross_entropy(h(pooled[k]), y[:, k], ignore_index=-100)
                       for k, h in enumerate(heads) if (y[:, k] != -100).any())
            # ... and in *every* output token too, so the decoder's attention finds it anywhere
            t = feats.shape[1]
            for k in (3, 4):
                if (y[:, k] != -100).any():
                    loss = loss + torch.nn.functional.cross_entropy(
                        heads[k](feats).flatten(0, 1), y[:, k].repeat_interleave(t), ignore_index=-100)
            # where the lesion is, one layer below the output (the last layer spreads it)
            loss = loss + torch.nn.functional.cross_entropy(token_head(local).flatten(0, 1),
                                                            torch.from_numpy(toks).flatten(), weight=token_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            advance()
    return (losses, (heads, token_head)) if return_probes else losses
