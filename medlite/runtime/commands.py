"""``medlite ask ARTIFACT_DIR --image scan.dcm "question"`` on an ONNX export (torch-free)."""
from __future__ import annotations

import sys


def cmd_ask_onnx(args, ctx) -> int:
    """Answer ``args.question`` about ``args.image`` with the export in ``args.model``, streaming tokens.

    The lead's ``ask`` dispatches here when the folder holds ``medlite_runtime.json``. The answer goes
    to stdout (streamed); provider fallbacks and image-loading warnings go to stderr.
    """
    from medlite.runtime.vlm import OnnxVlm, load_input_image

    vlm = OnnxVlm.open(args.model, ctx=ctx)
    image = args.image
    if getattr(args, "frame", None) is not None:
        from medlite.calibration.images import load_image

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
