"""``verify``: the bundle's files, the engines against the host's ONNX Runtime references, and the
held-out answers against the host's answers."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from pathlib import Path

import numpy as np

ARTIFACT = "artifact"
BUNDLE_FILE = "bundle.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _device_file(rel: str, declared) -> bool:
    # Same rule as medlite.artifacts.is_device_file: a declared pattern inside the declared folder.
    if not isinstance(declared, dict) or not declared.get("folder"):
        return False
    head, _, name = rel.partition("/")
    if head != str(declared["folder"]).strip("/") or not name or "/" in name:
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in declared.get("patterns", ()))


def check_files(root: Path) -> list:
    """One line per changed, missing or extra file of the bundle (empty: intact)."""
    bundle = json.loads((root / BUNDLE_FILE).read_text(encoding="utf-8"))
    manifest = json.loads((root / ARTIFACT / "manifest.json").read_text(encoding="utf-8"))
    declared = manifest.get("device_files")
    expected = {f"{ARTIFACT}/{k}": v["sha256"] for k, v in manifest["files"].items()}
    expected.update(bundle["files"])
    skip = {BUNDLE_FILE, f"{ARTIFACT}/manifest.json"} | {f"{ARTIFACT}/{v}" for v in bundle.get("volatile", [])}
    problems = []
    actual = set()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() or rel in skip or "__pycache__" in p.parts:
            continue
        if rel.startswith(ARTIFACT + "/") and _device_file(rel[len(ARTIFACT) + 1:], declared):
            continue
        actual.add(rel)
        if rel not in expected:
            problems.append(f"{rel}: extra file not in the manifest")
        elif sha256_file(p) != expected[rel]:
            problems.append(f"{rel}: sha256 mismatch (content changed)")
    problems += [f"{rel}: missing" for rel in sorted(set(expected) - actual)]
    return sorted(problems)


def scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|): one number per tensor, comparable across tensors."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return float("inf")              # a wrong shape, NaN or inf is a mismatch, never a pass
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def compare_references(vlm, ref: dict, tolerances: dict) -> list:
    """Engine outputs vs the host's ONNX Runtime outputs: ``[(tensor, error, tolerance, top1_ok)]``.

    Vision on the stored pixel values; the decoder teacher-forced on the host's tokens (one prefill,
    then the stored decode steps), so an early difference does not cascade into later steps.
    """
    rows = []
    emb = vlm.sessions["vision"].run(["image_embeds"], {"pixel_values": ref["pixel_values"]})[0]
    rows.append(("vision.image_embeds", scaled_error(emb, ref["image_embeds"]), tolerances["vision"], True))
    x, mask, pos = ref["prefill_embeds"], ref["prefill_mask"], ref["prefill_positions"]
    past = [np.zeros(tuple(int(d) for d in ref["prefill_past_shape"]), dtype=vlm._kv_dtype)
            for _ in range(2 * vlm.config.model["num_layers"])]
    ids = [int(t) for t in ref["decode_ids"]]
    for step in range(len(ids) + 1):
        logits, past = vlm._decoder(x, mask, pos, past)
        want = ref["logits"][step]
        got = np.asarray(logits[0, -1], dtype=np.float32)
        name = "decoder.logits prefill" if step == 0 else f"decoder.logits decode {step}"
        rows.append((name, scaled_error(got, want), tolerances["decoder"], int(got.argmax()) == int(want.argmax())))
        if step == len(ids):
            break
        x = vlm._embed(np.asarray([[ids[step]]], dtype=np.int32))
        n = int(mask.sum())
        pos = np.asarray([[n]], dtype=np.int32)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int32)], axis=1)
    return rows


def run_verify(root: Path, vlm_factory, *, standin: bool = False) -> int:
    """The whole ``verify`` command; returns the exit code (1: a changed file, an engine output out of
    tolerance, or — on the stand-in, which runs the host's graphs exactly — a different answer)."""
    problems = check_files(root)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"FAIL files: {len(problems)} problem(s); the bundle was changed or damaged: copy it again")
        return 1
    print("ok   files: every file matches the artifact's manifest.json and bundle.json")
    bundle = json.loads((root / BUNDLE_FILE).read_text(encoding="utf-8"))
    vlm = vlm_factory()
    for part, what in sorted(vlm.runs.items()):
        print(f"     {part}: {what}")
    with np.load(root / bundle["reference"]["file"]) as z:
        ref = {k: z[k] for k in z.files}
    rows = compare_references(vlm, ref, bundle["tolerances"])
    worst = max(rows, key=lambda r: r[1] / r[2])
    bad = [r for r in rows if r[1] > r[2] or not r[3]]
    for r in bad:
        print(f"FAIL {r[0]}: error {r[1]:.3g} > tolerance {r[2]:g}" if r[1] > r[2]
              else f"FAIL {r[0]}: top-1 token differs from the host's")
    print(f"{'FAIL' if bad else 'ok  '} outputs: {len(rows)} tensors vs the host's ONNX Runtime references; worst "
          f"{worst[0]} error {worst[1]:.3g} (tolerance {worst[2]:g})")
    agree = check_answers(root, vlm, bundle)
    if not agree and not standin:
        print("     (answers may differ on engines: fp16/int8 kernels round differently from the host's ONNX Runtime; "
              "the tensor check above is the pass/fail criterion)")
    return 1 if bad or (standin and not agree) else 0


def check_answers(root: Path, vlm, bundle: dict) -> bool:
    """Answer the held-out questions; report agreement with the host's answers."""
    from mlrt.imaging import load_image

    qs = json.loads((root / bundle["answers"]["file"]).read_text(encoding="utf-8"))
    same, t0 = 0, time.time()
    for q in qs["questions"]:
        got = vlm.answer(load_image(root / q["image"]), q["question"], max_new_tokens=qs["max_new_tokens"])
        ok = got == q["host_answer"]
        same += ok
        print(f"{'ok  ' if ok else 'DIFF'} {q['qid']}: {q['question']!r} -> {got!r}"
              + ("" if ok else f" (host: {q['host_answer']!r})"))
    n = len(qs["questions"])
    print(f"{'ok  ' if same == n else 'FAIL'} answers: {same}/{n} identical to the host's ({time.time() - t0:.1f} s)")
    return same == n
