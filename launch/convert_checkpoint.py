"""Converts a Hugging Face safetensors directory into this project's orbax checkpoint.

    python launch/convert_checkpoint.py --model_path=HF_DIR --output_dir=OUT [--dtype=bfloat16]

The output holds `config.json`, the tokenizer files, and `params/` (orbax), and restores directly
into any mesh's sharding (`--model_path=OUT` in every launch script). Tensors are streamed one by one
onto the given mesh, so conversion never holds the whole model in host memory.
"""

from __future__ import annotations

from absl import app, flags

flags.DEFINE_string("model_path", None, "Hugging Face model directory.", required=True)
flags.DEFINE_string("output_dir", None, "Where to write the orbax checkpoint.", required=True)
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Stored parameter dtype.")
flags.DEFINE_string("devices", None, "Devices to stage through (count); default: all local.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from disagg_jax import parallel  # pylint: disable=g-import-not-at-top
  from disagg_jax.models import loading  # pylint: disable=g-import-not-at-top

  devices = parallel.pick_devices(FLAGS.devices) if FLAGS.devices else jax.devices()[:1]
  mesh = parallel.make_mesh(devices, len(devices))
  model = loading.load_model(FLAGS.model_path, mesh, FLAGS.dtype)
  loading.save_orbax(model, FLAGS.output_dir)
  print(f"wrote {FLAGS.output_dir}: {model.cfg.model_type}, {model.cfg.num_params() / 1e6:.1f}M "
        f"parameters in {FLAGS.dtype}")


if __name__ == "__main__":
  app.run(main)
