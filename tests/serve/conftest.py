"""A live OpenAI-compatible server on a free port, over a tiny Qwen2 checkpoint (colocated)."""

import os
import socket
import threading
import time

import pytest

from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf


@pytest.fixture(scope="session")
def chat_model_dir(hf_checkpoint):
  model_dir, hf_model = hf_checkpoint("qwen2")
  if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    tiny_hf.write_tokenizer(model_dir)
  tiny_hf.write_tokenizer_config(model_dir)
  return model_dir


@pytest.fixture(scope="session")  # one server for every module: each start costs ~17 s
def live_server(chat_model_dir):
  import sys
  import uvicorn
  from disagg_jax.serve.app import Server, build_app
  sys.setswitchinterval(0.0005)  # as launch/serve.py does
  model = loading.load_model(chat_model_dir, helpers.mesh(2, 2))
  engine = Engine.create("colocated", model, config=EngineConfig(
      max_seq_len=256, decode_batch=8, chunk_size=64, chunk_batch=2), progress=False)
  server = Server(engine, "tiny-qwen2", chat_model_dir, max_pending=64)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port,
                                     log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not uv.started and time.time() < deadline:
    time.sleep(0.05)
  assert uv.started, "uvicorn did not start"
  yield {"url": f"http://127.0.0.1:{port}", "server": server, "engine": engine, "model": model}
  uv.should_exit = True
  thread.join(timeout=30)
  engine.shutdown()
