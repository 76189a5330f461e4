"""Distillation data: calibration pairs (+ extra training VQA sets) with the teacher's greedy answers.

Every example is ``prompt (image expanded) + teacher answer``; the loss positions are the ones that
predict the answer tokens and the closing ``</s>``. The answer text comes from the PyTorch
reference generation (:func:`medlite.checkpoints.generate.answer_batch`, greedy) and is re-encoded
with the model's tokenizer; since the loss is a KL against the teacher's own distribution at each
position, the sequence only has to be a sensible continuation, not the teacher's exact ids.

Leakage is checked twice: recipe rules refuse the evaluation split by name, and here no training
image may be an image of the evaluation samples (``image_id``) — a :class:`DataError` names one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from medlite.errors import DataError


@dataclass
class Example:
    """One distillation sequence."""

    sample: object            # VqaSample
    answer: str               # the teacher's answer
    prompt: list              # prompt ids, image token expanded
    answer_ids: list          # answer ids + eos (the targets)


def extra_samples(opts, *, ctx) -> list:
    """Samples of the recipe's extra data sets (training splits; rules refuse evaluation splits)."""
    from medlite.evaluation.vqa import load_dataset

    out = []
    for d in opts.datasets:
        got = load_dataset(d.dataset, images_dir=d.images, split=d.split)
        if d.max_samples is not None:
            got = [got[(i * len(got)) // d.max_samples] for i in range(min(d.max_samples, len(got)))]
        ctx.info(f"  distill: {len(got)} samples from {d.dataset} ({d.split})")
        out += got
    return out


def check_disjoint(train: Sequence, eval_samples: Sequence) -> None:
    """A :class:`DataError` when a training sample's image is an evaluation image."""
    ev = {s.image_id for s in eval_samples}
    bad = [s for s in train if s.image_id in ev]
    if bad:
        raise DataError(f"distill: {len(bad)} training sample(s) show evaluation images (e.g. qid {bad[0].qid}, "
                        f"image {bad[0].image_id}): the gates must run on images the student never trained on")


def unique(samples: Sequence) -> list:
    """Samples without repeated qids (the calibration set and an extra set may share some)."""
    seen, out = set(), []
    for s in samples:
        if s.qid not in seen:
            seen.add(s.qid)
            out.append(s)
    return out


def teacher_answers(teacher, samples: Sequence, *, ctx, max_new_tokens: int, batch_size: int = 16,
                    description: str = "distill: teacher answers") -> list[str]:
    """Greedy answers of the teacher (batched, equal to ``answer`` row by row)."""
    from medlite.checkpoints.generate import answer_batch

    out: list[str] = []
    with ctx.progress(description, total=len(samples)) as advance:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            out += answer_batch(teacher, [s.load_image() for s in chunk], [s.question for s in chunk],
                                max_new_tokens=max_new_tokens)
            advance(len(chunk))
    return out


def encode(loaded, sample, answer: str) -> Example:
    """The example of ``sample`` answered ``answer``."""
    from medlite.checkpoints.generate import prompt_ids

    ans = loaded.tokenizer.encode(answer, add_special_tokens=False).ids if answer else []
    return Example(sample, answer, prompt_ids(loaded, sample.question), list(ans) + [loaded.eos_token_ids[0]])


def data_key(examples: Sequence[Example]) -> str:
    """sha256 over every example's qid, image id and token ids (part of a resumable run's key)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.sample.qid, e.sample.image_id, e.prompt, e.answer_ids)).encode())
    return h.hexdigest()


class Batches:
    """Examples → left-padded model inputs (pixels decoded and preprocessed once per image)."""

    def __init__(self, loaded, examples: Sequence[Example]):
        self.loaded, self.examples = loaded, list(examples)
        self._pixels: dict = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _pixel(self, sample):
        import torch

        from medlite.preprocess import preprocess

        # keyed like ForwardLoop: views of one source image share image_id but not pixels
        key = ("path", str(sample.image_path)) if sample.image_path is not None else ("fn", id(sample.image_fn))
        if key not in self._pixels:
            self._pixels[key] = torch.from_numpy(preprocess([sample.load_image()], self.loaded.image_spec))[0]
        return self._pixels[key]

    def batch(self, indices: Sequence[int], dtype) -> dict:
        """``input_ids, attention_mask, position_ids, pixel_values`` and the loss positions.

        ``targets [B, A]`` are the answer ids (``-100`` padding), ``positions [B, A]`` the index of
        the logit predicting each of them (0 where padded).
        """
        import torch

        exs = [self.examples[i] for i in indices]
        rows = [e.prompt + e.answer_ids[:-1] for e in exs]
        width = max(len(r) for r in rows)
        n_ans = max(len(e.answer_ids) for e in exs)
        pad = self.loaded.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        targets = torch.full((len(exs), n_ans), -100, dtype=torch.long)
        positions = torch.zeros((len(exs), n_ans), dtype=torch.long)
        for b, (e, r) in enumerate(zip(exs, rows)):
            start = width - len(r) + len(e.prompt) - 1      # the last prompt token predicts answer[0]
            k = len(e.answer_ids)
            targets[b, :k] = torch.tensor(e.answer_ids)
            positions[b, :k] = torch.arange(start, start + k)
        pixels = torch.stack([self._pixel(e.sample) for e in exs]).to(dtype)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                "pixel_values": pixels, "targets": targets, "positions": positions}


__all__ = ["Example", "Batches", "extra_samples", "check_disjoint", "teacher_answers", "encode", "data_key",
           "unique"]
