"""What ``medlite serve`` tells a new user (issue 26): numeric options refused in one line, the start-up
line and /api/info name the artifact's version and the precision that runs, an over-long question is
answered with the question limit."""
from __future__ import annotations

import pytest
from serve_helpers import CliServer, LiveServer, get_json, post

from medlite.cli import main


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_port_out_of_range_is_one_line(int8_artifact, port, capsys):
    assert main(["serve", str(int8_artifact), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--port {port} is not a TCP port" in err and len(err.splitlines()) == 1, err


def test_max_queue_zero_is_refused(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--max-queue", "0"]) == 2
    assert "--max-queue must be positive, got 0" in capsys.readouterr().err


def test_start_up_line_and_info_show_version_and_int8(int8_artifact):
    server = CliServer(str(int8_artifact))
    try:
        info = get_json(server.url + "/api/info")
    finally:
        server.close()
    line = server.first_line
    assert "version 0.1.0+abc1234" in line and "my-copy" not in line, line
    assert "vision int8 Q/DQ" in line and "decoder fp32" in line, line
    assert info["precision"] == "vision int8 Q/DQ, embed fp32, decoder fp32"
    assert info["graph_precision"]["vision"] == "int8 Q/DQ"


def test_long_question_names_the_question_limit(int8_artifact, ct_small, tmp_path):
    import json

    from medlite.artifacts import open_artifact
    from medlite.runtime import OnnxVlm
    from medlite.serve.app import create_app

    app = create_app(OnnxVlm.open(int8_artifact), artifact=open_artifact(int8_artifact), tmp_root=tmp_path)
    with LiveServer(app) as s:
        status, _, body = post(s.url + "/api/ask", {"question": "x" * 95_000}, ("ct.dcm", ct_small.read_bytes()))
    msg = json.loads(body)["error"]
    assert status == 413 and "at most 1000 characters" in msg and "Part exceeded" not in msg, msg
