"""The pure-JAX references against a direct NumPy loop (the ground truth for every kernel)."""

import numpy as np

from pallas_kernels import reference


def naive_attention(q, k, v, valid):
  """q [Hq, D], k/v [T, Hkv, D], valid bool[T] -> [Hq, D] (zeros if nothing is valid)."""
  hq, d = q.shape
  group = hq // k.shape[1]
  out = np.zeros((hq, d))
  if not valid.any():
    return out
  for h in range(hq):
    s = k[valid, h // group] @ q[h] / np.sqrt(d)
    p = np.exp(s - s.max())
    out[h] = (p / p.sum()) @ v[valid, h // group]
  return out


def test_prefill_reference():
  rng = np.random.default_rng(0)
  b, s, hq, hkv, d = 3, 9, 4, 2, 8
  q, k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
  lengths = np.array([9, 4, 0], np.int32)
  out = np.asarray(reference.prefill_attention(q, k, v, lengths))
  for bi in range(b):
    for i in range(s):
      valid = (np.arange(s) <= i) & (np.arange(s) < lengths[bi]) & (i < lengths[bi])
      np.testing.assert_allclose(out[bi, i], naive_attention(q[bi, i], k[bi], v[bi], valid),
                                 atol=1e-6)


def test_paged_references():
  rng = np.random.default_rng(1)
  b, hq, hkv, d, ps, max_pages, num_pages = 3, 4, 1, 8, 4, 3, 10
  k_pages, v_pages = rng.normal(size=(2, hkv, num_pages, ps, d)).astype(np.float32)
  page_table = rng.permutation(num_pages)[:b * max_pages].reshape(b, max_pages).astype(np.int32)
  dense_k = k_pages[:, page_table].reshape(hkv, b, max_pages * ps, d).transpose(1, 2, 0, 3)
  dense_v = v_pages[:, page_table].reshape(hkv, b, max_pages * ps, d).transpose(1, 2, 0, 3)
  lengths = np.array([12, 5, 0], np.int32)
  q = rng.normal(size=(b, hq, d)).astype(np.float32)
  out = np.asarray(reference.paged_decode_attention(q, k_pages, v_pages, lengths, page_table))
  for bi in range(b):
    valid = np.arange(max_pages * ps) < lengths[bi]
    np.testing.assert_allclose(out[bi], naive_attention(q[bi], dense_k[bi], dense_v[bi], valid),
                               atol=1e-6)
  c = 3
  qc = rng.normal(size=(b, c, hq, d)).astype(np.float32)
  context, chunk = np.array([4, 0, 9], np.int32), np.array([3, 2, 0], np.int32)
  out = np.asarray(reference.chunked_prefill_attention(qc, k_pages, v_pages, context, chunk,
                                                       page_table))
  for bi in range(b):
    for i in range(c):
      valid = (np.arange(max_pages * ps) <= context[bi] + i) & (i < chunk[bi])
      np.testing.assert_allclose(
          out[bi, i], naive_attention(qc[bi, i], dense_k[bi], dense_v[bi], valid), atol=1e-6)
