"""Reference inputs/outputs and held-out answers for a device bundle, computed on the host with ONNX Runtime.

``verify`` on the device feeds the same inputs to the engines and compares: vision on a few images,
one prefill and several decode steps teacher-forced on the host's tokens (stored compactly in one
``.npz``), then the held-out questions answered end to end (host answers in ``answers.json``).
"""
from __future__ import annotations

import io
import zipfile

import numpy as np

N_IMAGES = 3          # calibration-style images through the vision engine
N_DECODE = 6          # decode steps after the prefill
N_QUESTIONS = 6       # held-out questions answered on the device
MAX_NEW_TOKENS = 32   # the `medlite ask` default

# Per-precision tolerance on max|engine - host| / max(1, max|host|) (mldevice.verify.scaled_error).
# The stand-in runs the host's graphs on the same ONNX Runtime kernels: its error is 0 (tested), so
# these bound TensorRT's own rounding: fp32 engines reorder sums (~1e-5 relative) and may use TF32
# off (Volta has none); fp16 kernels keep ~3 significant digits per op over 20+ layers; INT8 engines
# pick other INT8/fp16 tactics than ONNX Runtime's reference Q/DQ arithmetic.
TOLERANCES = {"fp32": {"vision": 1e-3, "decoder": 1e-3},
              "fp16": {"vision": 2e-2, "decoder": 3e-2},
              "int8": {"vision": 5e-2, "decoder": 8e-2}}


def npz_bytes(arrays: dict) -> bytes:
    """An ``.npz`` with fixed entry times and order (``np.savez`` stamps the current time: not reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            a = io.BytesIO()
            np.lib.format.write_array(a, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            z.writestr(info, a.getvalue())
    return buf.getvalue()


def reference_arrays(vlm, images: list, question: str) -> dict:
    """Vision on ``images``; prefill + ``N_DECODE`` greedy decode steps of ``question`` on ``images[0]``."""
    from medlite.preprocess import preprocess

    spec = vlm.config.graphs["vision"].input("pixel_values")
    pixels = preprocess(images, vlm.config.image_spec).astype(np.dtype(spec.dtype))
    (emb,) = vlm.sessions["vision"].run(["image_embeds"], {"pixel_values": pixels})
    x, pos, state = vlm._first([images[0]], [question])
    mask, past_shape = state.mask.copy(), np.asarray(state.past[0].shape, dtype=np.int64)
    first_mask = state.mask.copy()
    logits_rows, ids = [], []
    out_x, out_pos = x.copy(), pos.copy()
    past = state.past
    for step in range(N_DECODE + 1):
        logits, past = vlm._decoder(x, mask, pos, past)
        last = np.asarray(logits[0, -1], dtype=np.float32).copy()
        logits_rows.append(last.copy())       # stored unsuppressed, as the engine returns them
        if step == N_DECODE:
            break
        last[list(vlm.config.suppress_token_ids)] = -np.inf
        t = int(last.argmax())
        ids.append(t)
        x = vlm._embed(np.asarray([[t]], dtype=np.int32))
        pos = np.asarray([[int(mask.sum())]], dtype=np.int32)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int32)], axis=1)
    return {"pixel_values": pixels, "image_embeds": np.asarray(emb), "prefill_embeds": out_x,
            "prefill_mask": first_mask,
            "prefill_positions": out_pos, "prefill_past_shape": past_shape,
            "decode_ids": np.asarray(ids, dtype=np.int64), "logits": np.stack(logits_rows)}

