"""Options models of the built-in stages (export, engines, check, quantize); prune and distill own
theirs in :mod:`medlite.compress.prune.options` / :mod:`medlite.compress.distill.options`.

Each model is closed (unknown keys are errors); field validators check single values only —
cross-field rules live with the stage's registry entry (:mod:`medlite.recipes.rules`).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_serializer

from medlite.recipes.base import Closed, fraction

COMPONENTS = ("vision", "embed", "decoder")


class QuantizeOptions(Closed):
    """Per-component quantization, calibrated on the recipe's medical calibration set.

    ``vision`` covers the vision tower and the projector; ``llm`` the decoder's projection matmuls.
    int8 / w8a8 become explicit static Q/DQ graphs that TensorRT 8.5 compiles to INT8 kernels;
    w4a16 becomes ``com.microsoft`` MatMulNBits, which only ONNX Runtime runs (TensorRT 8.5 has no INT4).
    """

    vision: Literal["fp16", "int8"] = Field("fp16", description="vision tower + projector: fp16 (unchanged) or int8")
    llm: Literal["fp16", "w8a8", "w4a16"] = Field("fp16", description="decoder projections: fp16, w8a8 or w4a16")
    lm_head: Literal["fp16", "int8", "int4"] = Field("fp16", description="lm_head precision (int4 only with w4a16)")
    # INT8 (TensorRT): static per-tensor activation scales
    activation_calibration: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="how static activation scales are calibrated")
    percentile: float = Field(99.99, gt=90.0, le=100.0, description="percentile calibration's percentile")
    minmax_ranges: Literal["forward", "graph"] = Field(
        "forward", description="minmax: where the static ranges are observed — forward = module inputs during the "
        "SmoothQuant pass (torch, divided by the smoothing factors; no pass of their own), graph = ONNX Runtime's "
        "MinMax calibrator on the traced graph (one more pass over the calibration set); equal to 2e-5 (tested)")
    smoothquant_alpha: Optional[float] = Field(0.5, ge=0.0, le=1.0,
                                               description="w8a8: SmoothQuant migration strength; null = none")
    vision_smoothquant_alpha: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="vision int8: SmoothQuant on the SigLIP layers (LayerNorm -> q/k/v, fc1); "
        "null = none")
    smooth_extra: list[Literal["attn_out", "mlp_down"]] = Field(
        default_factory=list, description="int8: also smooth the Q/DQ inputs without a norm in front, exactly, at "
        "each graph's SmoothQuant alpha: attn_out = v_proj -> o_proj (decoder, GQA-aware; SigLIP v_proj -> out_proj), "
        "mlp_down = up_proj -> down_proj (decoder); [] = none")
    sensitivity: bool = Field(True, description="keep the most sensitive layers in fp16 until the gates hold")
    max_fp16_layers: int = Field(8, ge=0, description="cap on layers kept in fp16 by the sensitivity pass")
    sensitivity_max_kl: float = Field(
        1e-4, gt=0.0, le=1.0, description="sensitivity target: tie KL (nats; mean shift² of the fp32 top-2 first-answer-token "
        "gap / 8) of the whole VLM vs fp32 on the calibration held-out, shared by the INT8 graphs (1e-4 ~ a 0.03-logit "
        "shift of a near tie)")
    sensitivity_rows: int = Field(
        128, ge=8, description="held-out pairs the sensitivity pass judges layers on (evenly spread over the calibration "
        "held-out slice; more rows = less selection bias in the fp16 choice, cost grows linearly)")
    sensitivity_confidence: Optional[float] = Field(
        0.9, ge=0.5, lt=1.0, description="the sensitivity fallback stops when a one-sided upper confidence bound "
        "(Student t over the held-out rows) of each graph's tie KL is within its target, at this confidence; "
        "null = the point estimate (a mean of heavy-tailed per-row shifts: optimistic on unseen pairs)")
    # INT4 weight-only (ONNX Runtime)
    algorithm: Literal["gptq", "awq", "rtn"] = Field("gptq", description="w4a16 algorithm (llm-compressor)")
    group_size: Literal[32, 64, 128] = Field(128, description="w4a16 group size (= MatMulNBits block size)")
    symmetric: bool = Field(True, description="w4a16: symmetric (no zero points) or asymmetric")
    act_order: bool = Field(True, description="w4a16 GPTQ: quantize columns in activation order (llm-compressor's "
                            "'weight' ordering, its default: groups stay contiguous, no g_idx); ignored by awq/rtn")
    int4_compute: Literal["fp32", "int8"] = Field(
        "fp32", description="w4a16: MatMulNBits compute type on ONNX Runtime (accuracy_level): fp32 dequantizes the "
        "weights (exact W4A16); int8 also quantizes each activation block to int8 at run time (accuracy_level 4, "
        "onnxruntime-genai's CPU default) — faster on CPUs, a numerics change the gates must hold")
    samples: Optional[int] = Field(None, ge=1, description="cap on calibration samples used (default: all)")

    @field_validator("smooth_extra")
    @classmethod
    def _smooth_extra(cls, v: list[str]) -> list[str]:
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        return [m for m in ("attn_out", "mlp_down") if m in v]   # canonical order: same recipe → same hash

    def active(self) -> dict:
        """The components this stage changes, with their precision."""
        out = {}
        if self.vision != "fp16":
            out["vision"] = self.vision
        if self.llm != "fp16":
            out["llm"] = self.llm
        if self.lm_head != "fp16":
            out["lm_head"] = self.lm_head
        return out


class ExportOptions(Closed):
    """ONNX export of the vision, embedding and decoder graphs."""

    precision: Literal["fp32", "fp16"] = Field("fp16", description="float precision of the graphs")
    # The target's own maximum is checked by the rules (opset > target max names the target).
    opset: int = Field(17, ge=14, le=21, description="ONNX opset (TensorRT 8.5: at most 17)")
    components: list[Literal["vision", "embed", "decoder"]] = Field(default_factory=lambda: list(COMPONENTS),
                                                                    description="graphs to export")
    # docs/cpu.md "Fused ONNX Runtime decoder": fused = GroupQueryAttention / RotaryEmbedding /
    # SkipSimplifiedLayerNormalization (ONNX Runtime only); plain = the traced graph TensorRT needs.
    decoder_graph: Literal["auto", "fused", "plain"] = Field(
        "auto", description="decoder graph: auto (fused on CPU targets when the model allows it), fused (also "
                            "an INT4 decoder on a Jetson: needs a recent onnxruntime there), or plain (traced)")

    @field_validator("components")
    @classmethod
    def _components(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must name at least one of {', '.join(COMPONENTS)}")
        dup = sorted({c for c in v if v.count(c) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        return [c for c in COMPONENTS if c in v]   # canonical order: same recipe → same hash

    @model_serializer(mode="wrap")
    def _auto_unwritten(self, handler):
        # the default is not written: recipes without the key resolve (recipe.yaml) and hash exactly as
        # before the option existed, so TensorRT recipes keep their artifact versions
        d = handler(self)
        if isinstance(d, dict) and d.get("decoder_graph") == "auto":
            d.pop("decoder_graph")
        return d


class EnginesOptions(Closed):
    """A TensorRT build bundle (script + profiles) for the target; engines are built on the device."""

    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp16"
    max_batch: int = Field(1, ge=1, le=64)
    max_prompt_tokens: int = Field(128, ge=1, description="text tokens in a prompt, besides the image tokens")
    max_new_tokens: int = Field(128, ge=1)
    workspace_mb: int = Field(2048, ge=64)


class CheckOptions(Closed):
    """Accuracy gates: the artifact against the uncompressed source on the held-out split.

    A gate set to ``null`` is measured and reported but never fails the build.
    """

    max_closed_acc_drop: Optional[float] = Field(1.0, ge=0.0, description="points (percent of questions)")
    min_agreement: Optional[float] = 0.995
    max_mean_kl: Optional[float] = Field(0.01, ge=0.0, description="nats, first answer token")
    min_vision_cosine: Optional[float] = Field(0.999, ge=-1.0, le=1.0)
    max_samples: Optional[int] = Field(None, ge=1, description="overrides evaluation.max_samples")
    max_new_tokens: int = Field(16, ge=1, le=512)
    batch_size: int = Field(16, ge=1, le=256, description="questions per batched prefill")

    @field_validator("min_agreement")
    @classmethod
    def _agreement(cls, v: Optional[float]) -> Optional[float]:
        return fraction(v)
