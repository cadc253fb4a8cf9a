"""A studio server in a subprocess (``python -m agiasi studio``) on a free loopback port, as the
browser tests and ``bench/studio.py`` run it: the real server, started and stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StudioProcess:
    def __init__(self, root: Path, port: int, env: dict[str, str] | None = None):
        self.root, self.port = Path(root), port
        self.env = env
        self.url = f"http://127.0.0.1:{port}/"
        self.log = self.root.parent / f"studio-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> StudioProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agiasi", "studio", "--root", str(self.root),
                 "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env} if self.env else None,
            )  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the studio exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the studio did not answer at {self.url}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
