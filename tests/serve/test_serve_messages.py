"""What ``medlite serve`` tells a new user (issue 26): numeric options refused in one line, the start-up
line and /api/info name the artifact's version and the precision that runs, an over-long question is
answered with the question limit."""
from __future__ import annotations

import pytest
from serve_helpers import CliServer, get_json

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
