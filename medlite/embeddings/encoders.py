"""Images → per-token features ``[B, T, H]``: ONNX Runtime for an artifact/export, PyTorch for a checkpoint.

Two feature sources (``--from``):

* ``projector`` — the image embeddings spliced into the prompt (after the multimodal projector):
  what ``vision.onnx`` outputs (``image_embeds``), and ``generate.image_features`` in PyTorch;
* ``vision`` — the vision tower's selected hidden state before the projector (the layer and
  CLS-token rule of ``vision_feature_layer`` / ``vision_feature_select_strategy``). Only a
  checkpoint has it: exported artifacts fuse tower and projector into one graph.

The ONNX path opens only ``vision.onnx`` (no decoder session: far less memory) and imports no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from medlite.embeddings import SOURCES
from medlite.errors import DataError
from medlite.preprocess import preprocess


def is_export_folder(path: Path) -> bool:
    """An ONNX export or built artifact (runtime config or manifest), as ``medlite ask`` decides."""
    return (path / "medlite_runtime.json").is_file() or (path / "manifest.json").is_file()


def _artifact_identity(folder: Path, vision_file: str, ctx) -> dict:
    """Version and hashes of a built artifact (hash-checked first, as every artifact load is), or of a
    plain export (its vision graph hashed here)."""
    from medlite.artifacts import MANIFEST, RECIPE_FILE, ArtifactError, open_artifact
    from medlite.fileio import sha256_file

    if not (folder / MANIFEST).is_file():
        if (folder / RECIPE_FILE).is_file() or (folder / "report.md").is_file():
            raise ArtifactError(f"{folder}: {MANIFEST} is missing, so its files cannot be checked; this "
                                f"artifact is refused (as `medlite verify` refuses it): rebuild it")
        return {"kind": "onnx-export", "path": str(folder), "vision_graph": vision_file,
                "vision_graph_sha256": sha256_file(folder / vision_file)}
    art = open_artifact(folder)
    if art.status != "passed":
        ctx.warn(f"{art.path}: this artifact's status is {art.status!r} (its accuracy gates did not pass; "
                 f"see report.md)")
    entry = art.manifest["files"].get(vision_file, {})
    return {"kind": "artifact", "path": str(art.path), "version": art.version, "status": art.status,
            "recipe": (art.manifest.get("recipe") or {}).get("name"),
            "vision_graph": vision_file, "vision_graph_sha256": entry.get("sha256")}


class OrtEncoder:
    """``vision.onnx`` of an export folder or artifact on ONNX Runtime (projector output only)."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, *, ctx=None):
        from medlite.runtime.config import RuntimeConfig
        from medlite.runtime.sessions import open_session

        folder = Path(folder)
        cfg = RuntimeConfig.load(folder)
        if "vision" not in cfg.graphs:
            raise DataError(f"{folder / 'medlite_runtime.json'}: this export has no vision graph")
        spec = cfg.graphs["vision"]
        self.identity = _artifact_identity(folder, spec.file, ctx)
        self.identity.update({"model_name": cfg.model_name, "precision": cfg.precision, "source": cfg.source})
        level = "basic" if spec.quantization else "all"     # quantized graphs run as written (runtime/sessions.py)
        self.session, used = open_session(folder / spec.file, None, ctx=ctx, optimization=level)
        self.providers = list(used)
        self.image_spec = cfg.image_spec
        self._in_dtype = np.dtype(spec.input("pixel_values").dtype)

    def runtime_info(self) -> dict:
        import onnxruntime

        return {"name": "onnxruntime", "version": onnxruntime.__version__, "providers": self.providers}

    def features(self, images: list, source: str) -> np.ndarray:
        """``[B, n_img_tokens, hidden]`` for PIL images (``source`` must be ``projector``)."""
        check_source(source, onnx=True)
        pixels = preprocess(images, self.image_spec).astype(self._in_dtype)
        (emb,) = self.session.run(["image_embeds"], {"pixel_values": pixels})
        return emb


class TorchEncoder:
    """The canonical PyTorch model of a checkpoint (tower and projector outputs both available)."""

    runtime = "torch"

    def __init__(self, loaded, label: str):
        self.loaded = loaded
        self.image_spec = loaded.image_spec
        self.identity = {"kind": "checkpoint", "path": label, "model_name": getattr(loaded, "name", ""),
                         "precision": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
                         "source": loaded.source.to_dict()}

    def runtime_info(self) -> dict:
        import torch

        return {"name": "torch", "version": torch.__version__, "threads": torch.get_num_threads()}

    def features(self, images: list, source: str) -> np.ndarray:
        """``[B, tokens, hidden]``: projector output, or the tower's selected hidden state."""
        import torch

        from medlite.checkpoints.generate import pixel_values

        check_source(source, onnx=False)
        m = self.loaded.model
        cfg = m.config
        with torch.inference_mode():
            out = m.model.get_image_features(pixel_values=pixel_values(self.loaded, images),
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            if source == "projector":
                feats = out.pooler_output
                feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
            else:
                feats = _tower_features(out.hidden_states, cfg.vision_feature_layer,
                                        cfg.vision_feature_select_strategy)
        return feats.float().numpy()


def _tower_features(hidden_states, layer, strategy: Optional[str]):
    """The tower output the projector reads, exactly as ``LlavaModel.get_image_features`` selects it."""
    import torch

    layers = [layer] if isinstance(layer, int) else list(layer)
    picked = [hidden_states[i] for i in layers]
    if strategy == "default":           # drop the CLS token, as the projector input does
        picked = [h[:, 1:] for h in picked]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


def check_source(source: str, *, onnx: bool) -> None:
    """One-line errors for an unknown ``--from`` and for ``vision`` on an ONNX export."""
    if source not in SOURCES:
        raise DataError(f"--from {source!r}: use one of {', '.join(SOURCES)}")
    if onnx and source == "vision":
        raise DataError("--from vision needs a checkpoint: an artifact's vision.onnx outputs the projector's "
                        "image embeddings (image_embeds), not the tower's hidden states; use --from projector, "
                        "or --model CHECKPOINT for the tower output")


def open_encoder(args, ctx):
    """The encoder ``--model`` names: an export/artifact (ONNX Runtime), else a checkpoint or the demo model."""
    if args.model:
        from medlite.artifacts import resolve_artifact_path

        folder = Path(resolve_artifact_path(Path(args.model).expanduser()))
        if is_export_folder(folder):
            check_source(args.source, onnx=True)       # before the graph loads
            return OrtEncoder(folder, ctx=ctx)
    from medlite.model_choice import ModelChoice

    choice = ModelChoice.from_args(args)
    return TorchEncoder(choice.load(ctx), choice.label)
