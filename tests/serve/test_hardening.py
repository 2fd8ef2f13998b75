"""The server against bad clients and dead workers (issue 18): one regression test per defect."""

import asyncio
import json
import threading
import time
import types

import httpx
import pytest

from disagg_jax import prompts as prompts_io
from disagg_jax.cluster.driver import ClusterEngine
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.serve.app import DISCONNECT_CHECK_S, Server

from tests.serve.test_server import wait_idle

COMPLETIONS = "/v1/completions"


def post(live_server, path, body, **kw):
  return httpx.post(live_server["url"] + path, json=body, timeout=60, **kw)


def long_body(max_tokens=240):
  return {"model": "tiny-qwen2", "prompt": [9, 10, 11], "max_tokens": max_tokens,
          "temperature": 0, "ignore_eos": True}


def finished_count(live_server, reason):
  for line in httpx.get(live_server["url"] + "/metrics").text.splitlines():
    if line.startswith(f'disagg_jax_requests_finished_total{{finish_reason="{reason}"}}'):
      return int(float(line.split()[-1]))
  return 0


# 1: a client that leaves while tokens flow (the tiny test model finishes a whole request in
# ~0.3 s, so the server's wait is driven here by a stub engine that never stops emitting).
def test_a_client_leaving_while_tokens_flow_is_noticed_within_the_check_period():
  aborted = []
  server = Server.__new__(Server)
  server.engine = types.SimpleNamespace(abort=lambda rid: aborted.append(time.monotonic()))
  left_at = time.monotonic() + 0.4

  class Client:
    async def is_disconnected(self):
      return time.monotonic() >= left_at

  async def serve():
    items = asyncio.Queue()

    async def produce():  # a token every 10 ms, forever
      while True:
        items.put_nowait((0, 1))
        await asyncio.sleep(0.01)
    producer = asyncio.create_task(produce())
    watch = [time.monotonic()]
    request = types.SimpleNamespace(handles=[types.SimpleNamespace(request_id="r")])
    while not aborted and time.monotonic() < left_at + 3:
      await server._next(Client(), items, request, watch)
    producer.cancel()
  asyncio.run(serve())
  assert aborted and aborted[0] - left_at < DISCONNECT_CHECK_S + 0.1


# 8: every request that ends is counted, aborted ones included.
def test_a_client_leaving_a_stream_is_counted_as_abort(live_server):
  engine = live_server["engine"]
  wait_idle(engine)
  aborted = finished_count(live_server, "abort")
  with httpx.Client(base_url=live_server["url"], timeout=30) as http:
    with http.stream("POST", COMPLETIONS, json={**long_body(), "stream": True}) as response:
      lines = response.iter_lines()
      assert [next(lines) for _ in range(4)]
  wait_idle(engine)
  deadline = time.time() + 5
  while finished_count(live_server, "abort") == aborted and time.time() < deadline:
    time.sleep(0.05)
  assert finished_count(live_server, "abort") == aborted + 1


# 2: health and fast failure when a phase has no live worker.
def test_cluster_health_names_the_dead_phase():
  def cluster(prefill_alive, decode_alive):
    # "retired": stopped on purpose by --elastic (not alive, not dead).
    worker = lambda alive: types.SimpleNamespace(alive=alive is True, retired=alive == "retired")
    return types.SimpleNamespace(error=None, _lock=threading.RLock(),
                                 prefill_workers=[worker(a) for a in prefill_alive],
                                 decode_workers=[worker(a) for a in decode_alive])
  assert ClusterEngine.health(cluster([True], [True, True])) == ("ok", None)
  assert ClusterEngine.health(cluster([True, "retired"], [True, True])) == ("ok", None)
  assert ClusterEngine.health(cluster([True, "retired"], [True, False])) == (
      "degraded", "1 of 2 decode workers died")
  assert ClusterEngine.health(cluster([True], [True, False])) == (
      "degraded", "1 of 2 decode workers died")
  assert ClusterEngine.health(cluster([True], [False, False])) == (
      "unavailable", "no decode worker is alive (all 2 died)")
  assert ClusterEngine.health(cluster([False], [True])) == (
      "unavailable", "no prefill worker is alive (all 1 died)")


def test_unavailable_engine_fails_requests_fast_with_503(live_server, monkeypatch):
  engine = live_server["engine"]
  monkeypatch.setattr(engine, "health", lambda: ("unavailable", "no decode worker is alive"),
                      raising=False)
  health = httpx.get(live_server["url"] + "/health")
  assert health.status_code == 503
  assert health.json() == {"status": "unavailable", "reason": "no decode worker is alive"}
  start = time.time()
  response = post(live_server, COMPLETIONS, long_body(4))
  assert response.status_code == 503 and time.time() - start < 2
  assert "no decode worker is alive" in response.json()["error"]["message"]
  monkeypatch.setattr(engine, "health", lambda: ("degraded", "1 of 2 decode workers died"),
                      raising=False)
  assert httpx.get(live_server["url"] + "/health").json() == {
      "status": "degraded", "reason": "1 of 2 decode workers died"}
  assert post(live_server, COMPLETIONS, long_body(4)).status_code == 200


