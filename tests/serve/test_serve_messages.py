"""What ``medlite serve`` tells a new user (issue 26): numeric options refused in one line, the start-up
line and /api/info name the artifact's version and the precision that runs, an over-long question is
answered with the question limit."""
from __future__ import annotations

from serve_helpers import CliServer, get_json


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
