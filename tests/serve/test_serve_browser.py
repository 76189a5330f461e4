"""The page in a real browser: headless Debian chromium (Selenium + chromedriver) against
``medlite serve`` started from the command line on a built artifact of the demo model.

Upload a built-in DICOM, ask, wait for the streamed answer and compare it with ``medlite ask`` on
the same artifact, image and question; a bad upload shows a readable message in the page.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_helpers import CHROMEDRIVER, CHROMIUM, CliServer, ask_in_page, chromium, run_cli

pytestmark = pytest.mark.slow
QUESTION = "Is there a lesion?"


@pytest.fixture()
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")
    driver = chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()


@pytest.fixture()
def cli_server(serve_artifact):
    server = CliServer(str(serve_artifact))
    yield server
    server.close()


def test_page_answers_like_medlite_ask(browser, cli_server, serve_artifact, ct_small, tmp_path):
    from selenium.webdriver.common.by import By

    got = ask_in_page(browser, cli_server.url, ct_small, QUESTION)
    shot = tmp_path / "serve-page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ref = run_cli("ask", "--model", str(serve_artifact), "--image", str(ct_small), QUESTION)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert got["state"] == "done", got
    assert got["answer"] == ref.stdout.strip() and got["answer"]
    assert got["pieces"] >= 1 and "tokens/s" in got["stats"]

    header = browser.find_element(By.ID, "model").text
    version = serve_artifact.name
    assert version in header and "fp32" in header and "passed" in header
    gates = browser.find_element(By.ID, "gates").text
    assert "agreement" in gates and "passed" in gates
    assert "dicom CT" in browser.find_element(By.ID, "frames").text


def test_bad_upload_shows_a_message_and_the_page_keeps_working(browser, cli_server, ct_small, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.dcm"
    bad.write_text("this is a text file, not a scan\n" * 20)
    browser.get(cli_server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "version" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 60).until(lambda d: error.is_displayed())
    assert error.text.startswith("notes.dcm: ")
    good = tmp_path / "ct.dcm"
    shutil.copy(ct_small, good)
    browser.find_element(By.ID, "file").send_keys(str(good))
    WebDriverWait(browser, 60).until(lambda d: not error.is_displayed())
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "ask").is_enabled())
