"""The prefill router (`sched.routing`): prefix affinity weighed against queued tokens."""

import pytest

from disagg_jax.sched.routing import Candidate, PrefixIndex, Router

PS = 16


def _prompt(prefix: int, tail: int, n: int):
  """`n` tokens: system prompt `prefix` (48 tokens) then a tail that differs by `tail`."""
  return [1000 + prefix] * 48 + [tail] * (n - 48)


def test_prefix_routing_follows_the_prefix_and_weighs_load():
  router = Router("prefix", PS)
  workers = [Candidate("a", 0, 100), Candidate("b", 0, 100)]
  first = router.choose(workers, _prompt(1, 7, 80))
  other = "b" if first == "a" else "a"
  # A second system prompt goes to the other, idle worker only when both are equally loaded:
  # it is a miss everywhere, so the least queued wins (ties: the first candidate).
  assert router.choose(workers, _prompt(2, 7, 80)) == "a"
  # The same system prompt returns to the worker holding it: 48 cached tokens (3 pages).
  assert router.expected_hit(Candidate(first, 0, 100), _prompt(1, 9, 80)) == 48
  assert router.choose(workers, _prompt(1, 9, 80)) == first
  # ... unless that worker's queue costs more than the prefix saves.
  # Cost: queued + 80 - 48 against 0 + 80.
  loaded = [Candidate(first, 40, 100), Candidate(other, 0, 100)]
  assert router.choose(loaded, _prompt(1, 12, 80)) == first
  loaded = [Candidate(first, 60, 100), Candidate(other, 0, 100)]
  assert router.choose(loaded, _prompt(1, 11, 80)) == other
  # Now both hold it: the less loaded one wins.
  assert router.choose(loaded, _prompt(1, 13, 80)) == other


def test_the_last_token_is_never_counted_cached():
  router = Router("prefix", PS)
  workers = [Candidate(0, 0, 100), Candidate(1, 0, 100)]
  prompt = list(range(32))  # two full pages
  router.choose(workers, prompt)
  assert router.expected_hit(workers[0], prompt) == 16  # the second page ends at the last token


def test_workers_without_a_cache_are_routed_by_load():
  router = Router("prefix", PS)
  workers = [Candidate(0, 30, 0), Candidate(1, 10, 0)]
  assert [router.choose(workers, _prompt(1, 7, 80)) for _ in range(3)] == [1, 1, 1]


def test_round_robin_and_load():
  workers = [Candidate(k, q, 100) for k, q in enumerate((5, 0, 9))]
  rr = Router("round_robin", PS)
  assert [rr.choose(workers, _prompt(1, 7, 80)) for _ in range(4)] == [0, 1, 2, 0]
  assert Router("load", PS).choose(workers, _prompt(1, 7, 80)) == 1


def test_index_is_bounded_lru():
  index = PrefixIndex(3)
  index.add([b"a", b"b"])
  index.add([b"c"])
  index.add([b"a"])  # used again: now the most recent
  index.add([b"d"])  # evicts b, the least recent
  assert len(index) == 3 and index.match([b"a"]) == 1 and index.match([b"b"]) == 0
  assert index.match([b"c", b"d", b"b"]) == 2


def test_unknown_routing_names_the_flag():
  with pytest.raises(ValueError, match=r"--config.engine.routing='nearest' is not one of prefix"):
    Router("nearest", PS)


def test_a_conversation_returns_to_the_decode_worker_that_holds_it():
  router = Router("prefix", PS)
  decode = lambda tail: [Candidate(("decode", k), 0, 200, tail) for k in (0, 1)]
  first_turn = _prompt(1, 7, 80) + [5] * 20  # prompt and answer, as it ended on worker 1
  router.record(decode(32)[1], first_turn)
  follow_up = first_turn + [6] * 20  # 100 tokens of 120 held (6 pages): a 20-token tail
  assert router.choose_local(decode(32), follow_up) == ("decode", 1)
  assert router.choose_local(decode(16), follow_up) is None  # tail too long
  # Each worker's own limit counts: a longer one elsewhere does not let worker 1 take it.
  assert router.choose_local([Candidate(("decode", 0), 0, 200, 64), decode(16)[1]],
                             follow_up) is None
  assert router.choose_local(decode(32), _prompt(2, 7, 80)) is None  # held nowhere
  assert Router("round_robin", PS).choose_local(decode(32), follow_up) is None
  # A worker that does not cache is never chosen.
  assert router.choose_local([Candidate(("decode", 1), 0, 0, 32)], follow_up) is None
