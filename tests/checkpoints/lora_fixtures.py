"""Real peft LoRA adapters for tiny base checkpoints, made the way the training code makes them.

Format notes (what users' folders look like, reproduced here):

* ``adapter_model.safetensors`` / ``adapter_model.bin`` + ``adapter_config.json`` come from
  ``PeftModel.save_pretrained`` around a model whose module names are the base's *source* naming:
  a ``LlamaForCausalLM`` for a legacy TinyLLaVA base (``model.layers.N...``, as TinyLLaVA's
  ``TinyLlavaLlamaForCausalLM`` names its decoder), and the same LM under a ``language_model``
  attribute for a TinyLLaVA Factory base (``language_model.model.layers.N...``).
* ``non_lora_trainables.bin`` is what LLaVA's / TinyLLaVA's ``train.py`` saves with
  ``--lora_enable`` and a trainable projector: ``torch.save`` of the PeftModel's non-LoRA trainable
  parameters, named ``base_model.model.model.mm_projector.{0,2}.{weight,bias}``.

The LoRA weights are random and non-zero (peft initialises ``lora_B`` to zero, which would make
every merge a no-op and every test pass).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ckpt_reference import SourceReference, read_tensors

TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Adapter:
    folder: Path
    ref: SourceReference      # independent reference whose ``lm`` carries the (unmerged) peft LoRA layers
    projector: Optional[list] # [w0, b0, w2, b2] written to non_lora_trainables.bin (None: base projector)
    peft_model: object


def _tower(base: Path) -> Optional[Path]:
    return base / "vision_tower" if (base / "vision_tower").is_dir() else None


def make_adapter(base: Path, out: Path, *, targets=TARGETS, r: int = 4, alpha: int = 8, seed: int = 0,
                 use_dora: bool = False, binary: bool = False, non_lora: bool = True, std: float = 0.2,
                 base_name: Optional[str] = None, **lora_kw) -> Adapter:
    """Write a peft LoRA adapter for ``base`` (legacy or Factory) to ``out`` and return its reference."""
    from peft import LoraConfig, get_peft_model

    ref = SourceReference(base, tower=_tower(base))
    if ref.kind == "factory":
        wrapped = torch.nn.Module()
        wrapped.language_model = ref.lm   # Factory: TinyLlavaForConditionalGeneration.language_model
        wrapped.config = ref.lm.config
    else:
        wrapped = ref.lm                  # legacy: the LlamaForCausalLM names are TinyLLaVA's
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.05, use_dora=use_dora,
                     **lora_kw)
    pm = get_peft_model(wrapped, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))
    pm.eval()
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(out), safe_serialization=not binary)
    conf_file = out / "adapter_config.json"
    conf = json.loads(conf_file.read_text())
    conf["base_model_name_or_path"] = base_name if base_name is not None else "bczhou/tiny-llava-v1-hf"
    conf_file.write_text(json.dumps(conf, indent=2))
    projector = None
    if non_lora:
        sd = read_tensors(base)
        names = (["model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                  "model.mm_projector.2.bias"] if ref.kind == "legacy" else
                 ["connector._connector.0.weight", "connector._connector.0.bias", "connector._connector.2.weight",
                  "connector._connector.2.bias"])
        projector = [sd[n] + 0.3 * torch.randn(sd[n].shape, generator=gen) for n in names]
        # LLaVA's get_peft_state_non_lora_maybe_zero_3(model.named_parameters()) names, fp16 as trained
        torch.save({"base_model.model." + n: t.to(torch.float16) for n, t in zip(names, projector)},
                   out / "non_lora_trainables.bin")
        projector = [t.to(torch.float16).float() for t in projector]
        ref.proj = projector
    return Adapter(out, ref, projector, pm)


def rewrite_adapter(folder: Path, fn) -> None:
    """Apply ``fn(dict name → tensor) -> dict`` to adapter_model.safetensors (for error-case fixtures)."""
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in fn(load_file(str(f))).items()}, str(f), metadata={"format": "pt"})
