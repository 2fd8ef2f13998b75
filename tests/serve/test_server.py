"""The server with OpenAI's own client, and the bad requests OpenAI's API answers with 400/404."""

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.testing import helpers, tiny_hf


def client(live_server):
  return openai.OpenAI(base_url=live_server["url"] + "/v1", api_key="unused")


def expected_texts(live_server, prompts, max_tokens):
  """The reference path's greedy continuations, as (text, finish_reason)."""
  if "reference" not in live_server:  # one generator (one compilation) per server
    live_server["reference"] = helpers.static_generator(live_server["model"], max_batch=32)
  outs = live_server["reference"].generate(prompts, SamplingParams(max_new_tokens=max_tokens))
  return [(o.text, o.finish_reason) for o in outs]


def expected_text(live_server, prompt_ids, max_tokens):
  return expected_texts(live_server, [prompt_ids], max_tokens)[0]


def test_completions_streamed_and_not_match_the_reference(live_server):
  c = client(live_server)
  prompt = helpers.random_prompts((20,), tiny_hf.VOCAB, seed=30, low=8)[0]
  text, reason = expected_text(live_server, prompt, 24)
  response = c.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=24,
                                  temperature=0)
  assert response.choices[0].text == text
  assert response.choices[0].finish_reason == reason
  assert response.usage.prompt_tokens == 20
  chunks = list(c.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=24,
                                     temperature=0, stream=True,
                                     stream_options={"include_usage": True}))
  streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
  assert streamed == text
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reason
  assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
  # The same prompt again: its first (whole) page was cached by the first request.
  assert response.usage.prompt_tokens_details.cached_tokens in (0, 16)
  assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 16
  text_response = c.completions.create(model="tiny-qwen2", prompt="The quick brown fox",
                                       max_tokens=8, temperature=0)
  ids = live_server["model"].tokenizer.encode("The quick brown fox")
  assert text_response.choices[0].text == expected_text(live_server, ids, 8)[0]


def test_chat_streamed_and_not(live_server):
  c = client(live_server)
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "def main():"}]
  full = c.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=16,
                                   temperature=0, seed=1)
  streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
      model="tiny-qwen2", messages=messages, max_tokens=16, temperature=0, stream=True))
  assert full.choices[0].message.content == streamed
  assert full.choices[0].message.role == "assistant"
  rendered = "<s><|system|>Be brief.<|user|>def main():<|assistant|>"
  ids = live_server["model"].tokenizer.encode(rendered)
  assert full.usage.prompt_tokens == len(ids)
  assert streamed == expected_text(live_server, ids, 16)[0]


def test_stop_sequences_cut_the_text_identically(live_server):
  c = client(live_server)
  prompt = helpers.random_prompts((10,), tiny_hf.VOCAB, seed=31, low=8)[0]
  free = c.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=30, temperature=0,
                              extra_body={"ignore_eos": True}).choices[0].text
  assert len(free) > 6
  stop = free[4:6]
  cut = c.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=30, temperature=0,
                             stop=[stop], extra_body={"ignore_eos": True}).choices[0]
  assert cut.text == free[:free.index(stop)] and cut.finish_reason == "stop"
  streamed = "".join(ch.choices[0].text for ch in c.completions.create(
      model="tiny-qwen2", prompt=prompt, max_tokens=30, temperature=0, stop=[stop], stream=True,
      extra_body={"ignore_eos": True}))
  assert streamed == cut.text


def test_32_concurrent_clients(live_server):
  prompts = helpers.random_prompts([5 + i for i in range(32)], tiny_hf.VOCAB, seed=32, low=8)
  expected = [text for text, _ in expected_texts(live_server, prompts, 10)]

  def ask(i):
    stream = i % 2 == 0
    c = client(live_server)
    if stream:
      return "".join(ch.choices[0].text for ch in c.completions.create(
          model="tiny-qwen2", prompt=prompts[i], max_tokens=10, temperature=0, stream=True))
    return c.completions.create(model="tiny-qwen2", prompt=prompts[i], max_tokens=10,
                                temperature=0).choices[0].text

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    results = list(pool.map(ask, range(32)))
  assert results == expected


def wait_idle(engine, timeout=30):
  deadline = time.time() + timeout
  while time.time() < deadline:
    stats = engine.stats()
    if stats["in_flight"] == 0 and stats["free_pages"] == stats["total_pages"]:
      return stats
    time.sleep(0.05)
  raise AssertionError(f"engine not idle: {engine.stats()}")


