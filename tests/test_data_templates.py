"""Chat templates: fetched with a Hub model, chosen by data.chat_template, never a silent fallback."""

import fnmatch
import json

import pytest

from ftjax.config import base_config
from ftjax.data import selection, template
from ftjax.errors import FtjaxError
from ftjax.models import resolve
from ftjax.tokenizer import Tokenizer
from tiny import tiny_tokenizer


def test_hub_download_fetches_chat_template_jinja(tmp_path, monkeypatch):
  import huggingface_hub
  asked = {}

  def snapshot_download(repo_id, allow_patterns):
    asked["patterns"] = allow_patterns
    return str(tmp_path)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  assert resolve._hub_snapshot("org/model") == str(tmp_path)
  for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "config.json",
               "model.safetensors"):
    assert any(fnmatch.fnmatch(name, p) for p in asked["patterns"]), name


def _no_template():
  tok = tiny_tokenizer()
  return Tokenizer(tok.backend, eos_token="<|im_end|>", pad_token="<|im_end|>")


def _config(path, option):
  c = base_config()
  c.data.train, c.data.seq_len, c.data.chat_template = path, 128, option
  return c


@pytest.fixture
def chat_file(tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"input": "hello there", "output": "hi"}) + "\n")
  return str(path)


def test_conversations_without_a_template_are_an_error(chat_file):
  with pytest.raises(FtjaxError, match=r"chat\.jsonl:1: .* has no chat template; choose one with "
                                       r"data.chat_template='auto' .*'chatml', 'plain'"):
    selection.check(_config(chat_file, "auto"), _no_template())


def test_template_options(chat_file, tmp_path):
  _, kept = selection.check(_config(chat_file, "plain"), tok := _no_template())
  tex = template.tokenize_example(kept["train"][0], tok)
  assert tok.decode(tex.tokens.tolist(), skip_special_tokens=False) == "hello there\nhi<|im_end|>"

  _, kept = selection.check(_config(chat_file, "chatml"), tok := _no_template())
  assert tok.chat_template == template.CHATML
  tex = template.tokenize_example(kept["train"][0], tok)
  assert tok.decode(tex.tokens.tolist(), skip_special_tokens=False) == (
      "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n")

  jinja = tmp_path / "t.jinja"
  jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")
  _, kept = selection.check(_config(chat_file, str(jinja)), tok := _no_template())
  tex = template.tokenize_example(kept["train"][0], tok)
  assert tok.decode(tex.tokens.tolist(), skip_special_tokens=False) == (
      "[user] hello there\n[assistant] hi\n")
  with pytest.raises(FtjaxError, match="data.chat_template=.jinja2.; expected"):
    selection.check(_config(chat_file, "jinja2"), _no_template())
  with pytest.raises(FtjaxError, match="missing.jinja: cannot read the chat template"):
    selection.check(_config(chat_file, str(tmp_path / "missing.jinja")), _no_template())
