"""Facts about well-known vision tower repositories, shipped so that nothing is ever downloaded.

A legacy TinyLLaVA ``config.json`` names its vision tower by hub id (``mm_vision_tower``) and says
nothing else about it. Tensor shapes reveal most of the architecture (hidden size, patch size,
image size, MLP size, layer count) but not the attention head count or the preprocessing. For the
towers below those facts are public and fixed, so medlite uses them (and says so in the load notes);
for any other tower the user passes ``--vision-tower PATH`` (a local copy of that repo).

Sources: the ``config.json`` / ``preprocessor_config.json`` of each repository on the Hugging Face
hub (google/siglip-*), identical to the defaults of TinyLLaVA's own ``SigLipVisionConfig`` /
``SigLipImageProcessor`` (tinyllava/model/multimodal_encoder/siglip_encoder.py) for so400m-384.
"""
from __future__ import annotations

from typing import Optional

_SIGLIP_PREPROCESSOR = {"do_resize": True, "do_rescale": True, "do_normalize": True, "resample": 3,
                        "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                        "image_processor_type": "SiglipImageProcessor"}


def _siglip(hidden: int, inter: int, layers: int, heads: int, patch: int, image: int) -> dict:
    return {
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": hidden, "intermediate_size": inter,
                          "num_hidden_layers": layers, "num_attention_heads": heads, "num_channels": 3,
                          "patch_size": patch, "image_size": image, "hidden_act": "gelu_pytorch_tanh",
                          "layer_norm_eps": 1e-6, "attention_dropout": 0.0},
        "preprocessor": {**_SIGLIP_PREPROCESSOR, "size": {"height": image, "width": image}},
    }


KNOWN_VISION_TOWERS: dict[str, dict] = {
    "google/siglip-so400m-patch14-384": _siglip(1152, 4304, 27, 16, 14, 384),
    "google/siglip-so400m-patch14-224": _siglip(1152, 4304, 27, 16, 14, 224),
    "google/siglip-base-patch16-224": _siglip(768, 3072, 12, 12, 16, 224),
    "google/siglip-base-patch16-384": _siglip(768, 3072, 12, 12, 16, 384),
}


def known_tower(hub_id: Optional[str]) -> Optional[dict]:
    """The shipped facts for a hub id (a trailing slash or ``:`` prefix as Factory writes it is ignored)."""
    if not hub_id:
        return None
    key = str(hub_id).split(":")[-1].rstrip("/")
    return KNOWN_VISION_TOWERS.get(key)
