"""``medlite ask ARTIFACT_DIR --image scan.dcm "question" ...`` on an ONNX export (torch-free)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Sequence


def print_answers(questions: Sequence[str], answer: Callable, ctx) -> list[dict]:
    """Answer each question in turn: the answer streams to stdout (one line each; with several
    questions the question comes first, ``Q: ...`` / ``A: ...``). With ``--json`` nothing streams and
    one JSON object ``{"answers": [{"question", "answer"}]}`` is printed at the end.

    ``answer(question, on_text)`` returns the full answer and calls ``on_text(piece)`` as it goes.
    """
    many, out = len(questions) > 1, []

    def stream(piece: str) -> None:
        if not ctx.json_mode:
            sys.stdout.write(piece)
            sys.stdout.flush()

    for q in questions:
        if many and not ctx.json_mode:
            sys.stdout.write(f"Q: {q}\nA: ")
        text = answer(q, stream)
        out.append({"question": q, "answer": text})
        if not ctx.json_mode:
            sys.stdout.write("\n" if text else "(empty answer)\n")
            sys.stdout.flush()
    if ctx.json_mode:
        print(json.dumps({"answers": out}, indent=1))
    return out


def _check_artifact(folder: Path, ctx) -> None:
    """A built artifact (manifest, recipe, report) is hash-checked first, as every artifact load is; one
    whose manifest.json was deleted is refused as ``verify`` refuses it. A plain export has none."""
    from medlite.artifacts import MANIFEST, RECIPE_FILE, ArtifactError, open_artifact

    if not (folder / MANIFEST).is_file():
        if (folder / RECIPE_FILE).is_file() or (folder / "report.md").is_file():
            raise ArtifactError(f"{folder}: {MANIFEST} is missing, so its files cannot be checked; this "
                                f"artifact is refused (as `medlite verify` refuses it): rebuild it")
        return
    # refuse changed files (ArtifactError names each), say when its gates failed
    artifact = open_artifact(folder)
    if artifact.status != "passed":
        ctx.warn(f"{artifact.path}: this artifact's status is {artifact.status!r} (its accuracy gates did not "
                 f"pass; see report.md) — answers may be wrong")


def cmd_ask_onnx(args, ctx) -> int:
    """Answer ``args.questions`` about ``args.image`` with the export in ``args.model``, streaming tokens.

    ``ask`` dispatches here when the folder holds ``medlite_runtime.json`` (or a manifest). The answers
    go to stdout (streamed); provider fallbacks and image-loading warnings go to stderr.
    """
    from medlite.runtime.vlm import OnnxVlm, load_input_image

    _check_artifact(Path(args.model), ctx)
    vlm = OnnxVlm.open(args.model, ctx=ctx)
    if getattr(args, "frame", None) is not None:
        from medlite.imaging.images import load_image

        image = load_image(args.image, frame=args.frame, ctx=ctx)
    else:
        image = load_input_image(args.image, ctx)
    n = int(getattr(args, "max_new_tokens", 32))
    questions = getattr(args, "questions", None) or [args.question]
    print_answers(questions, lambda q, on_text: vlm.answer(image, q, max_new_tokens=n, on_token=on_text), ctx)
    return 0