# 3: lone surrogates, in every text field and in generate.py's input.
@pytest.mark.parametrize("path, body", [
    (COMPLETIONS, '{"model": "tiny-qwen2", "prompt": "a\\ud800b"}'),
    (COMPLETIONS, '{"model": "tiny-qwen2", "prompt": "hi", "stop": "\\udc00"}'),
    (COMPLETIONS, '{"model": "tiny\\ud800", "prompt": "hi"}'),
    ("/v1/chat/completions",
     '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "a\\ud800"}]}')])
def test_lone_surrogates_get_a_400(path, body, live_server):
  response = httpx.post(live_server["url"] + path, content=body, timeout=30,
                        headers={"content-type": "application/json"})
  assert response.status_code == 400, response.text
  assert "lone surrogate" in response.json()["error"]["message"]
  assert post(live_server, COMPLETIONS, long_body(2)).status_code == 200


def test_generate_input_keeps_good_lines_around_bad_text(tmp_path, live_server):
  path = tmp_path / "in.jsonl"
  # A lone surrogate; then U+2028 / U+2029 / U+0085 inside a valid line (not line ends).
  path.write_text('{"prompt": "hi"}\n{"prompt": "a\\ud800"}\n'
                  '{"prompt": "one\u2028two\u2029three\u0085four"}\n{"prompt": "bye"}\n',
                  encoding="utf-8")
  lines = prompts_io.read_prompts(str(path), live_server["engine"].tokenizer, SamplingParams())
  assert [l.line_number for l in lines] == [1, 2, 3, 4]
  assert [l.error is None for l in lines] == [True, False, True, True]
  assert "line 2: 'prompt' holds a lone surrogate U+D800" in lines[1].error


# 4: body size and tokenization off the event loop.
def test_oversized_bodies_get_413(live_server):
  server = live_server["server"]
  saved, server.max_request_bytes = server.max_request_bytes, 1000
  try:
    big = {"model": "tiny-qwen2", "prompt": "x " * 1000}
    declared = post(live_server, COMPLETIONS, big)
    assert declared.status_code == 413 and "--max_request_bytes" in declared.text
    chunks = (json.dumps(big)[i:i + 100].encode() for i in range(0, 2100, 100))
    chunked = httpx.post(live_server["url"] + COMPLETIONS, content=chunks, timeout=30,
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413
  finally:
    server.max_request_bytes = saved
  assert post(live_server, COMPLETIONS, long_body(2)).status_code == 200


def test_tokenizing_a_huge_prompt_does_not_block_other_clients(live_server):
  tokenizer = live_server["engine"].tokenizer
  text = "hello world " * 200_000  # 2.4 MB
  start = time.perf_counter()
  tokenizer.encode(text)
  alone = time.perf_counter() - start
  result = {}
  thread = threading.Thread(target=lambda: result.update(
      response=post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": text})))
  thread.start()
  time.sleep(min(0.3, alone / 4))
  start = time.perf_counter()
  assert httpx.get(live_server["url"] + "/health", timeout=30).status_code == 200
  waited = time.perf_counter() - start
  thread.join()
  assert result["response"].status_code == 400  # over max_prefill_length, once tokenized
  assert waited < alone / 2, (waited, alone)


# 5, 7: parameters accepted, refused by name, or taken as their default when null.
def test_long_stop_string_top_k_and_nulls_are_accepted(live_server):
  ok = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": [5, 6, 7],
                                        "max_tokens": 8, "stop": "Human:", "stream": None,
                                        "n": None, "top_k": None})
  assert ok.status_code == 200, ok.text
  greedy = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": [5, 6, 7],
                                            "max_tokens": 8, "temperature": 0})
  top1 = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": [5, 6, 7],
                                          "max_tokens": 8, "temperature": 1.0, "top_k": 1,
                                          "seed": 3})
  assert top1.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
  # min_p=1 keeps only the most likely token: greedy again.
  min_p = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": [5, 6, 7],
                                           "max_tokens": 8, "temperature": 1.0, "min_p": 1.0,
                                           "seed": 3})
  assert min_p.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("field, value", [("best_of", 2), ("logit_bias", {"5": 1}),
                                          ("suffix", "end")])
