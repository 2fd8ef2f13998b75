import json
import math

import numpy as np
import pytest

from disagg_jax.bench import arrivals, workloads
from disagg_jax.bench.workloads import WorkloadError
from disagg_jax.models.tokenizer import ByteTokenizer


def test_random_lengths_ranges_and_seeding():
  reqs = workloads.build("random", num_prompts=300, vocab_size=100, tokenizer=None, seed=1,
                         input_len=40, output_len=10, range_ratio=0.5, first_id=3)
  lens = [len(r.prompt_token_ids) for r in reqs]
  outs = [r.output_len for r in reqs]
  assert min(lens) >= 20 and max(lens) <= 60 and min(outs) >= 5 and max(outs) <= 15
  assert len(set(lens)) > 10  # actually varies
  assert all(3 <= t < 100 for r in reqs for t in r.prompt_token_ids)
  again = workloads.build("random", num_prompts=300, vocab_size=100, tokenizer=None, seed=1,
                          input_len=40, output_len=10, range_ratio=0.5, first_id=3)
  assert again == reqs
  other = workloads.build("random", num_prompts=300, vocab_size=100, tokenizer=None, seed=2,
                          input_len=40, output_len=10, range_ratio=0.5, first_id=3)
  assert other != reqs


def test_presets():
  heavy = workloads.build("prefill_heavy", num_prompts=50, vocab_size=50, tokenizer=None, seed=0)
  light = workloads.build("decode_heavy", num_prompts=50, vocab_size=50, tokenizer=None, seed=0)
  assert np.mean([len(r.prompt_token_ids) for r in heavy]) > 10 * np.mean(
      [len(r.prompt_token_ids) for r in light])
  assert np.mean([r.output_len for r in light]) > 10 * np.mean([r.output_len for r in heavy])


def test_sharegpt_filtering(tmp_path):
  tok = ByteTokenizer()
  conv = lambda human, gpt: {"conversations": [{"from": "human", "value": human},
                                               {"from": "gpt", "value": gpt}]}
  data = [conv("hello there", "general kenobi"),  # kept
          conv("hi", "a long enough answer"),  # prompt < 4 tokens: dropped
          conv("a long enough question", "ok"),  # output < 4: dropped
          conv("x" * 1025, "fine answer"),  # prompt > 1024: dropped
          conv("y" * 1000, "z" * 1100),  # pair > 2048: dropped
          {"conversations": [{"from": "human", "value": "only one turn"}]},  # skipped
          conv("what is jax?", "a library")]  # kept
  path = tmp_path / "sharegpt.json"
  path.write_text(json.dumps(data))
  reqs = workloads.build("sharegpt", num_prompts=2, vocab_size=259, tokenizer=tok, seed=0,
                         dataset_path=str(path))
  assert sorted(tok.decode(r.prompt_token_ids) for r in reqs) == ["hello there", "what is jax?"]
  assert sorted(r.output_len for r in reqs) == [9, 14]
  with pytest.raises(WorkloadError, match="yields 2 usable conversations"):
    workloads.build("sharegpt", num_prompts=3, vocab_size=259, tokenizer=tok, seed=0,
                    dataset_path=str(path))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ('{"a": 1}', "must hold a JSON list"),
    ('[{"x": 1}]', "entry 0 has no 'conversations' list"),
])
def test_bad_sharegpt_files(content, message, tmp_path):
  path = tmp_path / "data.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(WorkloadError, match=message):
    workloads.load_sharegpt(str(path))


def test_lengths_beyond_the_model_fail_early():
  reqs = workloads.build("random", num_prompts=5, vocab_size=10, tokenizer=None, seed=0,
                         input_len=100, output_len=50, range_ratio=0.0)
  with pytest.raises(WorkloadError, match="100-token prompt; max_prefill_length is 64"):
    workloads.check_limits(reqs, max_seq_len=512, max_prefill_length=64)
  with pytest.raises(WorkloadError, match="request of 150 tokens .* max_seq_len is 128"):
    workloads.check_limits(reqs, max_seq_len=128, max_prefill_length=128)


