"""Take the screenshot in docs/serve.md: ``medlite serve`` on an artifact, driven by headless chromium.

    .venv/bin/python tests/serve/make_docs_screenshot.py artifacts/micro-tinyllava-med/xavier-agx-fp16 \
        [--image FILE] [--question TEXT] [--out docs/serve-page.png]

The same steps as tests/serve/test_serve_browser.py (needs /usr/bin/chromium and chromedriver).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import CliServer, ask_in_page, chromium  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--image", default=None, help="default: pydicom's CT_small.dcm")
    ap.add_argument("--question", default="Is there a lesion?")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve-page.png"))
    args = ap.parse_args()
    if args.image is None:
        from pydicom.data import get_testdata_file

        args.image = get_testdata_file("CT_small.dcm")
    server = CliServer(args.artifact)
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = chromium(profile, width=1280, height=1060)
            try:
                got = ask_in_page(driver, server.url, Path(args.image).resolve(), args.question)
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    finally:
        server.close()
    print(f"{args.out}: {got}")
    return 0 if got["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