def test_unsupported_parameters_are_refused_by_name(field, value, live_server):
  response = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": "hi", field: value})
  assert response.status_code == 400
  assert f"`{field}` is not supported" in response.json()["error"]["message"]


def test_booleans_are_not_token_ids(live_server):
  response = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": [True, 2]})
  assert response.status_code == 400 and "true/false" in response.json()["error"]["message"]


def test_chat_content_as_text_parts(live_server):
  url = "/v1/chat/completions"
  base = {"model": "tiny-qwen2", "max_tokens": 6, "temperature": 0}
  text = post(live_server, url, {**base, "messages": [{"role": "user", "content": "hi there"}]})
  parts = post(live_server, url, {**base, "messages": [{"role": "user", "content": [
      {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})
  assert parts.status_code == 200, parts.text
  assert parts.json()["choices"][0]["message"] == text.json()["choices"][0]["message"]
  image = post(live_server, url, {**base, "messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "x"}}]}]})
  assert image.status_code == 400


# 8: observability.
def test_429_says_when_to_retry_and_overflow_blames_max_tokens(live_server):
  server = live_server["server"]
  saved, server.max_pending = server.max_pending, 0
  try:
    response = post(live_server, COMPLETIONS, long_body(2))
  finally:
    server.max_pending = saved
  assert response.status_code == 429 and response.headers["retry-after"] == "1"
  overflow = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": [5] * 10,
                                              "max_tokens": 250})
  assert overflow.status_code == 400 and overflow.json()["error"]["param"] == "max_tokens"
  metrics = httpx.get(live_server["url"] + "/metrics").text
  assert "disagg_jax_in_flight 0" in metrics and "disagg_jax_engine_in_flight" in metrics


# 9: the API key.
def test_api_key(live_server):
  server = live_server["server"]
  saved = server.api_key, server.open_paths
  server.api_key = "s3cret"
  try:
    assert post(live_server, COMPLETIONS, long_body(2)).status_code == 401
    wrong = post(live_server, COMPLETIONS, long_body(2), headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    right = post(live_server, COMPLETIONS, long_body(2),
                 headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert httpx.get(live_server["url"] + "/health").status_code == 200  # open by default
    server.open_paths = ()
    assert httpx.get(live_server["url"] + "/health").status_code == 401
  finally:
    server.api_key, server.open_paths = saved


def test_n_choices_are_seeded_requests_and_stream_by_index(live_server):
  base = {"model": "tiny-qwen2", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0.9,
          "ignore_eos": True}
  three = post(live_server, COMPLETIONS, {**base, "n": 3, "seed": 5}).json()
  assert [c["index"] for c in three["choices"]] == [0, 1, 2]
  singles = [post(live_server, COMPLETIONS, {**base, "seed": seed}).json()["choices"][0]["text"]
             for seed in (5, 6, 7)]
  assert [c["text"] for c in three["choices"]] == singles  # choice i samples with seed + i
  assert three["usage"]["completion_tokens"] == 18
  texts = {0: "", 1: ""}
  with httpx.Client(base_url=live_server["url"], timeout=60) as http:
    with http.stream("POST", COMPLETIONS, json={**base, "n": 2, "seed": 5,
                                                 "stream": True}) as response:
      for line in response.iter_lines():
        if line.startswith("data: {"):
          choice = json.loads(line[6:])["choices"][0]
          texts[choice["index"]] += choice["text"]
  assert [texts[0], texts[1]] == singles[:2]
  chat = post(live_server, "/v1/chat/completions", {
      "model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], "n": 2,
      "max_tokens": 4}).json()
  assert [c["index"] for c in chat["choices"]] == [0, 1]


def test_echo_puts_the_prompt_first(live_server):
  plain = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": "The fox",
                                           "max_tokens": 4, "temperature": 0}).json()
  echoed = post(live_server, COMPLETIONS, {"model": "tiny-qwen2", "prompt": "The fox",
                                            "max_tokens": 4, "temperature": 0,
                                            "echo": True}).json()
  assert echoed["choices"][0]["text"] == "The fox" + plain["choices"][0]["text"]


def _hf_logprobs(hf_checkpoint, prompt, output):
  import torch  # pylint: disable=g-import-not-at-top
  _, hf_model = hf_checkpoint("qwen2")
  with torch.no_grad():
    logits = hf_model(torch.tensor([list(prompt) + list(output)])).logits[0].double()
  return torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()


def test_completion_logprobs_match_transformers_streamed_or_not(live_server, hf_checkpoint):
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokenizer = live_server["engine"].tokenizer
  prompt = [5, 6, 7, 8]
  body = {"model": "tiny-qwen2", "prompt": prompt, "max_tokens": 6, "temperature": 0,
          "ignore_eos": True, "logprobs": 3}
  response = post(live_server, COMPLETIONS, body)
  assert response.status_code == 200, response.text
  lp = response.json()["choices"][0]["logprobs"]
  output = live_server["engine"].generate([prompt], SamplingParams(
      max_new_tokens=6, ignore_eos=True))[0].output_token_ids  # the same greedy tokens
  assert lp["tokens"] == [tokenizer.decode([t]) for t in output]
  expected = _hf_logprobs(hf_checkpoint, prompt, output)
  assert len(lp["token_logprobs"]) == 6 == len(lp["top_logprobs"]) == len(lp["text_offset"])
  np.testing.assert_allclose(lp["token_logprobs"], expected[np.arange(6), output], atol=1e-4)
  for i, top in enumerate(lp["top_logprobs"]):
    assert 1 <= len(top) <= 3  # tokens decoding to the same text share a key
    best = np.sort(expected[i])[::-1][:3]
    assert max(top.values()) == pytest.approx(best[0], abs=1e-4)
    assert all(np.isclose(best, v, atol=1e-4).any() for v in top.values())
    assert max(top.values()) == pytest.approx(lp["token_logprobs"][i], abs=1e-6)  # greedy
  assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"]])[:-1])
  # Streamed: one token's logprobs per chunk, the same values.
  streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
  with httpx.Client(base_url=live_server["url"], timeout=60) as http:
    with http.stream("POST", COMPLETIONS, json={**body, "stream": True}) as stream:
      for line in stream.iter_lines():
        if line.startswith("data: {"):
          chunk_lp = json.loads(line[6:])["choices"][0]["logprobs"]
          if chunk_lp is not None:
            for key in streamed:
              streamed[key] += chunk_lp[key]
  assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
  np.testing.assert_allclose(streamed["token_logprobs"], lp["token_logprobs"], atol=1e-6)


def test_chat_logprobs_and_top_logprobs(live_server):
  url = "/v1/chat/completions"
  base = {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}],
          "max_tokens": 5, "temperature": 0.9, "seed": 4}
  plain = post(live_server, url, base).json()["choices"][0]
  assert plain["logprobs"] is None
  response = post(live_server, url, {**base, "logprobs": True, "top_logprobs": 2})
  assert response.status_code == 200, response.text
  choice = response.json()["choices"][0]
  assert choice["message"] == plain["message"]  # asking for logprobs changes no token
  content = choice["logprobs"]["content"]
  assert "".join(c["token"] for c in content) == choice["message"]["content"]
  for entry in content:
    assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
    assert entry["bytes"] == list(entry["token"].encode())
    assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
  only = post(live_server, url, {**base, "logprobs": True}).json()["choices"][0]["logprobs"]
  assert [c["top_logprobs"] for c in only["content"]] == [[]] * len(content)


@pytest.mark.parametrize("path, fields, message", [
    (COMPLETIONS, {"logprobs": 21}, "less than or equal to 20"),
    (COMPLETIONS, {"logprobs": True}, "valid integer"),
    (COMPLETIONS, {"logprobs": 2, "echo": True}, "`logprobs` with `echo`"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "`top_logprobs` needs `logprobs: true`"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 30}, "less than or equal"),
])
def test_bad_logprobs_are_refused(path, fields, message, live_server):
  body = {"model": "tiny-qwen2", "max_tokens": 2, **fields}
  body.update({"prompt": "hi"} if path == COMPLETIONS else
              {"messages": [{"role": "user", "content": "hi"}]})
  response = post(live_server, path, body)
  assert response.status_code == 400 and message in response.json()["error"]["message"], (
      response.text)


def test_penalties_are_applied_as_the_engine_applies_them(live_server):
  engine = live_server["engine"]
  prompt = [5, 6, 7, 5, 6, 7]
  base = {"model": "tiny-qwen2", "prompt": prompt, "max_tokens": 12, "temperature": 0,
          "ignore_eos": True}
  tokenizer = engine.tokenizer
  plain = post(live_server, COMPLETIONS, base).json()["choices"][0]["text"]
  for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.5},
                 {"repetition_penalty": 2.0}):
    response = post(live_server, COMPLETIONS, {**base, **fields})
    assert response.status_code == 200, response.text
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                        **fields))[0].output_token_ids
    assert response.json()["choices"][0]["text"] == tokenizer.decode(expected)
    assert response.json()["choices"][0]["text"] != plain, fields  # they change greedy output
  for fields, message in (({"presence_penalty": 3}, "less than or equal to 2"),
                          ({"repetition_penalty": 0}, "greater than 0")):
    response = post(live_server, COMPLETIONS, {**base, **fields})
    assert response.status_code == 400 and message in response.json()["error"]["message"]
