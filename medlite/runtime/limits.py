"""Context-length limits of an export, checked before any graph runs (torch-free).

Two limits bound what one request may ask for:

* the decoder's maximum positions (``model.max_position_embeddings`` in ``medlite_runtime.json``,
  copied from the source's ``text_config``): rotary positions past it were never trained, and the
  decoder runs them silently, so a prompt plus the tokens to generate must fit;
* where the artifact has a TensorRT engines bundle (``engines/engines.json``), the engine profiles'
  bounds, set by the recipe's ``engines`` options ``max_prompt_tokens`` (text tokens besides the
  image tokens) and ``max_new_tokens``: a request past them runs under ONNX Runtime here but not
  on the device.

:func:`check_request` refuses a request that passes either limit with one line that names the limit
and where it comes from (:class:`medlite.errors.DataError`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from medlite.errors import DataError

ENGINES_SPEC = Path("engines") / "engines.json"


@dataclass(frozen=True)
class ContextLimits:
    """What one generation request may ask for; ``None``: no such limit is recorded."""

    max_positions: Optional[int] = None          # prompt tokens + generated tokens
    positions_from: str = ""
    num_image_tokens: int = 0
    max_prompt_tokens: Optional[int] = None      # text tokens besides the image tokens (engine profile)
    max_new_tokens: Optional[int] = None         # generated tokens (engine profile)
    engines_from: str = ""


def engine_limits(folder) -> dict:
    """The recipe's engines options recorded in ``engines/engines.json`` (empty: no engines bundle)."""
    path = Path(folder) / ENGINES_SPEC
    if not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable as JSON ({e})") from None
    lim = spec.get("limits") or {}
    return {k: int(lim[k]) for k in ("max_prompt_tokens", "max_new_tokens") if lim.get(k) is not None}


def limits_for(folder, config) -> ContextLimits:
    """The limits of the export in ``folder`` whose parsed ``medlite_runtime.json`` is ``config``."""
    folder = Path(folder)
    pos = config.model.get("max_position_embeddings")
    eng = engine_limits(folder)
    return ContextLimits(
        max_positions=int(pos) if pos else None,
        positions_from=f"model.max_position_embeddings in {folder / 'medlite_runtime.json'}",
        num_image_tokens=int(config.num_image_tokens),
        max_prompt_tokens=eng.get("max_prompt_tokens"), max_new_tokens=eng.get("max_new_tokens"),
        engines_from=f"{folder / ENGINES_SPEC} (the recipe's engines options)")


def check_request(limits: ContextLimits, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """Refuse prompts (token counts, image tokens included) and a generation length past ``limits``.

    ``max_new_tokens`` 0 checks the prompts alone (a prefill, e.g. first-token logits).
    """
    if not prompt_lengths:
        return
    longest = max(int(n) for n in prompt_lengths)
    new = int(max_new_tokens)
    if limits.max_positions is not None and longest + new > limits.max_positions:
        what = f"prompt of {longest} tokens ({limits.num_image_tokens} of them image tokens)"
        ask = f" + max_new_tokens {new} = {longest + new}" if new else ""
        raise DataError(f"{what}{ask} exceeds the decoder's maximum of {limits.max_positions} positions "
                        f"({limits.positions_from}); ask a shorter question or lower max_new_tokens")
    text = longest - limits.num_image_tokens
    if limits.max_prompt_tokens is not None and text > limits.max_prompt_tokens:
        raise DataError(f"prompt of {text} text tokens (besides {limits.num_image_tokens} image tokens) exceeds "
                        f"the engines' max_prompt_tokens {limits.max_prompt_tokens} ({limits.engines_from})")
    if limits.max_new_tokens is not None and new > limits.max_new_tokens:
        raise DataError(f"max_new_tokens {new} exceeds the engines' max_new_tokens {limits.max_new_tokens} "
                        f"({limits.engines_from})")


__all__ = ["ContextLimits", "ENGINES_SPEC", "check_request", "engine_limits", "limits_for"]
