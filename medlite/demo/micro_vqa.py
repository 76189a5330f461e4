"""Micro Med-VQA: closed (yes/no) questions generated from the built-in real medical images.

The set exists so that the built-in demo model can be trained and every build can be gated on a
*medical* accuracy number without downloading anything. Every question is about a real clinical
image from :func:`medlite.imaging.builtin.builtin_images`:

* ``modality`` – "Is this a CT scan?", asked about the true modality and about a wrong one;
* ``region``   – "Is this an image of the chest?" (true region / a wrong one; sources whose region
  is unknown get no region question). *Training split only*: the built-in set has one source per
  region, except head and abdomen (each once as CT and once as MR) and eye (a colour and a
  greyscale fundus), so a region on an unseen source cannot be learned from it — a held-out region
  score would only measure which training source the image resembles;
* ``colour``   – "Is this a colour image?" / "Is this a greyscale image?";
* ``lesion``, ``lesion_side``, ``lesion_brightness`` – a synthetic round lesion (bright or dark,
  blended into the anatomy at a known place) is inserted into half of the views: "Is there a
  lesion?", "Is the lesion on the left side of the image?", "Is the lesion bright?".

Every view is an augmentation of one source image (square pad, small rotation, random crop,
horizontal flip, contrast/brightness/gamma) made at the model's input size, lazily, by the
sample's ``image_fn``. The lesion is drawn *after* the geometric augmentation, so flips can never
contradict a left/right answer.

Split: by source image (``image_id``); all frames of a multi-frame source stay on one side.
:data:`TEST_SOURCES` is fixed (not seeded) so that every modality is in the training split and the
held-out images test generalisation to *unseen* images of seen modalities. Each question type is
exactly balanced between "Yes" and "No" (checked before returning). Everything is a pure function
of ``(split, seed)``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from medlite.demo.lesions import Lesion, Placement, add_lesion
from medlite.evaluation.samples import CLOSED, VqaSample
from medlite.imaging.types import MedImage
from medlite.errors import DataError

IMAGE_SIZE = 56             # the demo model's input size; views are rendered at this size
VERSION = "micro-med-vqa/7"  # bump when anything below changes the generated data

# One held-out source per modality that has >= 2 sources, chosen so that its modality (and where
# possible its region) is also represented in training: CT abdomen (train: CT head/spine, MR
# abdomen), MR brain EPI (train: three other MR, CT head), obstetric US (train: echo, Doppler),
# tibia radiograph (train: chest radiograph). NM and pathology have a single source: train only.
TEST_SOURCES = ("ct-abdomen", "mr-brain-epi", "us-obstetric", "cr-tibia")
VIEWS_PER_SOURCE = {"train": 72, "test": 30}

MODALITY_NAMES = {"CT": "CT scan", "MR": "MRI scan", "CR": "X-ray", "US": "ultrasound image",
                  "NM": "nuclear medicine scan", "fundus": "fundus photograph", "pathology": "pathology slide"}
REGION_PHRASES = {"chest": "the chest", "lower leg": "the lower leg", "head": "the head", "spine": "the spine",
                  "abdomen": "the abdomen", "shoulder": "the shoulder", "lymph node": "a lymph node",
                  "pelvis": "the pelvis", "heart": "the heart", "whole body": "the whole body",
                  "eye": "the eye", "colon": "the colon"}
QUESTION_TYPES = ("modality", "region", "colour", "lesion", "lesion_side", "lesion_brightness")

# (question for a "Yes"-seeking draw, question for a "No"-seeking draw) is decided per sample; the
# paraphrases make the language side less brittle.
_MODALITY_Q = ("Is this a {m}?", "Is this image a {m}?")
_REGION_Q = ("Is this an image of {r}?", "Does this image show {r}?")
_COLOUR_Q = {"colour": ("Is this a colour image?", "Is the image in colour?"),
             "grey": ("Is this a greyscale image?", "Is the image black and white?")}
_LESION_Q = ("Is there a lesion?", "Is there a lesion in this image?", "Does this image show a lesion?")
_SIDE_Q = {"left": ("Is the lesion on the left side of the image?", "Is the lesion in the left half?"),
           "right": ("Is the lesion on the right side of the image?", "Is the lesion in the right half?")}
_BRIGHT_Q = {"bright": ("Is the lesion bright?", "Is the lesion brighter than its surroundings?"),
             "dark": ("Is the lesion dark?", "Is the lesion darker than its surroundings?")}


def question_templates() -> list[str]:
    """Every question the generator can ask (the demo tokenizer is trained on these)."""
    out = [q.format(m=m) for q in _MODALITY_Q for m in MODALITY_NAMES.values()]
    out += [q.format(r=r) for q in _REGION_Q for r in REGION_PHRASES.values()]
    for table in (_COLOUR_Q, _SIDE_Q, _BRIGHT_Q):
        out += [q for qs in table.values() for q in qs]
    return out + list(_LESION_Q)


def _rng(*parts) -> np.random.Generator:
    """A generator seeded by a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    key = "/".join(str(p) for p in parts).encode()
    return np.random.default_rng([zlib.crc32(key), zlib.adler32(key)])


