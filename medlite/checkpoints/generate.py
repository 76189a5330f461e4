"""PyTorch reference generation on the canonical model — what every later stage is compared against.

Prompt: ``template.render(question)`` → :func:`medlite.prompting.encode_prompt` (one ``<image>`` id) →
:func:`medlite.prompting.expand_image_tokens` (``num_image_tokens`` copies). Pixels:
:func:`medlite.preprocess.preprocess`. Decoding: greedy with a KV cache; the image token id is
never generated; stops at the eos ids or a template stop string.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from medlite.preprocess import preprocess
from medlite.prompting import clean_answer, encode_prompt, expand_image_tokens


def prompt_ids(loaded, question: str) -> list[int]:
    """Token ids of the generation prompt with the image token expanded."""
    text = loaded.template.render(question)
    ids = encode_prompt(loaded.tokenizer, text, image_token_id=loaded.image_token_id, bos_token_id=loaded.bos_token_id)
    return expand_image_tokens(ids, loaded.image_token_id, loaded.num_image_tokens)


def check_context(loaded, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """Refuse prompts + ``max_new_tokens`` past the language model's ``max_position_embeddings``.

    The same rule as the ONNX runtime (:func:`medlite.runtime.limits.check_request`): rotary positions
    past the maximum were never trained and would run silently."""
    from medlite.runtime.limits import ContextLimits, check_request

    n = getattr(loaded.model.config.text_config, "max_position_embeddings", None)
    where = f"text_config.max_position_embeddings of {getattr(loaded.source, 'path', 'the model')}"
    check_request(ContextLimits(max_positions=int(n) if n else None, positions_from=where,
                                num_image_tokens=int(loaded.num_image_tokens)), prompt_lengths, max_new_tokens)


def pixel_values(loaded, images):
    """``preprocess`` output as a tensor in the model's dtype."""
    import torch

    dtype = next(loaded.model.parameters()).dtype
    return torch.from_numpy(preprocess(images, loaded.image_spec)).to(dtype)


def _on_model(model, *tensors):
    """``tensors`` on the model's device when that is a GPU (``--device``); on the CPU the same objects."""
    from medlite.devices import model_device, to_device

    return to_device(model_device(model), *tensors)


def _forward(loaded, ids, pixels, *, mask=None, positions=None, past=None):
    import torch

    ids, pixels, mask, positions = _on_model(loaded.model, ids, pixels, mask, positions)
    with torch.inference_mode():
        return loaded.model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions,
                            past_key_values=past, use_cache=True, return_dict=True)


