"""A vision graph judged by what the answer sees: first-answer-token KL of the whole VLM.

The image-embedding cosine of a quantized vision tower says little about the answers: on the demo
model every INT8 vision layer keeps the cosine above 0.9998, yet the same graph moves the first
answer token enough to flip near-tie questions (docs/quantization-int8.md, "Sensitivity"). So the
vision graph's held-out metric runs the candidate graph on the held-out images, splices its
embeddings into the held-out prompts and runs the working model's language model (PyTorch, fp32):

* ``tie_kl`` (the loss) — mean δ²/8, δ the shift of the fp32 top-2 first-token gap: the KL a near
  tie would see (:func:`medlite.compress.int8.sensitivity.answer_metrics` says why);
* ``mean_kl`` — mean KL(fp32 graph ‖ candidate) of the first answer token's distribution;
* ``top1_agreement`` — fraction of rows whose first answer token is unchanged;
* ``cosine`` — mean cosine of the projected image embeddings against the fp32 graph.

The reference is the same procedure with the fp32 graph, so only the vision graph differs. Each
distinct image is encoded once per candidate (the prompts that ask about it reuse it).
"""
from __future__ import annotations

from pathlib import Path
import numpy as np

from medlite.compress.int8.sensitivity import GraphMetric, HeldOut, answer_metrics


class VisionAnswerHeldOut:
    """Held-out rows of the whole VLM with a candidate vision graph (see the module docstring)."""

    graph = "vision"

    def __init__(self, fp32_path: Path, loop, model):
        """``loop``: a ForwardLoop over held-out samples (left-padded batches); ``model``: the working
        Llava model whose language model and ``lm_head`` produce the answer token."""
        from medlite.calibration.forward import image_key

        self.model = model
        self.batches = []
        for inp in loop.batches(model):
            keys = [image_key(s) for s in inp.samples]
            uniq = list(dict.fromkeys(keys))
            first = [keys.index(k) for k in uniq]
            pixels = inp.pixel_values.float().numpy()[first]
            self.batches.append((inp, np.ascontiguousarray(pixels), [uniq.index(k) for k in keys]))
        self.ref_embeds, self.ref_logits = self._outputs(fp32_path)

    def _outputs(self, path: Path) -> tuple[list, list]:
        import torch

        sess = HeldOut._session(path)
        name = sess.get_outputs()[0].name
        embeds, logits = [], []
        for inp, pixels, rows in self.batches:
            (img,) = sess.run([name], {sess.get_inputs()[0].name: pixels})
            embeds.append(img.astype(np.float64))
            spliced = inp.inputs_embeds.clone()
            per_row = torch.from_numpy(img[rows]).to(spliced.dtype)
            spliced[inp.image_positions] = per_row.reshape(-1, per_row.shape[-1])
            with torch.no_grad():
                out = self.model.model.language_model(inputs_embeds=spliced, attention_mask=inp.attention_mask,
                                                      position_ids=inp.position_ids, use_cache=False,
                                                      return_dict=True)
                logits.append(self.model.lm_head(out.last_hidden_state[:, -1]).double().numpy())
        return embeds, logits

    def metric(self, path: Path) -> GraphMetric:
        """The candidate vision graph's metric against the fp32 graph (smaller ``loss`` = closer)."""
        from medlite.checks import mean_cosine

        embeds, logits = self._outputs(path)
        cos = float(np.mean([mean_cosine(r.reshape(-1, r.shape[-1]), c.reshape(-1, c.shape[-1]))
                             for r, c in zip(self.ref_embeds, embeds)]))
        return answer_metrics(self.ref_logits, logits, cosine=cos)


__all__ = ["VisionAnswerHeldOut"]
