"""`tandem serve`'s own errors: one line and a non-zero exit, before any port opens."""

from __future__ import annotations

import socket

from tandem.cli import main


def test_a_missing_model_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tandem: error:") and "\n" not in err


def test_a_port_outside_the_range_is_refused(capsys):
    assert main(["serve", "--port", "70000"]) == 1
    assert "--port must be in 1 ... 65535" in capsys.readouterr().err


def test_a_taken_port_is_a_one_line_error(gemma_gguf, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["serve", "--model", str(gemma_gguf), "--port", str(port)])
    err = capsys.readouterr().err
    assert status == 1 and f"cannot serve on 127.0.0.1:{port}" in err
