"""Chat templates: the model's own (`tokenizer_config.json`'s `chat_template`, Jinja) or a plain
fallback, rendered to the prompt text the model continues."""

from __future__ import annotations

import json
import os

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


class ChatTemplate:

  def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                undefined=jinja2.StrictUndefined)

    def raise_exception(message):
      raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    self.template = env.from_string(source)
    self.source = source
    self.bos_token, self.eos_token = bos_token, eos_token

  @classmethod
  def for_model(cls, model_dir: str | None) -> "ChatTemplate":
    """The template from `model_dir/tokenizer_config.json`, else the fallback."""
    path = os.path.join(model_dir, "tokenizer_config.json") if model_dir else None
    if path and os.path.exists(path):
      with open(path) as f:
        config = json.load(f)
      template = config.get("chat_template")
      if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
      if template:
        return cls(template, _token_text(config.get("bos_token")),
                   _token_text(config.get("eos_token")))
    return cls(FALLBACK_TEMPLATE)

  def render(self, messages: list[dict]) -> str:
    return self.template.render(messages=messages, add_generation_prompt=True,
                                bos_token=self.bos_token, eos_token=self.eos_token)


def _token_text(token) -> str:
  if isinstance(token, dict):
    return token.get("content", "")
  return token or ""
