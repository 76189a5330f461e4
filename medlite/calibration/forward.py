"""The framework's calibration forward loop: medical image + question pairs through the whole VLM.

Every compress stage (quantize, prune, distill) sees the language model's inputs the same way the
deployed model does: pixels → vision tower → projector → spliced at the expanded ``<image>``
positions of the rendered prompt → language model. Stages attach their observers / forward hooks to
the model and call :meth:`ForwardLoop.run` (or iterate :meth:`ForwardLoop.batches` for the inputs).

Why not let each library (llm-compressor, onnxruntime.quantization) drive its own loop: their loops
feed text-only ``input_ids``, so a VLM's language model would be calibrated without image tokens —
729 of the ~800 positions of a TinyLLaVA-Med prompt. The splice here is the same one
``LlavaForConditionalGeneration`` does (tested against it: tests/calibration/test_forward.py).

Batches are left-padded (the runtime's layout) with per-row positions, so a row's results do not
depend on which other rows share its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from medlite.checkpoints.generate import image_features, prompt_ids, splice_image_embeds
from medlite.devices import model_device, to_device


@dataclass
class VlmInputs:
    """One batch of samples as the language model sees them (tensors on CPU, no gradient)."""

    samples: list                    # medlite VqaSample, one per row
    pixel_values: Any                # [B, 3, S, S] in the model's dtype
    input_ids: Any                   # [B, T] int64, <image> expanded to num_image_tokens ids, left-padded
    attention_mask: Any              # [B, T] int64, 1 = real token
    position_ids: Any                # [B, T] int64, 0.. per row (0 on padding)
    image_embeds: Any                # [B, n_img, H] projector output
    inputs_embeds: Any               # [B, T, H] token embeddings with image_embeds spliced in
    image_positions: Any             # [B, T] bool, True where an image embedding sits

    def __len__(self) -> int:
        return len(self.samples)


def image_key(sample) -> tuple:
    """Which samples share one image (in this process), so it is decoded and encoded once.

    Not ``image_id``: that names the *source* image, and rendered views of one source (Micro Med-VQA)
    share it while their pixels differ; samples of one view share their ``image_fn`` object.
    """
    if sample.image_path is not None:
        return ("path", str(sample.image_path))
    return ("fn", id(sample.image_fn))


def distinct_images(samples: Sequence) -> list:
    """One sample per distinct image (first occurrence, by :func:`image_key`), in order.

    Keyed on the file or the rendering function, not ``image_id``: rendered views of one source image
    share its id while their pixels differ (keying on the id calibrated the demo model's vision graph
    on 8 images instead of its 120 views).
    """
    seen, out = set(), []
    for s in samples:
        key = image_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


class ForwardLoop:
    """Calibration samples → :class:`VlmInputs` batches → the language model, with progress.

    ``loaded`` supplies the processor (tokenizer, template, image spec); the weights come from the
    ``model`` passed to :meth:`batches` / :meth:`run` (the working model of a build, which may be
    pruned or quantized), defaulting to ``loaded.model``.
    """

    def __init__(self, loaded, samples: Sequence, *, batch_size: int = 8, ctx=None,
                 description: str = "calibration forward", equal_length: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.loaded, self.samples, self.batch_size = loaded, list(samples), int(batch_size)
        self.ctx, self.description = ctx, description
        # batches of one prompt length (no padding): observers then see only positions the
        # deployed model computes for real, at the cost of smaller batches
        self.equal_length = bool(equal_length)
        self._images: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, sample):
        key = image_key(sample)
        if key not in self._images:
            self._images[key] = sample.load_image()
        return self._images[key]

    def _token_rows(self, chunk) -> tuple[list[list[int]], int]:
        rows = [prompt_ids(self.loaded, s.question) for s in chunk]
        return rows, max(len(r) for r in rows)

    def batch(self, chunk: Sequence, model=None) -> VlmInputs:
        """The inputs of one batch of samples (computed with ``model``'s weights, no gradient)."""
        import torch

        from medlite.preprocess import preprocess

        model = self.loaded.model if model is None else model
        dtype = next(model.parameters()).dtype
        rows, width = self._token_rows(chunk)
        pad = self.loaded.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        pixels = torch.from_numpy(preprocess([self._image(s) for s in chunk], self.loaded.image_spec)).to(dtype)
        # A model placed on a GPU (--device) gets its inputs there; on the CPU these are the same tensors.
        ids, mask, pos, pixels = to_device(model_device(model), ids, mask, pos, pixels)
        with torch.no_grad():
            img = image_features(model, pixels)
            embeds, where = splice_image_embeds(model, ids, img, self.loaded.image_token_id)
        return VlmInputs(list(chunk), pixels, ids, mask, pos, img, embeds, where)

    def chunks(self) -> list[list]:
        """The samples as batches: in order, ``batch_size`` at a time, or with ``equal_length`` grouped
        by prompt length (shortest first, at most ``batch_size`` each) so no row is padded."""
        if not self.equal_length:
            return [self.samples[i:i + self.batch_size] for i in range(0, len(self.samples), self.batch_size)]
        by_len: dict[int, list] = {}
        for s in self.samples:
            by_len.setdefault(len(prompt_ids(self.loaded, s.question)), []).append(s)
        return [group[i:i + self.batch_size] for n in sorted(by_len)
                for group in [by_len[n]] for i in range(0, len(group), self.batch_size)]

    def batches(self, model=None) -> Iterator[VlmInputs]:
        """Every sample once, as :meth:`chunks` groups them."""
        for chunk in self.chunks():
            yield self.batch(chunk, model)

    def run_images(self, model=None) -> int:
        """Encode each distinct image of the samples once (vision tower + projector), no language model.

        For observers that only watch the vision side (vision SmoothQuant's per-channel absmax, which
        repeats of an image cannot change): the whole-VLM :meth:`run` would also push ~800 positions
        per pair through the language model — at full size 1.7 of its 2.3 TFLOP per pair — and encode
        an image once per question. Returns the number of images encoded.
        """
        import torch

        from medlite.preprocess import preprocess

        model = self.loaded.model if model is None else model
        dtype = next(model.parameters()).dtype
        imgs = distinct_images(self.samples)
        progress = self.ctx.progress(self.description, total=len(imgs)) if self.ctx else None
        advance = progress.__enter__() if progress else (lambda n=1: None)
        try:
            for i in range(0, len(imgs), self.batch_size):
                chunk = imgs[i:i + self.batch_size]
                pixels = torch.from_numpy(preprocess([self._image(s) for s in chunk], self.loaded.image_spec)).to(dtype)
                pixels = to_device(model_device(model), pixels)
                with torch.no_grad():
                    image_features(model, pixels)
                advance(len(chunk))
        finally:
            if progress:
                progress.__exit__(None, None, None)
        return len(imgs)

    def run(self, model=None, *, on_batch: Optional[Callable[[VlmInputs, Any], None]] = None,
            lm_head: bool = True) -> int:
        """Forward every batch through the language model (and ``lm_head``) without gradients.

        Hooks the caller registered on ``model`` see real image tokens. ``on_batch(inputs, logits)``
        is called after each batch (``logits`` is None when ``lm_head`` is False). Returns the
        number of samples run.
        """
        import torch

        model = self.loaded.model if model is None else model
        done = 0
        progress = self.ctx.progress(self.description, total=len(self.samples)) if self.ctx else None
        advance = progress.__enter__() if progress else (lambda n=1: None)
        try:
            for inp in self.batches(model):
                with torch.no_grad():
                    out = model.model.language_model(inputs_embeds=inp.inputs_embeds,
                                                     attention_mask=inp.attention_mask,
                                                     position_ids=inp.position_ids, use_cache=False,
                                                     return_dict=True)
                    logits = model.lm_head(out.last_hidden_state) if lm_head else None
                if on_batch is not None:
                    on_batch(inp, logits)
                done += len(inp)
                advance(len(inp))
        finally:
            if progress:
                progress.__exit__(None, None, None)
        return done


__all__ = ["ForwardLoop", "VlmInputs", "distinct_images", "image_features", "image_key", "splice_image_embeds"]