@dataclass(frozen=True)
class View:
    """One augmented rendering of one source frame (the unit the questions are asked about)."""

    key: str
    source_index: int           # index into the builtin_images() list
    seed: int
    lesion: Optional[Lesion]


class SourceBank:
    """Built-in images decoded once per :func:`micro_med_vqa` call, downscaled for cheap views."""

    WORK_SIZE = 288  # longest side kept for augmentation (2.5x the output size: crops stay sharp)

    def __init__(self, images: list[MedImage]):
        self.images = images
        self._arrays: dict[int, np.ndarray] = {}

    def array(self, index: int) -> np.ndarray:
        """The source as float32 ``[H, W, 3]`` in 0..255, longest side <= WORK_SIZE."""
        if index not in self._arrays:
            from PIL import Image

            img = self.images[index].load().convert("RGB")
            img.thumbnail((self.WORK_SIZE, self.WORK_SIZE), Image.Resampling.LANCZOS)
            self._arrays[index] = np.asarray(img, dtype=np.float32)
        return self._arrays[index]


def _geometric(arr: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Pad to square with the border colour, rotate ±10°, crop 70–100 %, resize, maybe flip."""
    from PIL import Image

    h, w, _ = arr.shape
    border = np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0)
    side = max(h, w)
    sq = np.empty((side, side, 3), np.float32)
    sq[:] = border
    sq[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = arr
    fill = tuple(int(round(v)) for v in border)
    img = Image.fromarray(sq.round().astype(np.uint8)).rotate(float(rng.uniform(-10, 10)),
                                                              resample=Image.Resampling.BICUBIC, fillcolor=fill)
    crop = int(round(side * rng.uniform(0.7, 1.0)))
    x0, y0 = (int(rng.integers(0, side - crop + 1)) for _ in range(2))
    img = img.crop((x0, y0, x0 + crop, y0 + crop)).resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


def _photometric(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma 0.85–1.15, contrast 0.8–1.2 about mid-grey, brightness ±20 (same on every channel)."""
    gamma, contrast, shift = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    out = 255.0 * (arr / 255.0) ** gamma
    return np.clip((out - 128.0) * contrast + 128.0 + shift, 0, 255)


def _to_image(arr: np.ndarray, is_color: bool):
    from PIL import Image

    if not is_color:
        arr = np.repeat(arr.mean(axis=2, keepdims=True), 3, axis=2)  # stay exactly grey
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


def _render_both(view: View, bank: SourceBank, size: int):
    """``(image without lesion, placement or None, image as the samples show it)``."""
    rng = _rng("view", view.seed, view.key)
    arr = _photometric(_geometric(bank.array(view.source_index), rng, size), rng)
    is_color = bank.images[view.source_index].is_color
    clean = _to_image(arr, is_color)
    if view.lesion is None:
        return clean, None, clean
    drawn, placement = add_lesion(arr, view.lesion, rng)
    return clean, placement, _to_image(drawn, is_color)


def render_view(view: View, bank: SourceBank, *, size: int = IMAGE_SIZE, with_lesion: bool = True):
    """Render a view: ``(PIL RGB image, Placement or None)``.

    ``with_lesion=False`` renders the identical view without its lesion (used by tests to check
    that the lesion really is where the answers say).
    """
    clean, placement, shown = _render_both(view, bank, size)
    return (shown if with_lesion else clean), placement


class _Balancer:
    """Alternates the wanted answer per question type (random start) so each type is 50/50."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.next: dict[str, bool] = {}

    def want_yes(self, qtype: str) -> bool:
        cur = self.next.get(qtype, bool(self.rng.random() < 0.5))
        self.next[qtype] = not cur
        return cur


def dark_lesions_possible(bank: SourceBank, indices: list[int]) -> bool:
    """Whether a dark lesion can show on this source: >= 10 % of its pixels have grey >= 90.

    Mostly black sources (echocardiography, the obstetric scan) get bright lesions only: a dark
    disc on an empty background would be invisible, and its "Yes" answer a label error.
    """
    return min(float((bank.array(i).mean(axis=2) >= 90).mean()) for i in indices) >= 0.10


def plan_views(images: list[MedImage], bank: SourceBank, split: str, seed: int) -> list[View]:
    """All views of ``split``; half carry a lesion (alternating), sides and polarity balanced."""
    by_source: dict[str, list[int]] = {}
    for i, im in enumerate(images):
        by_source.setdefault(im.image_id, []).append(i)
    unknown = sorted(set(TEST_SOURCES) - set(by_source))
    if unknown:
        raise DataError(f"Micro Med-VQA test sources {unknown} are not in the built-in image set")
    ids = [s for s in by_source if (s in TEST_SOURCES) == (split == "test")]
    rng = _rng("plan", seed, split)
    views: list[View] = []
    for sid in ids:
        frames = by_source[sid]
        offset = int(rng.integers(4))
        dark_ok = dark_lesions_possible(bank, frames)
        for k in range(VIEWS_PER_SOURCE[split]):
            lesion = None
            if k % 2 == 1:  # every other view of each source has a lesion; the 4 (side, polarity)
                j = k // 2 + offset  # combinations cycle so both are balanced and independent
                lesion = Lesion(side="left" if j % 2 == 0 else "right", bright=(j // 2) % 2 == 0 or not dark_ok)
            views.append(View(f"{sid}/f{images[frames[k % len(frames)]].frame}/v{k:03d}",
                              frames[k % len(frames)], seed, lesion))
    return views


def _questions(view: View, img: MedImage, regions: list[str], bal: _Balancer,
               rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(question_type, question, answer)`` rows for one view, answers drawn by the balancer.

    ``regions`` are the regions asked about (as the true or the wrong one): none on held-out images.
    """
    pick = lambda qs: qs[int(rng.integers(len(qs)))]  # noqa: E731
    rows = []
    want = bal.want_yes("modality")
    other = [m for m in MODALITY_NAMES if m != img.modality]
    mod = img.modality if want else other[int(rng.integers(len(other)))]
    rows.append(("modality", pick(_MODALITY_Q).format(m=MODALITY_NAMES[mod]), want))
    if img.region in regions:
        want = bal.want_yes("region")
        other = [r for r in regions if r != img.region]
        reg = img.region if want else other[int(rng.integers(len(other)))]
        rows.append(("region", pick(_REGION_Q).format(r=REGION_PHRASES[reg]), want))
    want = bal.want_yes("colour")
    asked = ("colour" if img.is_color else "grey") if want else ("grey" if img.is_color else "colour")
    rows.append(("colour", pick(_COLOUR_Q[asked]), want))
    rows.append(("lesion", pick(_LESION_Q), view.lesion is not None))
    if view.lesion is not None:
        want = bal.want_yes("lesion_side")
        asked = view.lesion.side if want else ("right" if view.lesion.side == "left" else "left")
        rows.append(("lesion_side", pick(_SIDE_Q[asked]), want))
        want = bal.want_yes("lesion_brightness")
        asked = ("bright" if view.lesion.bright else "dark") if want else ("dark" if view.lesion.bright else "bright")
        rows.append(("lesion_brightness", pick(_BRIGHT_Q[asked]), want))
    return [(t, q, "Yes" if a else "No") for t, q, a in rows]


def check_balanced(samples: list[VqaSample]) -> dict[str, tuple[int, int]]:
    """``{question_type: (yes, no)}``; DataError when a type is off balance by more than one."""
    counts: dict[str, list[int]] = {}
    for s in samples:
        c = counts.setdefault(dict(s.meta)["question_type"], [0, 0])
        c[0 if s.answer == "Yes" else 1] += 1
    for t, (y, n) in counts.items():
        if abs(y - n) > 1:
            raise DataError(f"Micro Med-VQA: question type {t!r} is unbalanced ({y} yes / {n} no)")
    return {t: (y, n) for t, (y, n) in counts.items()}


def micro_med_vqa(split: str = "train", *, seed: int = 0, ctx=None, size: int = IMAGE_SIZE) -> list[VqaSample]:
    """The Micro Med-VQA ``split`` ("train", "test" or "all") as closed yes/no :class:`VqaSample` s.

    Images are rendered lazily at ``size`` × ``size`` by each sample's ``image_fn`` (all questions
    about one view share one cached rendering). Deterministic for ``(split, seed)``; train and test
    are disjoint by ``image_id``; every question type is balanced between "Yes" and "No".
    """
    if split not in VIEWS_PER_SOURCE and split != "all":
        raise DataError(f"Micro Med-VQA has splits 'train', 'test' and 'all', not {split!r}")
    from medlite.imaging.builtin import builtin_images

    if split == "all":
        return (micro_med_vqa("train", seed=seed, ctx=ctx, size=size)
                + micro_med_vqa("test", seed=seed, ctx=ctx, size=size))
    images = builtin_images(strict=True, ctx=ctx)
    bank = SourceBank(images)
    regions = [] if split == "test" else sorted({im.region for im in images} & set(REGION_PHRASES))
    bal, rng = _Balancer(_rng("answers", seed, split)), _rng("questions", seed, split)
    samples: list[VqaSample] = []
    for view in plan_views(images, bank, split, seed):
        img = images[view.source_index]
        image_fn = ViewImage(view, bank, size)
        for qtype, question, answer in _questions(view, img, regions, bal, rng):
            meta = (("question_type", qtype), ("view", view.key), ("source", img.source), ("dataset", VERSION),
                    ("is_color", img.is_color))
            if view.lesion is not None:
                meta += (("lesion_side", view.lesion.side), ("lesion_bright", view.lesion.bright))
            samples.append(VqaSample(qid=f"mvqa-{split}-{view.key}-{qtype}", question=question, answer=answer,
                                     answer_type=CLOSED, image_id=img.image_id, modality=img.modality,
                                     region=img.region, image_fn=image_fn, meta=meta))
    check_balanced(samples)
    return samples


class ViewImage:
    """The ``image_fn`` of the samples of one view: renders once, hands out copies.

    ``placement()`` says where the view's lesion was drawn (None without one) and ``background()``
    is the same view without it, for training code (the demo model's vision warm-up) and tests.
    """

    def __init__(self, view: View, bank: SourceBank, size: int):
        self.view, self.bank, self.size = view, bank, size
        self._rendered = None

    def _render(self):
        if self._rendered is None:
            self._rendered = _render_both(self.view, self.bank, self.size)
        return self._rendered

    def __call__(self):
        return self._render()[2].copy()

    def placement(self) -> Optional[Placement]:
        return self._render()[1]

    def background(self):
        """The view without its lesion (PIL RGB)."""
        return self._render()[0].copy()

    @property
    def is_color(self) -> bool:
        return self.bank.images[self.view.source_index].is_color
