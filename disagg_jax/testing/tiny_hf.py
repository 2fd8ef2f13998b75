"""Tiny random-weight Hugging Face checkpoints, built locally with `transformers` (test-only).

Each family exercises what sets it apart: Llama with llama3 rope scaling (in both config layouts),
Qwen2 with q/k/v bias and tied embeddings, Qwen3 with q/k RMSNorm and an explicit head_dim, Mistral
with a head_dim that is not hidden/heads. Weights are drawn wider than HF's default init so greedy
decoding has clear margins, and every bias and norm weight is random so a mis-loaded one shows.
"""

from __future__ import annotations

import json
import os

FAMILIES = ("llama3", "llama3_legacy_rope", "qwen2", "qwen3", "mistral")

VOCAB = 384
EOS = 7
BOS = 1
PAD = 0

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that the rescaled band covers frequencies the tests' positions exercise.
    "original_max_position_embeddings": 64,
}


def _config(family: str, num_layers: int = 2):
  import transformers  # pylint: disable=g-import-not-at-top
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
  if family in ("llama3", "llama3_legacy_rope"):
    return transformers.LlamaConfig(**common, rope_parameters=dict(_LLAMA3_ROPE),
                                    tie_word_embeddings=False)
  if family == "qwen2":
    return transformers.Qwen2Config(**common, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  if family == "qwen3":
    common.update(num_attention_heads=8, num_key_value_heads=2)
    return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  if family == "mistral":
    common.update(num_attention_heads=4, num_key_value_heads=1)
    return transformers.MistralConfig(**common, head_dim=24, sliding_window=None,
                                      rope_parameters={"rope_type": "default",
                                                       "rope_theta": 10000.0})
  raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def build_hf_model(family: str, seed: int = 0, num_layers: int = 2):
  """A transformers model of `family` with random weights, in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_config(family, num_layers),
                                                        attn_implementation="eager")
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if "norm" in name:
        param.copy_(1.0 + 0.2 * noise)
      else:
        param.copy_(0.15 * noise)
  return model.eval()


def write_checkpoint(family: str, out_dir: str, *, seed: int = 0, dtype: str = "float32",
                     max_shard_size: str | None = None, num_layers: int = 2):
  """Saves a tiny `family` checkpoint to out_dir and returns the transformers model (float32)."""
  import torch  # pylint: disable=g-import-not-at-top
  model = build_hf_model(family, seed, num_layers)
  to_save = model.to(torch.bfloat16) if dtype == "bfloat16" else model
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  to_save.save_pretrained(out_dir, **kwargs)
  if dtype == "bfloat16":
    model = model.to(torch.float32)
  if family == "llama3_legacy_rope":
    _rewrite_rope_legacy(out_dir)
  return model


def _rewrite_rope_legacy(out_dir: str) -> None:
  """Rewrites config.json in the layout published Llama 3.1 checkpoints use:
  a top-level `rope_theta` plus a `rope_scaling` dict."""
  path = os.path.join(out_dir, "config.json")
  with open(path) as f:
    hf = json.load(f)
  params = dict(hf.pop("rope_parameters"))
  hf["rope_theta"] = params.pop("rope_theta")
  hf["rope_scaling"] = params
  with open(path, "w") as f:
    json.dump(hf, f, indent=2)


SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>", "<r3>", "<r4>", "<r5>", "<r6>", "</s>"]  # ids 0..7


def write_tokenizer(out_dir: str, vocab_size: int = VOCAB) -> None:
  """A byte-level BPE `tokenizer.json` trained on a little text, with <s> = BOS and </s> = EOS at
  the ids the tiny configs use."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = ("The quick brown fox jumps over the lazy dog. " * 20 +
          "def main():\n    return 0\n" * 20 + "Disaggregated inference splits prefill. " * 20)
  tok.train_from_iterator([text], trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))])
  tok.save(os.path.join(out_dir, "tokenizer.json"))


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer_config(out_dir: str) -> None:
  """A tokenizer_config.json with a chat template, as chat models ship."""
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>",
               "add_bos_token": False}, f)
