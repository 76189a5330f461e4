"""Options, validation rules and plan of the ``distill`` stage (torch-free: the registry imports this).

Recipe form::

    - distill:
        steps: 300
        learning_rate: 1.0e-3
        batch_size: 8
        temperature: 2.0
        hidden_mse: []            # student decoder layers whose output hidden states are matched (MSE):
                                  # a list of indices, or "all" (every decoder layer, resolved at run time)
        hidden_weight: 0.0
        mixup: 0.0                # consistent function matching on blended images (teacher runs every step)
        datasets: []              # extra VQA sets: [{dataset: ..., split: train, images: ...}]
        eval_every: 50            # held-out calibration slice: early stop
        heldout_samples: 64       # pairs of that slice (spread over its strata)
        patience: 3
        seed: 0
        checkpoint_every: 50      # resumable checkpoints in the cache
        trainable: auto           # auto | llm | projector | llm+projector | all
        max_new_tokens: 16        # teacher answers
        lora_rank: 0              # > 0: rank-r LoRA adapters on the language model train instead of its weights
                                  # (merged before the stage ends; AdamW state for the adapters only)

Teacher: the untouched source model; student: the working model (pruned by an earlier stage).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_serializer

from medlite.recipes.base import Closed
from medlite.recipes.registry import Capabilities, Order, StageSpec, register_stage

STAGE = "distill"
# Split names that are never (only) training data, whatever the evaluation section says ("all" holds test).
NOT_TRAINING = ("test", "validate", "validation", "val", "valid", "all")


class DistillDataset(Closed):
    """An extra VQA set for distillation: training splits only."""

    dataset: str
    split: str = "train"
    images: Optional[str] = Field(None, description="image folder for file datasets")
    max_samples: Optional[int] = Field(None, ge=1)


class DistillOptions(Closed):
    """Knowledge distillation: KL on the answer tokens' next-token distributions (+ optional hidden MSE)."""

    steps: int = Field(300, ge=1, le=1_000_000)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1, le=1024)
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    hidden_mse: Union[Literal["all"], list[int]] = Field(
        default_factory=list, description="student decoder layers matched by MSE: indices, or 'all' (every layer)")
    hidden_weight: float = Field(0.0, ge=0.0)
    mixup: float = Field(0.0, ge=0.0, le=0.5, description="function matching on blended images: each training "
                         "image mixed with another of its batch, weight ~ U(0, mixup); teacher sees the same")
    datasets: list[DistillDataset] = Field(default_factory=list)
    eval_every: int = Field(50, ge=1)
    heldout_samples: int = Field(64, ge=1, description="held-out calibration pairs used for early stopping")
    patience: int = Field(3, ge=0, description="0: never stop early")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0, description="0: no checkpoints")
    warmup: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    trainable: Literal["auto", "llm", "projector", "llm+projector", "all"] = Field(
        "auto", description="auto: llm; llm+projector after a tokens stage; all when pruning changed the vision tower")
    max_new_tokens: int = Field(16, ge=1, le=512, description="length cap of the teacher's answers")
    lora_rank: int = Field(0, ge=0, le=1024, description="0: the language model's weights train directly; r > 0: "
                           "rank-r LoRA adapters on its projections train instead, merged before the stage ends")
    lora_alpha: Optional[float] = Field(None, gt=0.0, description="LoRA scale numerator (default 2 × lora_rank)")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the student/teacher forwards on a GPU (bf16, or fp16 with loss scaling); "
                            "fp32 (default) everywhere, and the only choice on the CPU")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # Left out at its default, so recipes that do not set it resolve, hash and key their caches
        # exactly as before the option existed (recipe.yaml, the version, distill's run key).
        d = handler(self)
        if isinstance(d, dict) and self.mixed_precision == "fp32":
            d.pop("mixed_precision", None)
        if isinstance(d, dict) and not self.lora_rank and self.lora_alpha is None:
            d.pop("lora_rank", None)
            d.pop("lora_alpha", None)
        return d

    @field_validator("hidden_mse", mode="before")
    @classmethod
    def _layers(cls, v):
        # One message for every wrong form (pydantic's union errors would list one per union member).
        if isinstance(v, str):
            if v.strip().lower() == "all":
                return "all"
            raise ValueError(f"must be 'all' (every decoder layer) or a list of layer indices, got {v!r}")
        if not isinstance(v, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ValueError(f"must be 'all' (every decoder layer) or a list of layer indices, got {v!r}")
        if any(i < 0 for i in v):
            raise ValueError(f"layer indices must be >= 0, got {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a layer more than once: {list(v)}")
        return sorted(v)


def hidden_layers(opts: DistillOptions, n_layers: int) -> list[int]:
    """The student decoder layers ``hidden_mse`` names on a student with ``n_layers`` decoder layers
    (``"all"`` → every one, ``[0, ..., n_layers - 1]``)."""
    return list(range(int(n_layers))) if opts.hidden_mse == "all" else list(opts.hidden_mse)


def _describe_layers(opts: DistillOptions, sizes) -> str:
    if opts.hidden_mse != "all":
        return f"layers {opts.hidden_mse}"
    n = (getattr(sizes, "text", None) or {}).get("num_layers")
    prune = getattr(getattr(sizes, "recipe", None), "stage", lambda _n: None)("prune")
    if n is not None and prune is not None:
        n -= int(getattr(prune, "layers", 0) or 0)          # the student's layers after layer pruning
    return "every decoder layer" + (f" ({n}: layers 0-{n - 1})" if n else "")


def _evaluation(view) -> tuple[str, str]:
    ev = (getattr(view, "data", None) or {}).get("evaluation") or {}
    if not isinstance(ev, dict):
        ev = {}
    return str(ev.get("dataset", "builtin:micro-med-vqa")), str(ev.get("split", "test"))


def _given(view, index: int, key: str) -> bool:
    """Whether the recipe itself sets ``key`` of this stage (an invalid value is dropped from ``opts``
    and already has its own error: rules must not add a second one about the default)."""
    stages = (getattr(view, "data", None) or {}).get("stages")
    item = stages[index] if isinstance(stages, list) and index < len(stages) else None
    raw = item.get(STAGE) if isinstance(item, dict) else None
    return isinstance(raw, dict) and raw.get(key) not in (None, [], "")


def rules(index: int, opts: DistillOptions, view) -> tuple[list, list]:
    """Cross-field checks: ``(errors, warnings)``.

    * a dataset equal to the evaluation set (same dataset and split), or any test/validation split,
      is an error: the gates must run on data the student never trained on;
    * ``hidden_weight`` without ``hidden_mse`` is an error; ``hidden_mse`` with weight 0 a warning;
    * no earlier ``prune`` stage: a warning (plain self-distillation of an unchanged model).
    """
    errors: list = []
    warnings: list = []
    loc = ("stages", index, STAGE)
    ev_ds, ev_split = _evaluation(view)
    for k, d in enumerate(opts.datasets):
        if d.dataset == ev_ds and d.split == ev_split:
            errors.append((loc + ("datasets", k), f"{d.dataset} split {d.split} is the evaluation split: the "
                           "gates must run on data the student never trained on (use a training split)"))
        elif d.split.lower() in NOT_TRAINING:
            errors.append((loc + ("datasets", k, "split"), f"split {d.split!r} of {d.dataset} is not a training "
                           "split: distillation uses training splits only"))
    if opts.hidden_weight > 0 and not opts.hidden_mse and not _given(view, index, "hidden_mse"):
        errors.append((loc + ("hidden_weight",), "hidden_weight > 0 needs the layers in hidden_mse"))
    if opts.hidden_mse and opts.hidden_weight == 0:
        warnings.append(f"stages[{index}].distill.hidden_mse is set but hidden_weight is 0: no hidden-state loss")
    from medlite.recipes.registry import STAGES

    by_name = getattr(view, "by_name", {}) or {}
    earlier = [n for n, (i, _) in by_name.items() if i < index and n in STAGES]
    if not any(STAGES[n].caps.changes_weights for n in earlier):
        warnings.append(f"stages[{index}].distill has no earlier prune or tokens stage: this is plain "
                        "self-distillation of an unchanged model (the source is its own teacher)")
    if opts.lora_rank and opts.trainable == "projector":
        errors.append((loc + ("lora_rank",), "LoRA adapters train the language model, which trainable: projector "
                       "keeps frozen (use auto, llm, llm+projector or all)"))
    if opts.lora_alpha is not None and not opts.lora_rank:
        errors.append((loc + ("lora_alpha",), "lora_alpha without lora_rank: no adapters to scale"))
    pooled = [n for n in earlier if STAGES[n].caps.changes_image_tokens]
    if pooled and opts.hidden_mse and opts.hidden_weight:
        errors.append((loc + ("hidden_mse",), f"stages[{by_name[pooled[0]][0]}].{pooled[0]} changes the image-token "
                       "count, so the student's hidden states do not align with the teacher's position by position: "
                       "distil on the answer-token KL alone (hidden_weight: 0)"))
    return errors, warnings


def plan(index: int, opts: DistillOptions, sizes) -> list[str]:
    """What the stage will do (torch-free). Distillation changes weights, not sizes."""
    extra = ", ".join(f"{d.dataset} ({d.split})" for d in opts.datasets)
    return [f"distill: {opts.steps} steps × {opts.batch_size} samples from the source model as teacher "
            f"(KL at T={opts.temperature:g} on answer tokens"
            + (f" + {opts.hidden_weight:g} × hidden MSE on {_describe_layers(opts, sizes)}"
               if opts.hidden_weight else "")
            + (f"; images blended up to {opts.mixup:.0%} with another, teacher alongside" if opts.mixup else "")
            + (f"; the language model through rank-{opts.lora_rank} LoRA adapters, merged after" if opts.lora_rank else "")
            + f"); data: calibration pairs with teacher answers{' + ' + extra if extra else ''}; "
            f"early stop on the held-out calibration slice every {opts.eval_every} steps",
            "  sizes unchanged (weights only)"]


SPEC = register_stage(StageSpec(
    STAGE, DistillOptions, "distillation from the untouched source model as teacher",
    "medlite.compress.distill.stage:run", plan, rules,
    caps=Capabilities(changes_weights=True, needs_source=True, needs_calibration=True, caches_output=True),
    order=Order(phase=20, why="distillation recovers the accuracy pruning lost"),
    numerics=("torch", "transformers")))

__all__ = ["DistillOptions", "DistillDataset", "rules", "plan", "STAGE", "SPEC"]
