"""LoRA adapters on the language model for distillation (peft), merged into the weights before the stage returns.

Full fine-tuning of TinyLlama-1.1B needs its AdamW state beside it (~13 GB in fp32); rank-r adapters
on the seven projections of every decoder layer train ``2·r·(in + out)`` parameters per matrix
instead. After training each adapter is merged (``W + (α/r)·B·A``) and the wrapper replaced by its
base ``nn.Linear`` again, so the exported graphs, the weight names and every later stage see a plain
model of the original classes (peft's ``merge(safe_merge=True)`` refuses a merge that produces NaN).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _present(root) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in root.named_modules()}
    return [t for t in TARGETS if t in names]


@contextlib.contextmanager
def lora_adapters(language_model, *, rank: int, alpha: float, seed: int) -> Iterator[int]:
    """Adapters of ``rank`` on ``language_model``'s projections for the duration of the block (yields their
    parameter count); merged into the base weights on exit, whatever happened inside."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    grads = {n: p.requires_grad for n, p in language_model.named_parameters()}
    cpu_rng = torch.get_rng_state()
    torch.manual_seed(int(seed))           # the adapters' A matrices are random: seeded, resumable
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                     target_modules=_present(language_model))
    inject_adapter_in_model(cfg, language_model)
    torch.set_rng_state(cpu_rng)
    try:
        yield sum(p.numel() for n, p in language_model.named_parameters() if "lora_" in n)
    finally:
        merge_lora(language_model)
        for n, p in language_model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))


def merge_lora(root) -> int:
    """Merge every LoRA layer under ``root`` into its base layer and put the base layer back; returns the count."""
    import torch
    from peft.tuners.lora import LoraLayer

    merged = 0
    with torch.no_grad():
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.merge(safe_merge=True)
                    setattr(parent, name, child.get_base_layer())
                    merged += 1
    return merged


__all__ = ["lora_adapters", "merge_lora", "TARGETS"]
