"""Helpers for the ``medlite serve`` tests: a live server in a thread and a tiny stdlib HTTP client
(multipart uploads, server-sent events). Named uniquely: test folders share one import namespace."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        # log_config=None: uvicorn's records propagate to pytest's caplog
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def multipart(fields: dict, file: tuple[str, bytes] | None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    if file is not None:
        name, data = file
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post(url: str, fields: dict, file: tuple[str, bytes] | None, timeout: float = 120) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of a multipart POST; HTTP errors are returned, not raised."""
    body, ctype = multipart(fields, file)
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """Parse a text/event-stream body into (event, data) pairs."""
    out = []
    for block in body.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def run_cli(*argv: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``python -m medlite.cli ARGV`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "medlite.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of image data (never allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class CliServer:
    """``medlite serve ARGS --port 0`` in a subprocess; ``url`` is read from its first stdout line."""

    def __init__(self, *args: str, timeout: float = 180):
        import queue

        self.proc = subprocess.Popen([sys.executable, "-m", "medlite.cli", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.stderr: list[str] = []
        threading.Thread(target=lambda: [self.stderr.append(x) for x in self.proc.stderr], daemon=True).start()
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise AssertionError("medlite serve printed no URL: " + "".join(self.stderr)[-3000:]) from None
        assert first.startswith("medlite serve: http://127.0.0.1:"), first + "".join(self.stderr)
        self.first_line = first
        self.url = first.split()[2].rstrip("/")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium(user_data_dir, width: int = 1280, height: int = 1000):
    """Headless Debian chromium through chromedriver, isolated (fresh profile, no network services)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def ask_in_page(driver, url: str, image, question: str, timeout: float = 120) -> dict:
    """Load the page, upload ``image``, ask ``question``; the finished answer item's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: "version" in d.find_element(By.ID, "model").text)
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: (d.find_element(By.ID, "model-view").get_attribute("src") or "").startswith("data:image/png"))
    driver.find_element(By.ID, "question").send_keys(question)
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    driver.find_element(By.ID, "ask").click()
    item = (By.CSS_SELECTOR, "#answers li")
    wait.until(lambda d: d.find_elements(*item) and d.find_element(*item).get_attribute("data-state") != "streaming")
    li = driver.find_element(*item)
    return {"state": li.get_attribute("data-state"),
            "answer": li.find_element(By.CSS_SELECTOR, ".a").get_attribute("textContent"),
            "stats": li.find_element(By.CSS_SELECTOR, ".stats").text,
            "pieces": int(li.get_attribute("data-pieces") or 0)}
