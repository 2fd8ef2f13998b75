"""Trains the built-in demo model: a small byte-level Llama on the Python standard library's sources.

    python launch/train_tiny.py --steps=1500 --output_dir=disagg_jax/demo_model

Text every machine with Python has, so the model can be retrained anywhere. Input pipeline in
grain, optimiser from optax, checkpoint written with orbax (in bfloat16, which keeps the committed
checkpoint small); the result loads with `launch/generate.py` like any other model.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time

from absl import app, flags, logging

flags.DEFINE_string("output_dir", "disagg_jax/demo_model", "Where to write the orbax checkpoint.")
flags.DEFINE_integer("steps", 1500, "Optimiser steps.")
flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens (bytes) per training sequence.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (cosine decay after warm-up).")
flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation and data order.")
flags.DEFINE_integer("eval_every", 250, "Evaluate held-out loss every this many steps.")
flags.DEFINE_string("source_dir", None, "Directory of .py files (default: this Python's stdlib).")
FLAGS = flags.FLAGS

HOLD_OUT_EVERY = 50  # every 50th file is held out for evaluation


def demo_config():
  from disagg_jax.models.config import ModelConfig, RopeConfig
  from disagg_jax.models.tokenizer import ByteTokenizer
  return ModelConfig(
      model_type="llama", vocab_size=288, hidden_size=256, intermediate_size=704, num_layers=4,
      num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=1024,
      rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), bos_token_id=ByteTokenizer.BOS,
      eos_token_ids=(ByteTokenizer.EOS,), pad_token_id=ByteTokenizer.PAD)


def corpus(source_dir: str | None):
  """(train tokens, held-out tokens) as uint16 arrays: files' bytes joined by EOS."""
  import numpy as np
  from disagg_jax.models.tokenizer import ByteTokenizer
  root = source_dir or sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  if not files:
    raise FileNotFoundError(f"no .py files under {root}")
  train, held_out = [], []
  for i, path in enumerate(files):
    with open(path, "rb") as f:
      data = np.frombuffer(f.read(), np.uint8).astype(np.uint16) + ByteTokenizer.OFFSET
    part = held_out if i % HOLD_OUT_EVERY == 0 else train
    part += [data, np.array([ByteTokenizer.EOS], np.uint16)]
  return np.concatenate(train), np.concatenate(held_out)


class Windows:
  """Random-access source of non-overlapping (seq_len + 1)-token windows, for grain."""

  def __init__(self, tokens, seq_len):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self):
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i):
    start = i * self.seq_len
    return self.tokens[start:start + self.seq_len + 1].astype("int32")


def main(argv):
  del argv
  import grain
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from disagg_jax import parallel
  from disagg_jax.engine.attention import PromptAttention
  from disagg_jax.models import loading
  from disagg_jax.models.llama import Transformer

  cfg = demo_config()
  train_tokens, eval_tokens = corpus(FLAGS.source_dir)
  logging.info("corpus: %d training bytes, %d held out; model: %.2fM parameters",
               len(train_tokens), len(eval_tokens), cfg.num_params() / 1e6)
  train_ds = (grain.MapDataset.source(Windows(train_tokens, FLAGS.seq_len))
              .shuffle(seed=FLAGS.seed).repeat().batch(FLAGS.batch_size, drop_remainder=True))
  eval_ds = grain.MapDataset.source(Windows(eval_tokens, FLAGS.seq_len)).batch(
      FLAGS.batch_size, drop_remainder=True)

  graphdef, params = nnx.split(Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(FLAGS.seed)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.learning_rate, FLAGS.warmup_steps,
                                                FLAGS.steps, FLAGS.learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b2=0.95, weight_decay=0.1))
  opt_state = optimizer.init(params)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    lengths = jnp.full((inputs.shape[0],), inputs.shape[1], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    hidden, _ = model(inputs, positions, PromptAttention(lengths, "xla"))
    logits = model.logits(hidden)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(loss_fn)

  def evaluate(params):
    losses = [float(eval_loss(params, jnp.asarray(b))) for _, b in zip(range(20), eval_ds)]
    return sum(losses) / len(losses)

  start = time.time()
  for step, batch in zip(range(1, FLAGS.steps + 1), train_ds):
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batch))
    if step % 50 == 0 or step == 1:
      logging.info("step %d  loss %.3f nats/byte  %.1f s", step, float(loss), time.time() - start)
    if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
      logging.info("step %d  held-out loss %.3f nats/byte", step, evaluate(params))

  mesh = parallel.make_mesh(jax.devices()[:1], 1)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  model = loading.Model(cfg, graphdef, bf16, mesh, jnp.bfloat16, None)
  loading.save_orbax(model, FLAGS.output_dir)
  logging.info("wrote %s after %.0f s", FLAGS.output_dir, time.time() - start)


if __name__ == "__main__":
  sys.exit(app.run(main))