def image_features(model, pixel_values):
    """Projected image embeddings ``[B, n_img, H]`` exactly as ``LlavaModel.get_image_features``."""
    cfg = model.config
    feats = model.model.get_image_features(pixel_values=pixel_values,
                                           vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    if isinstance(feats, (list, tuple)):
        import torch

        feats = torch.stack(list(feats))
    return feats


def splice_image_embeds(model, input_ids, image_embeds, image_token_id: int):
    """Token embeddings of ``input_ids`` with row ``i``'s image embeddings at its image positions."""
    emb = model.model.language_model.get_input_embeddings()(input_ids)
    where = input_ids == image_token_id
    n_img = image_embeds.shape[1]
    counts = where.sum(dim=1)
    if bool((counts != n_img).any()):
        raise ValueError(f"rows have {counts.tolist()} image positions; the vision tower gives {n_img}")
    emb = emb.clone()
    emb[where] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(emb.dtype)
    return emb, where


def first_token_logits(loaded, image, question: str) -> np.ndarray:
    """float32 logits ``[vocab]`` for the first answer token (raw: the image token is not masked)."""
    import torch

    row = prompt_ids(loaded, question)
    check_context(loaded, [len(row)], 0)
    out = _forward(loaded, torch.tensor([row]), pixel_values(loaded, image))
    return out.logits[0, -1].float().cpu().numpy()


def image_embeddings(loaded, image) -> np.ndarray:
    """Projected image features ``[num_image_tokens, hidden]`` (what is spliced into the prompt)."""
    import torch

    m = loaded.model
    with torch.inference_mode():
        feats = m.model.get_image_features(pixel_values=_on_model(m, pixel_values(loaded, image)),
                                           vision_feature_layer=m.config.vision_feature_layer,
                                           vision_feature_select_strategy=m.config.vision_feature_select_strategy)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    out = feats[0] if isinstance(feats, (list, tuple)) else feats[0]
    return out.float().cpu().numpy()


def _pick(logits, image_token_id: int):
    logits = logits.float().clone()
    logits[..., image_token_id] = float("-inf")
    return logits.argmax(dim=-1)


def _stop_hit(loaded, text: str) -> bool:
    return any(s and s in text for s in loaded.template.stop)


def answer(loaded, image, question: str, *, max_new_tokens: int = 32,
           on_text: Optional[Callable[[str], None]] = None) -> str:
    """Greedy answer. ``on_text`` receives the new decoded text as it grows (for streaming)."""
    import torch

    row = prompt_ids(loaded, question)
    check_context(loaded, [len(row)], max_new_tokens)   # before the model runs
    out = _forward(loaded, torch.tensor([row]), pixel_values(loaded, image))
    eos = set(loaded.eos_token_ids)
    gen: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        nxt = int(_pick(out.logits[0, -1], loaded.image_token_id))
        if nxt in eos:
            break
        gen.append(nxt)
        text = loaded.tokenizer.decode(gen, skip_special_tokens=True)
        if on_text is not None:
            visible = clean_answer(text, loaded.template.stop) if _stop_hit(loaded, text) else text
            if visible.startswith(shown) and len(visible) > len(shown):
                on_text(visible[len(shown):])
                shown = visible
        if _stop_hit(loaded, text):
            break
        out = _forward(loaded, torch.tensor([[nxt]]), None, past=out.past_key_values)
    return clean_answer(loaded.tokenizer.decode(gen, skip_special_tokens=True), loaded.template.stop)


def _greedy_rows(loaded, out, mask, last_pos, *, max_new_tokens: int) -> list[str]:
    """Greedy decoding of a left-padded batch from its prefill output ``out``."""
    import torch

    n = out.logits.shape[0]
    eos = set(loaded.eos_token_ids)
    gens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        nxt = _pick(out.logits[:, -1], loaded.image_token_id)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            gens[i].append(t)
            if _stop_hit(loaded, loaded.tokenizer.decode(gens[i], skip_special_tokens=True)):
                done[i] = True
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], dim=1)
        last_pos = last_pos + 1
        out = _forward(loaded, nxt[:, None], None, mask=mask, positions=last_pos[:, None], past=out.past_key_values)
    return [clean_answer(loaded.tokenizer.decode(g, skip_special_tokens=True), loaded.template.stop) for g in gens]


def _left_padded(loaded, questions: Sequence[str], max_new_tokens: int = 0):
    import torch

    rows = [prompt_ids(loaded, q) for q in questions]
    check_context(loaded, [len(r) for r in rows], max_new_tokens)   # before the model runs
    width = max(len(r) for r in rows)
    pad = loaded.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def answer_batch(loaded, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers for a batch (left padding, per-row positions); equal to :func:`answer` row by row."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if not questions:
        return []
    ids, mask, pos = _left_padded(loaded, questions, max_new_tokens)
    out = _forward(loaded, ids, pixel_values(loaded, list(images)), mask=mask, positions=pos)
    return _greedy_rows(loaded, out, mask, pos[:, -1], max_new_tokens=max_new_tokens)


def evaluate_rows(loaded, images: Sequence, image_index: Sequence[int], questions: Sequence[str], *,
                  max_new_tokens: int = 16):
    """Everything the gates need about a batch of questions, each image encoded once.

    Row ``i`` asks ``questions[i]`` about ``images[image_index[i]]``. Returns ``(answers,
    first_token_logits [rows, vocab] float32, image_embeddings [len(images), n_img, hidden] float32)``.
    The rows are one left-padded batch whose image positions get their image's projected features,
    so each answer equals :func:`answer` on that question (same greedy rule).
    """
    import torch

    model = loaded.model
    ids, mask, pos = _left_padded(loaded, questions, max_new_tokens)
    index = torch.as_tensor(list(image_index), dtype=torch.long)
    # On a GPU (--device) the prefill inputs move there; mask/pos stay on the host for decoding.
    d_ids, d_mask, d_pos, d_index = _on_model(model, ids, mask, pos, index)
    with torch.inference_mode():
        img = image_features(model, _on_model(model, pixel_values(loaded, list(images))))
        rows = img[d_index]
        embeds, _ = splice_image_embeds(model, d_ids, rows, loaded.image_token_id)
        out = model(inputs_embeds=embeds, attention_mask=d_mask, position_ids=d_pos, use_cache=True, return_dict=True)
    first = out.logits[:, -1].float().cpu().numpy().copy()
    answers = _greedy_rows(loaded, out, mask, pos[:, -1], max_new_tokens=max_new_tokens)
    return answers, first, img.float().cpu().numpy()
