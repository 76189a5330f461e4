"""What the quantizer leaves on a module, read back as integers; padded layers; model surgery helpers.

* :class:`QuantizedLinear` — the quantizer's own integers, scales and zero points of one Linear, read
  from compressed-tensors' module state by :func:`record_from_module` (no re-quantization);
* :class:`PaddedLinear` / :func:`padded_layers` — compressed-tensors 0.19 refuses group quantization
  when a layer's input width is not a multiple of the group size (``group_size_validation.py``; the
  demo model's ``down_proj`` has K = 352). Such layers are quantized as zero-padded
  ``Linear(K_pad, N)``: padded columns see zero inputs (no Hessian contribution) and hold zero
  weights, which quantize to the zero point and do not change a group's min/max (compressed-tensors'
  ranges always include 0). The last group of the real K columns is then exactly MatMulNBits'
  partial last block;
* :func:`strip_quantization` / :func:`untie_lm_head` — model surgery around a quantization run.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

class PaddedLinear(nn.Module):
    """``Linear(K, N)`` computed as ``Linear(K_pad, N)`` on zero-padded inputs (``inner`` is quantized)."""

    def __init__(self, linear: nn.Linear, k_pad: int):
        super().__init__()
        n, k = linear.weight.shape
        self.in_features, self.out_features, self.k_pad = k, n, k_pad
        self.inner = nn.Linear(k_pad, n, bias=linear.bias is not None, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.inner.weight.zero_()
            self.inner.weight[:, :k] = linear.weight
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)

    def forward(self, x):
        return self.inner(nn.functional.pad(x, (0, self.k_pad - self.in_features)))


@dataclass
class QuantizedLinear:
    """The quantizer's own result for one Linear ``y = x W^T + b`` (``W`` is ``[N, K]``)."""

    name: str                       # module name in the Llava model, e.g. model.language_model.layers.0.mlp.down_proj
    bits: int
    group_size: int
    qweight: Any                    # int16 tensor [N, K]: unsigned integers 0 .. 2^bits - 1
    scales: Any                     # float32 [N, ceil(K / group_size)]
    zero_points: Any                # int16 [N, ceil(K / group_size)], unsigned (2^(bits-1) when symmetric)
    symmetric: bool
    bias: Any = None                # float32 [N] or None
    g_idx: Any = None               # int32 [K] group of each input column (None: contiguous groups)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantized(self) -> torch.Tensor:
        """``[N, K]`` float32 weights ``(q - zp) * scale`` (the quantizer's fake-quant weights)."""
        n, k = self.qweight.shape
        g = self.g_idx.long() if self.g_idx is not None else torch.arange(k) // self.group_size
        return (self.qweight.float() - self.zero_points.float()[:, g]) * self.scales.float()[:, g]



def language_linear_names(model, lm_head: bool) -> list[str]:
    """Names of the Linear layers of the language model (and ``lm_head``), in model order."""
    names = [f"model.language_model.{n}" for n, m in model.model.language_model.named_modules()
             if isinstance(m, nn.Linear)]
    return names + (["lm_head"] if lm_head else [])




@contextlib.contextmanager
def padded_layers(model, names: list[str], group_size: int):
    """Wrap every named Linear whose K is not a multiple of ``group_size`` in :class:`PaddedLinear`.

    Yields ``{name: quantized module name}`` (``name.inner`` for padded layers); the wrappers stay
    until the caller has read the results, then the context restores the original Linear modules
    where a wrapper (or :func:`strip_quantization`'s plain Linear) still sits — not where the caller
    has installed a module of its own (e.g. the packed MatMulNBits layer).
    """
    mapping, swapped = {}, []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        k = lin.weight.shape[1]
        if k % group_size:
            wrapper = PaddedLinear(lin, math.ceil(k / group_size) * group_size)
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, lin, wrapper))
            mapping[name] = f"{name}.inner"
        else:
            mapping[name] = name
    try:
        yield mapping
    finally:
        for parent, attr, lin, wrapper in swapped:
            now = getattr(parent, attr)
            if now is wrapper or type(now) is nn.Linear:
                setattr(parent, attr, lin)