def test_disconnect_mid_stream_frees_the_request(live_server):
  engine = live_server["engine"]
  wait_idle(engine)
  body = {"model": "tiny-qwen2", "prompt": [9, 10, 11], "max_tokens": 200, "temperature": 0,
          "stream": True, "ignore_eos": True}
  with httpx.Client(base_url=live_server["url"], timeout=30) as http:
    with http.stream("POST", "/v1/completions", json=body) as response:
      lines = response.iter_lines()
      got = [next(lines) for _ in range(6)]
      assert any(l.startswith("data: ") for l in got)
      assert engine.stats()["running"] == 1
  stats = wait_idle(engine)  # aborted: slot and pages back, well before 200 tokens
  assert stats["running"] == 0
  metrics = httpx.get(live_server["url"] + "/metrics").text
  assert 'finish_reason="abort"' in metrics


@pytest.mark.parametrize("body, status, message", [
    ('{"model": "tiny-qwen2", "prompt": [1, 2', 400, "not valid JSON"),
    (b'{"model": "tiny-qwen2", "prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ({"model": "tiny-qwen2", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny-qwen2", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny-qwen2", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"model": "tiny-qwen2", "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny-qwen2", "prompt": [5] * 10, "max_tokens": 300}, 400, "exceeds max_seq_len 256"),
    ({"model": "tiny-qwen2", "prompt": [5] * 300, "max_tokens": 1}, 400, "max_prefill_length is 256"),
    ({"model": "tiny-qwen2", "prompt": [5, 100000]}, 400, "outside the vocabulary"),
    ({"model": "tiny-qwen2", "prompt": []}, 400, "at least 1"),
    ({"model": "tiny-qwen2", "prompt": ""}, 400, "at least 1"),
    ({"model": "tiny-qwen2", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny-qwen2", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-qwen2", "prompt": "hi", "n": 17}, 400, "n"),
    ({"model": "tiny-qwen2", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "gpt-5", "prompt": "hi"}, 404, "does not exist"),
])
def test_bad_requests_get_openai_errors(body, status, message, live_server):
  content = body if isinstance(body, (str, bytes)) else json.dumps(body)
  response = httpx.post(live_server["url"] + "/v1/completions", content=content,
                        headers={"content-type": "application/json"}, timeout=30)
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert message in error["message"] and error["type"]
  ok = httpx.post(live_server["url"] + "/v1/completions", timeout=30,
                  json={"model": "tiny-qwen2", "prompt": [5, 6], "max_tokens": 2})
  assert ok.status_code == 200  # still serving


def test_chat_bad_requests(live_server):
  url = live_server["url"] + "/v1/chat/completions"
  for body, text in [({"model": "tiny-qwen2", "messages": []}, "messages"),
                     ({"model": "tiny-qwen2", "messages": [{"role": "wizard", "content": "x"}]},
                      "role"),
                     ({"model": "tiny-qwen2", "messages": [{"role": "user"}]}, "content")]:
    response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == 400 and text in response.json()["error"]["message"]


def test_backpressure_429(live_server):
  server = live_server["server"]
  server.max_pending, saved = 0, server.max_pending
  try:
    response = httpx.post(live_server["url"] + "/v1/completions", timeout=30,
                          json={"model": "tiny-qwen2", "prompt": "hi", "max_tokens": 2})
  finally:
    server.max_pending = saved
  assert response.status_code == 429
  assert response.json()["error"]["type"] == "rate_limit_error"


def test_models_health_metrics(live_server):
  url = live_server["url"]
  models = httpx.get(url + "/v1/models").json()
  assert models["data"][0]["id"] == "tiny-qwen2" and models["data"][0]["max_model_len"] == 256
  assert httpx.get(url + "/health").json() == {"status": "ok"}
  metrics = httpx.get(url + "/metrics").text
  for name in ("disagg_jax_running", "disagg_jax_waiting", "disagg_jax_page_usage",
               "disagg_jax_time_to_first_token_seconds_bucket",
               "disagg_jax_inter_token_latency_seconds_count", "disagg_jax_request_prefill_seconds_sum",
               "disagg_jax_request_queue_seconds_count", "disagg_jax_cached_pages",
               "disagg_jax_prompt_tokens_total", "disagg_jax_cached_prompt_tokens_total",
               "disagg_jax_prefix_cache_hit_rate"):
    assert name in metrics, name
