"""GGUF export: tiny random-init models of each family, adapter folded in, written by
ftjax.export.save_gguf and read back by transformers' GGUF loader and by ftjax's."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from tiny import tiny_tokenizer
from ftjax import models, peft
from ftjax.errors import FtjaxError
from ftjax.export import merged_model, save_gguf
from ftjax.models.gguf import load_gguf
from ftjax.models.params import param_specs
from ftjax.tree import get_path, set_path
from ftjax.tokenizer import load_tokenizer, read_gguf_metadata

Q = gguf.GGMLQuantizationType
IDS = np.array([[3, 17, 99, 4, 56, 21, 8, 120, 77, 300, 64, 30]])
TYPES = ("f32", "f16", "q8_0", "q4_0")

# Relative max-abs logit error of both readers against the model rebuilt from the gguf package's
# round trip of the same tensors (so only float summation order differs): measured <= 3e-6.
READ_BACK_TOL = 1e-4
# Against the merged float model itself, the type's own rounding (measured on these models:
# f32 0, f16 ~4e-4, q8_0 ~1e-2, q4_0 ~0.15); bounds that a wrong tensor would blow through.
ROUNDING_TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2, "q4_0": 0.4}


def _family_config(family):
  config = hf_models.FAMILIES[family]()
  config.vocab_size = 512  # room for the tiny tokenizer's ~400 tokens, the rest [PAD] rows
  if family == "qwen3":
    # transformers' GGUF loader ignores qwen3.attention.key_length (its qwen3 table has no
    # entry) and keeps Qwen3Config's default head_dim, 128 (what real Qwen3 models use).
    config.head_dim = 128
  if family == "mistral":
    config.sliding_window = None  # a GGUF file has no sliding window: llama.cpp attends to all
  return config


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer()


def _hf_folder(folder: str, family: str, tokenizer) -> str:
  """A random-init HF model (norms and biases randomised so they matter) + tokenizer folder;
  loading it is ~30x faster than initialising a ftjax model on the 8 test CPU devices."""
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(_family_config(family), dtype=torch.float32)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(folder)
  tokenizer.save(folder)
  return folder


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "gemma"])
def exported(request, tmp_path_factory, tokenizer):
  """One family: a ftjax model with a LoRA adapter (random B, so the merge matters), its
  merged twin's logits, and the model exported as every type."""
  family = request.param
  folder = _hf_folder(str(tmp_path_factory.mktemp(f"gguf_{family}")), family, tokenizer)
  model, _ = models.load(folder)
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
  rng = np.random.RandomState(1)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, peft.LoraParam) and path[-1] == "lora_b":
      var.value = jnp.asarray(0.05 * rng.randn(*var.value.shape), var.value.dtype)
  merged = merged_model(model)
  adapted = _logits(model)
  files = {t: save_gguf(model, os.path.join(folder, f"model-{t}.gguf"), tokenizer, type=t)
           for t in TYPES}
  return dict(family=family, folder=folder, merged=merged, adapted=adapted, files=files,
              merged_logits=_logits(merged),
              tokenizer=tokenizer)


_forward = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)


def _logits(model) -> np.ndarray:
  """Jitted (one compile per config): eager forwards took ~2 s each on the CI machine."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(IDS)))


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _round_trip(w_hf: np.ndarray, qtype) -> np.ndarray:
  """What the gguf package's dequantisation gives back for a tensor of HF layout stored as
  `qtype` (1-D tensors and rows not filling whole blocks as save_gguf stores them)."""
  if w_hf.ndim < 2 or qtype == Q.F32:
    return w_hf
  if qtype == Q.F16 or w_hf.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
    return w_hf.astype(np.float16).astype(np.float32)
  return gguf.quants.dequantize(gguf.quants.quantize(w_hf, qtype), qtype)


def _rounded_model(merged, qtype):
  """The merged model with every tensor replaced by its round trip through `qtype`: the
  reference the exported file must reproduce. Rounding runs along HF's rows (input features),
  which llama.cpp's q/k row permutation only reorders, so it is done here without it."""
  cfg = merged.config
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
  out = {}
  for spec in param_specs(cfg):
    w = np.array(get_path(params, spec.path), np.float32)
    layers = [w[i] for i in range(w.shape[0])] if spec.stacked else [w]
    rounded = [(_round_trip(x.T, qtype).T if spec.transpose else _round_trip(x, qtype))
               for x in layers]
    set_path(out, spec.path, np.stack(rounded) if spec.stacked else rounded[0])
  return models.from_params(cfg, out)


