"""The runtime runs without torch (and without transformers), including ``medlite ask`` on a DICOM file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export_tiny_model import random_image
from medlite.runtime import OnnxVlm

SCRIPT = r"""
import json, sys
sys.modules["torch"] = None          # any "import torch" now raises ImportError
from PIL import Image
from medlite.runtime import OnnxVlm
vlm = OnnxVlm.open(sys.argv[1])
ans = vlm.answer(Image.open(sys.argv[2]), "is there a lesion in the lung ?", max_new_tokens=8)
heavy = sorted(m for m in ("torch", "transformers", "onnx") if sys.modules.get(m) is not None)
print(json.dumps({"answer": ans, "heavy": heavy}))
"""


def test_answer_without_torch(rt_export, tmp_path):
    img = tmp_path / "img.png"
    random_image(0).save(img)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(rt_export), str(img)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    from PIL import Image

    assert out["answer"] == OnnxVlm.open(rt_export).answer(Image.open(img), "is there a lesion in the lung ?",
                                                           max_new_tokens=8)


def _dicom() -> Path:
    pydicom_data = pytest.importorskip("pydicom.data")
    return Path(pydicom_data.get_testdata_file("CT_small.dcm"))


def test_cli_ask_on_onnx_export_with_dicom_without_torch(rt_export):
    """``medlite ask EXPORT --image CT.dcm QUESTION`` streams the same answer as the API."""
    dcm = _dicom()
    code = ("import sys; sys.modules['torch'] = None; from medlite.cli import main; "
            f"sys.exit(main(['ask', {str(rt_export)!r}, 'which organ is this ?', '--image', {str(dcm)!r}, "
            "'--max-new-tokens', '8']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from medlite.imaging.images import load_image

    expected = OnnxVlm.open(rt_export).answer(load_image(dcm), "which organ is this ?", max_new_tokens=8)
    assert proc.stdout.strip() == expected
