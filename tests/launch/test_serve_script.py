"""launch/serve.py as a user starts it: where it listens, one line per request, and its end."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def test_serve_logs_its_address_requests_and_shutdown(repo_root):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  process = subprocess.Popen(
      [sys.executable, os.path.join(repo_root, "launch", "serve.py"), f"--port={port}",
       "--config.engine.max_seq_len=128", "--config.engine.decode_batch=4"],
      stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True)  # access lines: stdout
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
  reader.start()
  try:
    deadline = time.time() + 300
    while not any("Uvicorn running on" in l for l in lines) and time.time() < deadline:
      assert process.poll() is None, "".join(lines)
      time.sleep(0.2)
    assert any(f"on http://127.0.0.1:{port}/v1" in l for l in lines), "".join(lines)
    response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"model": "disagg_jax-demo", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200
    time.sleep(0.5)
    assert any('"POST /v1/completions HTTP/1.1" 200' in l for l in lines), "".join(lines)
  finally:
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reader.join(timeout=10)
  assert any("server stopped; engine shut down" in l for l in lines), "".join(lines)
