"""Distillation losses on the answer tokens: temperature KL and optional hidden-state MSE.

* ``KL``: at every position that predicts an answer token (and the closing ``</s>``),
  ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al. 2015: the T² keeps gradient magnitudes
  comparable across temperatures); mean over a sample's answer positions, then over the batch, so
  a one-word answer weighs as much as a sentence (as in the demo model's training).
* ``hidden MSE``: mean squared difference of the chosen decoder layers' outputs over real tokens,
  through a learned linear projection when the widths differ (FitNets, Romero et al. 2015).
"""
from __future__ import annotations

from typing import Optional, Sequence


def forward_answers(model, batch: dict, *, hidden_layers: Sequence[int] = ()):
    """``(logits [B, A, V] at the answer positions, [hidden states of hidden_layers])`` of a Llava model.

    The language model runs on the whole sequence, ``lm_head`` only at the answer positions (the
    vocabulary projection of 800 prompt positions would dominate the cost otherwise).
    """
    out = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                      attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                      use_cache=False, output_hidden_states=bool(hidden_layers), return_dict=True)
    h = out.last_hidden_state
    pos = batch["positions"]
    picked = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    hidden = [out.hidden_states[i + 1] for i in hidden_layers] if hidden_layers else []
    return model.lm_head(picked), hidden


def kd_kl(student_logits, teacher_logits, targets, temperature: float):
    """Per-sample mean over answer positions (``targets != -100``) of ``T² KL(teacher_T ‖ student_T)``."""
    import torch

    t = float(temperature)
    log_s = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)             # [B, A]
    valid = (targets != -100).to(kl.dtype)
    per_sample = (kl * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_sample.mean() * t * t


def hidden_mse(student_hidden: Sequence, teacher_hidden: Sequence, mask, projections: Optional[Sequence] = None):
    """Mean over layers of the MSE between student and teacher hidden states at real tokens."""
    import torch

    real = mask.bool()
    total = torch.zeros((), dtype=torch.float32)
    for k, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        if projections is not None and projections[k] is not None:
            s = projections[k](s)
        total = total + ((s[real].float() - t[real].float()) ** 2).mean()
    return total / max(len(student_hidden), 1)


__all__ = ["forward_answers", "kd_kl", "hidden_mse"]
