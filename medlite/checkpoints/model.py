"""The canonical in-memory model every stage works on."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from medlite.preprocess import ImageSpec
from medlite.prompting import ChatTemplate


@dataclass
class SourceInfo:
    """Where a canonical model came from; recorded in every artifact manifest."""

    format: str                         # "legacy" | "factory" | "hf"
    path: str
    files: dict[str, str] = field(default_factory=dict)   # relative file name -> sha256
    text_backbone: str = "llama"        # "llama" | "phi" | "stablelm" | "qwen2"
    dtype: str = "float32"              # dtype of the source tensors
    vision_weights: Optional[str] = None  # "checkpoint" | "tower" | None (single source)
    vision_tower: Optional[dict] = None   # {"path": ..., "files": {...}} when --vision-tower was used
    adapter: Optional[dict] = None        # LoRA merge: adapter/base paths + hashes, merged: True
    name: str = ""                      # short model name for artifact paths
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    """A checkpoint converted to transformers' ``LlavaForConditionalGeneration`` plus its processor.

    See docs/architecture.md for the invariants (image token id appended, zero lm_head row, ...).
    """

    model: Any                      # transformers.LlavaForConditionalGeneration
    tokenizer: Any                  # tokenizers.Tokenizer
    image_spec: ImageSpec
    template: ChatTemplate
    image_token_id: int
    num_image_tokens: int
    eos_token_ids: list[int]
    bos_token_id: Optional[int]
    pad_token_id: int
    source: SourceInfo

    @property
    def name(self) -> str:
        return self.source.name or Path(self.source.path).name

    def param_breakdown(self) -> dict[str, dict]:
        """Parameters and bytes per component: vision_tower, projector, llm, embeddings.

        ``llm`` excludes the token embeddings and ``lm_head``, which are counted once under
        ``embeddings`` (once only if tied).
        """
        m = self.model
        emb = m.model.language_model.get_input_embeddings()
        head = m.lm_head
        seen: set[int] = set()

        def count(params) -> dict:
            n = b = 0
            for p in params:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                n += p.numel()
                b += p.numel() * p.element_size()
            return {"params": n, "bytes": b}

        emb_ids = {id(emb.weight), id(head.weight)}
        out = {
            "vision_tower": count(m.model.vision_tower.parameters()),
            "projector": count(m.model.multi_modal_projector.parameters()),
            "embeddings": count([emb.weight, head.weight]),
        }
        out["llm"] = count(p for p in m.model.language_model.parameters() if id(p) not in emb_ids)
        out["total"] = {"params": sum(v["params"] for v in out.values()),
                        "bytes": sum(v["bytes"] for v in out.values())}
        return out
