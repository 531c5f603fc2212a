"""`python app.py` on a port that is already taken says so in one line (exit 2), not in a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.benches import ROOT


def test_a_busy_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "app.py", "--port", str(port), "--device", "cpu", "--cache-dir", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(f"error: cannot serve on 127.0.0.1:{port} (") and lines[0].endswith("pass --port N")
    assert "MixDQ Studio ready" not in done.stdout
