"""``medlite ask ARTIFACT_DIR --image scan.dcm "question"`` on an ONNX export (torch-free)."""
from __future__ import annotations

import sys


def cmd_ask_onnx(args, ctx) -> int:
    """Answer ``args.question`` about ``args.image`` with the export in ``args.model``, streaming tokens.

    The lead's ``ask`` dispatches here when the folder holds ``medlite_runtime.json``. A built
    artifact (with ``manifest.json``) is hash-checked first, as every artifact load is. The answer
    goes to stdout (streamed); provider fallbacks and image-loading warnings go to stderr.
    """
    from pathlib import Path

    from medlite.artifacts import MANIFEST, open_artifact
    from medlite.runtime.vlm import OnnxVlm, load_input_image

    if (Path(args.model) / MANIFEST).is_file():
        # a built artifact: refuse changed files (ArtifactError names each), say when its gates failed
        artifact = open_artifact(Path(args.model))
        if artifact.status != "passed":
            ctx.warn(f"{artifact.path}: this artifact's status is {artifact.status!r} (its accuracy gates did not "
                     f"pass; see report.md) — answers may be wrong")
    vlm = OnnxVlm.open(args.model, ctx=ctx)
    image = args.image
    if getattr(args, "frame", None) is not None:
        from medlite.imaging.images import load_image

        image = load_image(args.image, frame=args.frame, ctx=ctx)
    else:
        image = load_input_image(image, ctx)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    vlm.answer(image, args.question, max_new_tokens=int(getattr(args, "max_new_tokens", 32)), on_token=stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
