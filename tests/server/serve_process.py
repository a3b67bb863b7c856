"""Starting and stopping a real `tandem serve` process on loopback (the server tests' helpers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

API_KEY = "test-key-1234"


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    model_id: str
    health_seen: list[int] = field(default_factory=list)  # /health statuses until ready

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, *extra: str, timeout: float = 300) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "tandem", "serve", "--model", str(model_path), "--port", str(port), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, model_path.stem)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tandem serve exited: {process.stdout.read()}")
        try:
            status = httpx.get(server.url + "/health", timeout=5).status_code
        except httpx.TransportError:
            time.sleep(0.05)  # not listening yet
            continue
        server.health_seen.append(status)
        if status == 200:
            return server
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("tandem serve did not become ready")


def stop_server(server: ServerProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