def test_arrivals():
  poisson = arrivals.arrival_times(2000, request_rate=10.0, seed=0)
  gaps = np.diff(poisson)
  assert poisson[-1] == pytest.approx(200.0)  # rescaled: n / rate
  assert np.mean(gaps) == pytest.approx(0.1, rel=0.05)
  assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
  bursty = np.diff(arrivals.arrival_times(2000, 10.0, burstiness=0.25, seed=0))
  regular = np.diff(arrivals.arrival_times(2000, 10.0, burstiness=4.0, seed=0))
  assert np.std(bursty) > 1.5 * np.std(gaps) > 2 * np.std(regular)
  assert (arrivals.arrival_times(5, math.inf) == 0).all()
  np.testing.assert_array_equal(arrivals.arrival_times(50, 3.0, seed=7),
                                arrivals.arrival_times(50, 3.0, seed=7))
  for rate in (0.0, -1.0, math.nan):
    with pytest.raises(WorkloadError, match="must be positive"):
      arrivals.arrival_times(5, rate)
  with pytest.raises(WorkloadError, match="burstiness"):
    arrivals.arrival_times(5, 1.0, burstiness=0)


@pytest.mark.parametrize("name,prompt,output", [("1k_1k", 1024, 1024), ("4k_256", 4096, 256),
                                                ("8k_128", 8192, 128)])
def test_real_scale_grids(name, prompt, output):
  prompt_lens, output_lens = workloads.preset_lengths(name, 2000, seed=0)
  assert prompt_lens.min() >= int(prompt * 0.9) and prompt_lens.max() <= int(prompt * 1.1)
  assert output_lens.min() >= int(output * 0.9) and output_lens.max() <= int(output * 1.1)
  assert np.mean(prompt_lens) == pytest.approx(prompt, rel=0.02)
  assert np.mean(output_lens) == pytest.approx(output, rel=0.02)
  # The first n of a larger draw are a smaller draw; build() has the same lengths.
  small = workloads.preset_lengths(name, 5, seed=0)
  np.testing.assert_array_equal(small[0], prompt_lens[:5])
  reqs = workloads.build(name, num_prompts=5, vocab_size=100, tokenizer=None, seed=0,
                         first_id=3)
  assert [len(r.prompt_token_ids) for r in reqs] == small[0].tolist()
  assert [r.output_len for r in reqs] == small[1].tolist()
  assert all(3 <= t < 100 for r in reqs for t in r.prompt_token_ids)
  # Lengths can be overridden as for the demo presets.
  p, o = workloads.preset_lengths(name, 50, seed=0, input_len=100, output_len=10,
                                  range_ratio=0.0)
  assert set(p) == {100} and set(o) == {10}


def test_chat_is_sharegpt_like():
  prompt_lens, output_lens = workloads.preset_lengths("chat", 20000, seed=0)
  # DistServe's ShareGPT averages (755 / 200), pairs under 2,048 tokens, at least 4 each.
  assert np.mean(prompt_lens) == pytest.approx(755, rel=0.03)
  assert np.mean(output_lens) == pytest.approx(200, rel=0.03)
  assert (prompt_lens + output_lens).max() < 2048
  assert prompt_lens.min() >= 4 and output_lens.min() >= 4
  # Heavy-tailed: medians well below the means, long outputs present.
  assert np.median(output_lens) < 0.8 * np.mean(output_lens)
  assert np.percentile(output_lens, 99) > 3 * np.mean(output_lens)
  p, o = workloads.preset_lengths("chat", 20000, seed=0, input_len=1510, output_len=400)
  assert np.mean(p) == pytest.approx(1510, rel=0.05) and np.mean(o) == pytest.approx(400,
                                                                                   rel=0.05)
  with pytest.raises(WorkloadError, match="--random_range_ratio=0.5 does not apply to "
                     "--dataset_name=chat"):
    workloads.preset_lengths("chat", 10, seed=0, range_ratio=0.5)