@pytest.mark.parametrize("type_name", TYPES)
def test_export_loads_in_transformers_and_ftjax(exported, type_name):
  info = exported["files"][type_name]
  qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type_name]
  stored = {t.name: t.tensor_type for t in gguf.GGUFReader(info["path"]).tensors}
  assert stored["blk.0.ffn_down.weight"] == qtype and stored["output_norm.weight"] == Q.F32
  merged = exported["merged"]
  reference = _logits(_rounded_model(merged, qtype))
  cfg, params = load_gguf(info["path"])
  assert cfg.model_type == ("llama" if exported["family"] == "mistral" else exported["family"])
  ours = _logits(models.from_params(cfg, params))
  assert _rel(ours, reference) < READ_BACK_TOL
  if exported["family"] != "gemma":  # transformers 5.x: "architecture gemma is not supported yet"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        exported["folder"], gguf_file=os.path.basename(info["path"]), dtype=torch.float32).eval()
    with torch.no_grad():
      theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert _rel(theirs, reference) < READ_BACK_TOL
  # The merged model is the adapted one, and the file is it up to the type's rounding.
  assert _rel(exported["merged_logits"], exported["adapted"]) < 1e-5
  assert _rel(ours, exported["adapted"]) < ROUNDING_TOL[type_name]


def test_tokenizer_template_and_stop_ids(exported):
  """The gguf reader sees the chat template, EOS and end-of-turn ids; ftjax's GGUF tokenizer
  gives the same ids as the original, padded ids are UNUSED."""
  path = exported["files"]["q8_0"]["path"]
  tok = exported["tokenizer"]
  meta = read_gguf_metadata(path)
  im_end = tok.token_to_id("<|im_end|>")
  assert meta["tokenizer.chat_template"] == tok.chat_template
  assert meta["tokenizer.ggml.eot_token_id"] == meta["tokenizer.ggml.eos_token_id"] == im_end
  assert len(meta["tokenizer.ggml.tokens"]) == 512
  assert meta["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
  assert meta["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
  text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer: 42."}],
                                 add_generation_prompt=True)
  back = load_tokenizer(path)
  assert back.encode(text) == tok.encode(text)
  assert back.chat_template == tok.chat_template and back.eos_token_id == im_end


def test_bad_type_leaves_no_file(tmp_path, exported):
  with pytest.raises(FtjaxError, match="q4_k_m.*not supported"):
    save_gguf(exported["merged"], str(tmp_path / "x.gguf"), exported["tokenizer"], type="q4_k_m")
  assert not os.listdir(tmp_path)


def test_cli_writer_prints_and_writes_modelfile(tmp_path, capsys, tokenizer):
  """`python -m ftjax.export --gguf` writes through export.write_gguf: the file, an Ollama
  Modelfile with the ChatML Go template and stop token, and the run commands."""
  from ftjax.export import write_gguf
  model, _ = models.load(_hf_folder(str(tmp_path / "hf"), "qwen2", tokenizer))
  path = str(tmp_path / "gguf" / "model-q8_0.gguf")
  write_gguf(model, tokenizer, path, "q8_0")
  err = capsys.readouterr().err
  assert f"wrote GGUF {path}" in err and "q8_0" in err and "ollama create model-q8_0 -f" in err
  modelfile = open(tmp_path / "gguf" / "Modelfile").read()
  assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
  assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
  assert 'PARAMETER stop "<|im_end|>"' in modelfile
  assert sorted(os.listdir(tmp_path / "gguf")) == ["Modelfile", "model-q8_0.gguf"]