def record_from_module(name: str, module, symmetric: bool, k: Optional[int] = None) -> QuantizedLinear:
    """Read the integers, scales and zero points compressed-tensors holds for ``module``.

    The integers are what compressed-tensors' own ``quantize`` gives for the module's (already GPTQ-
    updated) weight with its scale and zero point — the values its pack-quantized compressor saves.
    Signed integers in ``[-2^(b-1), 2^(b-1) - 1]`` become unsigned by adding ``2^(b-1)`` (as
    MatMulNBits stores them); a padded module is cut back to its real K columns. A ``weight_g_idx``
    (what older compressed-tensors stored for "group" act-order) is kept as the record's ``g_idx``.
    """
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = module.quantization_scheme.weights
    bits, gs = int(args.num_bits), int(args.group_size)
    w = module.weight.detach().float()
    scale = module.weight_scale.detach().float()
    zp = getattr(module, "weight_zero_point", None)
    zp = torch.zeros_like(scale) if zp is None else zp.detach().float()
    g_idx = getattr(module, "weight_g_idx", None)   # "group" act-order of compressed-tensors < 0.19
    if g_idx is None:
        q = quantize(w, scale, zp, args, dtype=torch.float32)
    else:   # column j uses group g_idx[j]: compressed-tensors' formula with per-column scale / zero point
        g = g_idx.detach().long()
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.clamp(torch.round(w / scale[:, g] + zp[:, g]), lo, hi)
        g_idx = g_idx.detach().to(torch.int32).clone()
    offset = 1 << (bits - 1)
    k = q.shape[1] if k is None else int(k)
    return QuantizedLinear(name=name, bits=bits, group_size=gs, qweight=q.add_(offset).to(torch.int16)[:, :k],
                           scales=scale.clone(), zero_points=(zp + offset).round().to(torch.int16),
                           symmetric=symmetric, g_idx=None if g_idx is None else g_idx[:k],
                           bias=None if module.bias is None else module.bias.detach().float().clone())


def strip_quantization(model) -> None:
    """Remove compressed-tensors state (forward patch, scales, observers) and unwrap padded layers."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, PaddedLinear):
                inner = child.inner
                lin = nn.Linear(child.in_features, inner.out_features, bias=inner.bias is not None,
                                dtype=inner.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(inner.weight[:, :child.in_features])
                    if inner.bias is not None:
                        lin.bias.copy_(inner.bias)
                setattr(parent, attr, lin)
    for m in model.modules():
        if "forward" in m.__dict__:          # compressed-tensors patches the instance's forward
            del m.forward
        for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
            if attr in m.__dict__:
                delattr(m, attr)
        for pname in [n for n, _ in m.named_parameters(recurse=False) if n.startswith(("weight_", "input_", "output_"))]:
            delattr(m, pname)
        for sub in [n for n, _ in m.named_children() if n.endswith("_observer")]:
            delattr(m, sub)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def untie_lm_head(model) -> None:
    """Give ``lm_head`` its own weight when it shares the embedding table (quantizing it must not
    change the embeddings)."""
    emb = model.model.language_model.get_input_embeddings().weight
    if model.lm_head.weight is emb or model.lm_head.weight.data_ptr() == emb.data_ptr():
        model.lm_head.weight = nn.Parameter(emb.detach().clone())
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
        tc = getattr(model.config, "text_config", None)
        if tc is not None and hasattr(tc, "tie_word_embeddings"):
            tc.tie_word_embeddings = False


__all__ = ["PaddedLinear", "QuantizedLinear", "language_linear_names", "padded_layers", "record_from_module",
           "strip_quantization", "untie_lm_head"]