def test_demo_presets_keep_their_lengths():
  """The CPU results in docs/BENCHMARKS.md use the demo-scale presets: same draws as before."""
  reqs = workloads.build("prefill_heavy", num_prompts=50, vocab_size=50, tokenizer=None, seed=0)
  p, o = workloads.preset_lengths("prefill_heavy", 50, seed=0)
  assert p.tolist() == [len(r.prompt_token_ids) for r in reqs]
  assert o.tolist() == [r.output_len for r in reqs]
  assert 288 <= p.min() and p.max() <= 480 and 12 <= o.min() and o.max() <= 20


def test_bad_dataset_names_say_what_is_allowed():
  with pytest.raises(WorkloadError, match=r"--dataset_name='16k_1' is not one of random, "
                     r"sharegpt, prefill_heavy, decode_heavy, chat, 1k_1k, 4k_256, 8k_128"):
    workloads.build("16k_1", num_prompts=1, vocab_size=10, tokenizer=None, seed=0)
  with pytest.raises(WorkloadError, match=r"--dataset_name='sharegpt' is not one of random, "
                     r"prefill_heavy"):
    workloads.preset_lengths("sharegpt", 1, seed=0)
  with pytest.raises(WorkloadError, match="--num_prompts=0"):
    workloads.preset_lengths("chat", 0, seed=0)


def test_multiturn_conversations_share_their_history():
  reqs = workloads.build("multiturn", num_prompts=30, vocab_size=100, tokenizer=None, seed=3,
                         output_len=5, prefix={"turns": 3, "prefix_len": 20, "num_prefixes": 2,
                                               "turn_len": 7, "think_time": 1.0})
  assert len(reqs) == 30 and max(r.conversation for r in reqs) == 9
  systems = {tuple(r.prompt_token_ids[:20]) for r in reqs}
  assert len(systems) == 2  # every conversation starts with one of the two system prompts
  for conv in range(10):
    turns = [r for r in reqs if r.conversation == conv]
    assert [len(r.prompt_token_ids) for r in turns] == [27, 39, 51]  # + 7 user + 5 answer
    for earlier, later in zip(turns, turns[1:]):
      assert later.prompt_token_ids[:len(earlier.prompt_token_ids)] == earlier.prompt_token_ids
      assert later.offset > earlier.offset
    assert turns[0].offset == 0.0
  ordered, times = arrivals.conversation_arrivals(reqs, 6.0, 1.0, 0)
  assert list(times) == sorted(times) and len(ordered) == 30
  # Conversations start at 6 / 3 = 2 per second: the tenth at 10 / 2 = 5 s (vLLM's rescaling).
  starts = [t for r, t in zip(ordered, times) if r.offset == 0.0]
  assert max(starts) == pytest.approx(5.0)
  again = workloads.build("multiturn", num_prompts=30, vocab_size=100, tokenizer=None, seed=3,
                          output_len=5, prefix={"turns": 3, "prefix_len": 20, "num_prefixes": 2,
                                                "turn_len": 7, "think_time": 1.0})
  assert again == reqs


def test_documents_and_bad_multiturn_flags():
  docs = workloads.build("documents", num_prompts=12, vocab_size=100, tokenizer=None, seed=0)
  assert {len(r.prompt_token_ids) for r in docs} == {352} and len(
      {tuple(r.prompt_token_ids[:320]) for r in docs}) <= 4
  assert all(r.offset == 0.0 for r in docs) and docs[-1].conversation == 11
  with pytest.raises(WorkloadError, match="--multiturn_turns=0 must be at least 1"):
    workloads.build("multiturn", num_prompts=4, vocab_size=100, tokenizer=None, seed=0,
                    prefix={"turns": 0})
  with pytest.raises(WorkloadError, match="--multiturn_think_time=-1"):
    workloads.build("multiturn", num_prompts=4, vocab_size=100, tokenizer=None, seed=0,
                    prefix={"think_time": -1.0})
