"""An independent reference forward for source checkpoints, written for the tests.

It reads the source tensors itself (safetensors ``safe_open``), builds transformers' plain
``SiglipVisionModel`` and ``*ForCausalLM`` from them, and does the rest in its own code, the way the
original TinyLLaVA / Factory code does it:

* layer selection: legacy = ``hidden_states[-1]`` of the (already cut) tower; Factory =
  ``hidden_states[vision_feature_layer]`` then ``[:, 1:]`` for "patch"; HF = its config;
* projector: ``Linear → exact GELU → Linear`` with the source's ``mm_projector.{0,2}`` /
  ``connector._connector.{0,2}`` weights;
* splice: the prompt is split at ``<image>``, each chunk tokenized alone, and the image features are
  concatenated between the chunk embeddings (LLaVA's ``prepare_inputs_labels_for_multimodal``).

Nothing here uses medlite's loader, key maps or canonical model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).float()
    return out


def expand2square(img: Image.Image, background) -> Image.Image:
    """LLaVA mm_utils.expand2square, as written there."""
    w, h = img.size
    if w == h:
        return img
    if w > h:
        result = Image.new(img.mode, (w, w), background)
        result.paste(img, (0, (w - h) // 2))
        return result
    result = Image.new(img.mode, (h, h), background)
    result.paste(img, ((h - w) // 2, 0))
    return result


def reference_pixels(img: Image.Image, size: int, *, pad: bool) -> torch.Tensor:
    """transformers' SiglipImageProcessor (+ expand2square when the checkpoint pads)."""
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = img.convert("RGB")
    if pad:
        img = expand2square(img, tuple(int(x * 255) for x in proc.image_mean))
    return proc(images=img, return_tensors="pt")["pixel_values"].float()


def _causal_lm(cfg_dict: dict, sd: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig, Qwen2Config, StableLmConfig

    mt = cfg_dict["model_type"]
    cls = {"llama": LlamaConfig, "phi": PhiConfig, "qwen2": Qwen2Config, "stablelm": StableLmConfig}[mt]
    fields = {k: v for k, v in cfg_dict.items()
              if not k.startswith("mm_") and k not in ("model_type", "architectures", "torch_dtype", "dtype")}
    cfg = cls.from_dict(fields)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if cfg.tie_word_embeddings:
        lm.tie_weights()
    return lm


def _siglip(vcfg: dict, sd: dict, layers: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    keep = {k: vcfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size",
                                 "patch_size", "hidden_act", "layer_norm_eps") if k in vcfg}
    vm = SiglipVisionModel(SiglipVisionConfig(**keep, num_hidden_layers=layers, vision_use_head=False)).eval()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd = {k: v for k, v in sd.items() if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= layers)}
    vm.load_state_dict(sd, strict=True)
    return vm


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


class SourceReference:
    """Reference model for a legacy / factory / hf folder (``tower``: a legacy --vision-tower copy)."""

    def __init__(self, folder, *, tower=None, vision_from: str = "checkpoint"):
        folder = Path(folder)
        self.cfg = cfg = json.loads((folder / "config.json").read_text())
        sd = read_tensors(folder)
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if "mm_vision_tower" in cfg:  # legacy TinyLLaVA
            self.kind = "legacy"
            text_cfg = {**cfg, "model_type": {"tiny_llava": "llama"}.get(cfg["model_type"], cfg["model_type"].split("_")[-1])}
            if text_cfg["model_type"] == "qwen":
                text_cfg["model_type"] = "qwen2"
            lm_sd = {k: v for k, v in sd.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
            self.proj = [sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"],
                         sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"]]
            tcfg = json.loads((Path(tower) / "config.json").read_text())
            vcfg = tcfg.get("vision_config", tcfg)
            if vision_from == "tower":
                vsd = _strip(read_tensors(tower), "vision_model.")
            else:
                vsd = _strip(sd, "model.vision_tower.vision_tower.vision_model.")
            # SigLipVisionTower: del layers[-1:], head = Identity; features = hidden_states[-1]
            self.vision = _siglip(vcfg, vsd, vcfg["num_hidden_layers"] - 1)
            self.layer, self.drop_first = -1, False
            self.pad = cfg.get("image_aspect_ratio") == "pad"
            self.lm = _causal_lm(text_cfg, lm_sd)
        elif cfg.get("model_type") == "tinyllava":  # Factory
            self.kind = "factory"
            self.proj = [sd["connector._connector.0.weight"], sd["connector._connector.0.bias"],
                         sd["connector._connector.2.weight"], sd["connector._connector.2.bias"]]
            vcfg = cfg["vision_config"]
            self.vision = _siglip(vcfg, _strip(sd, "vision_tower._vision_tower.vision_model."), vcfg["num_hidden_layers"])
            self.layer = cfg["vision_feature_layer"]
            self.drop_first = cfg["vision_feature_select_strategy"] == "patch"
            self.pad = cfg.get("image_aspect_ratio") == "pad"
            self.lm = _causal_lm(cfg["text_config"], _strip(sd, "language_model."))
        else:  # HF Llava, save_pretrained layout
            self.kind = "hf"
            self.proj = [sd["multi_modal_projector.linear_1.weight"], sd["multi_modal_projector.linear_1.bias"],
                         sd["multi_modal_projector.linear_2.weight"], sd["multi_modal_projector.linear_2.bias"]]
            vcfg = cfg["vision_config"]
            self.vision = _siglip(vcfg, _strip(sd, "vision_tower."), vcfg["num_hidden_layers"])
            self.layer = cfg["vision_feature_layer"]
            self.drop_first = cfg["vision_feature_select_strategy"] == "default"
            self.pad = json.loads((folder / "medlite_source.json").read_text())["image_spec"]["pad_to_square"]
            self.lm = _causal_lm(cfg["text_config"], _strip(sd, "language_model."))
        self.size = vcfg["image_size"]

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        hs = self.vision(pixels, output_hidden_states=True).hidden_states
        feats = hs[self.layer]
        if self.drop_first:
            feats = feats[:, 1:]
        w0, b0, w2, b2 = self.proj
        return F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)

    @torch.no_grad()
    def first_token_logits(self, image: Image.Image, prompt: str, *, bos: int | None) -> np.ndarray:
        """Logits of the next token after ``prompt`` (which contains one ``<image>``)."""
        feats = self.image_features(reference_pixels(image, self.size, pad=self.pad))[0]
        before, after = prompt.split("<image>")
        ids_a = ([bos] if bos is not None else []) + self.tok.encode(before, add_special_tokens=False).ids
        ids_b = self.tok.encode(after, add_special_tokens=False).ids
        emb = self.lm.get_input_embeddings()
        x = torch.cat([emb(torch.tensor(ids_a)), feats, emb(torch.tensor(ids_b))])[None]
        return self.lm(inputs_embeds=x).logits[0, -1].float().numpy()
