"""Sequence classification: ftjax's decoder with a linear `score` head on the last real token,
as transformers' `*ForSequenceClassification` (LlamaForSequenceClassification and its twins).

  SequenceClassifier
    model: Decoder                 the CausalLM's decoder, shared (not copied) by from_causal_lm
    score: nnx.Linear              kernel [d, num_labels], no bias (HF's `score.weight` [L, d])

No vocabulary projection: a prediction is one forward pass and a [d, L] matmul on one position
per row. Pooling (`last_token_index`) reproduces transformers exactly: the rightmost position
whose token is not `pad_token_id` (index 0 when a row is all padding; the last position when
there is no pad id), so left and right padding give the same logits. Training rows carry
segment ids instead (`segment_last_index`: the rightmost non-padding position), which is the
same position as long as a text does not end in the pad token (ftjax's classification data
appends no EOS for that reason).

HF directories in and out: `save_pretrained` writes what `AutoModelForSequenceClassification`
loads (the *ForSequenceClassification architecture, id2label / label2id, problem_type, the
score weight beside the decoder's); `load_pretrained` reads it back, or builds the head on a
causal-LM checkpoint (random `score`, as transformers does).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ftjax.errors import FtjaxError
from ftjax.files import MERGED, atomic_dir, check_export_target, read_json
from ftjax.models import from_params
from ftjax.models.config import ModelConfig, load_hf_config
from ftjax.models.hf import INDEX_FILE, load_hf_params, save_hf_params, tensor_files
from ftjax.models.llama import CausalLM, Decoder, axes

SCORE_TENSOR = "score.weight"
PROBLEM_TYPES = {"single_label": "single_label_classification",
                 "multi_label": "multi_label_classification"}


def last_token_index(tokens_bt, pad_token_id: int | None):
  """[b] index of each row's last token that is not `pad_token_id`, exactly as transformers'
  *ForSequenceClassification picks it (argmax of index * non-pad: 0 for an all-pad row)."""
  b, t = tokens_bt.shape
  if pad_token_id is None:
    return jnp.full((b,), t - 1, jnp.int32)
  non_pad = (tokens_bt != pad_token_id).astype(jnp.int32)
  return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * non_pad, axis=-1).astype(jnp.int32)


def segment_last_index(segment_ids_bt):
  """[b] index of each row's last non-padding position (segment id != 0)."""
  t = segment_ids_bt.shape[-1]
  real = (segment_ids_bt != 0).astype(jnp.int32)
  return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * real, axis=-1).astype(jnp.int32)


class SequenceClassifier(nnx.Module):
  """Decoder + `score` head. `model(tokens)` -> f32 logits [b, num_labels]."""

  output_module = "score"  # left out of PEFT's "all-linear": it trains whole (modules_to_save)

  def __init__(self, cfg: ModelConfig, num_labels: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs,
               decoder: Decoder | None = None):
    if num_labels < 1:
      raise FtjaxError(f"SequenceClassifier: num_labels={num_labels}; expected at least 1")
    self.model = decoder if decoder is not None else Decoder(
        cfg, dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs)
    self.score = nnx.Linear(cfg.hidden_size, num_labels, use_bias=False, dtype=dtype,
                            param_dtype=param_dtype, kernel_init=nnx.initializers.normal(init_std),
                            rngs=rngs, kernel_metadata=axes("embed", None))
    self.config = cfg
    self.num_labels = num_labels
    self.dtype = dtype

  @classmethod
  def from_causal_lm(cls, lm: CausalLM, num_labels: int, *, seed: int = 0,
                     init_std: float = 0.02) -> "SequenceClassifier":
    """A classifier on `lm`'s decoder (shared, not copied; the vocab head is dropped) with a new
    `score` drawn from N(0, init_std) as transformers initialises it (initializer_range 0.02)."""
    param_dtype = lm.model.embed_tokens.embedding[...].dtype
    return cls(lm.config, num_labels, dtype=lm.dtype, param_dtype=param_dtype, init_std=init_std,
               rngs=nnx.Rngs(seed), decoder=lm.model)

  def hidden_states(self, tokens_bt, **kwargs):
    """The decoder's final hidden states [b, t, d] (see CausalLM.hidden_states)."""
    return self.model(tokens_bt, **kwargs)

  @property
  def num_virtual_tokens(self) -> int:
    return self.model.num_virtual_tokens

  def pooled_logits(self, hidden_btd, last_b):
    """f32 logits [b, num_labels] of the hidden state at each row's `last_b` position."""
    pooled = jnp.take_along_axis(hidden_btd, last_b[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return self.score(pooled).astype(jnp.float32)

  def __call__(self, tokens_bt, *, pad_token_id: int | None = -1, segment_ids=None, **kwargs):
    """Logits [b, num_labels] pooled as transformers does: at the last token that is not
    `pad_token_id` (default: the config's). segment_ids is the attention mask (0: padding)."""
    pad = self.config.pad_token_id if pad_token_id == -1 else pad_token_id
    hidden = self.hidden_states(tokens_bt, segment_ids=segment_ids, **kwargs)
    return self.pooled_logits(hidden, last_token_index(tokens_bt, pad))


# --- HF directories ----------------------------------------------------------------------------

def architecture(cfg: ModelConfig) -> str:
  """"LlamaForCausalLM" -> "LlamaForSequenceClassification" (every family ftjax reads has one)."""
  return cfg.to_hf_dict()["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")


def hf_config(cfg: ModelConfig, labels: list[str], problem_type: str = "single_label") -> dict:
  """config.json of a *ForSequenceClassification model: id2label / label2id name the classes."""
  if problem_type not in PROBLEM_TYPES:
    raise FtjaxError(f"problem_type={problem_type!r}; expected one of {sorted(PROBLEM_TYPES)}")
  hf = cfg.to_hf_dict()
  hf["architectures"] = [architecture(cfg)]
  hf["id2label"] = {str(i): label for i, label in enumerate(labels)}
  hf["label2id"] = {label: i for i, label in enumerate(labels)}
  hf["problem_type"] = PROBLEM_TYPES[problem_type]
  if hf.get("pad_token_id") is None:  # transformers refuses batches > 1 without one
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    hf["pad_token_id"] = eos
  return hf


def save_pretrained(model: SequenceClassifier, out_dir: str, labels: list[str], tokenizer=None,
                    *, problem_type: str = "single_label", dtype=np.float32,
                    max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
  """Writes `model` (adapters folded in first: ftjax.peft.merge_and_unload) as a HF directory
  that `transformers.AutoModelForSequenceClassification.from_pretrained` loads: the decoder's
  tensors as save_hf_params writes them plus `score.weight` [L, d], and the config with the
  class names. Whole or not at all (ftjax.files.atomic_dir)."""
  if len(labels) != model.num_labels:
    raise FtjaxError(f"save_pretrained: {len(labels)} labels for a head of {model.num_labels}")
  if not isinstance(model.score, nnx.Linear):
    raise FtjaxError("save_pretrained: the score head is wrapped by an adapter; fold it in with "
                     "ftjax.peft.merge_and_unload(model) first")
  check_export_target(out_dir, MERGED, overwrite)
  cfg = model.config
  params = nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
  with atomic_dir(out_dir, MERGED, overwrite) as tmp:
    # tie_word_embeddings=True: the decoder's params without a vocab head
    files = save_hf_params({"model": params}, cfg.replace(tie_word_embeddings=True), tmp, dtype=dtype,
                           max_shard_bytes=max_shard_size)
    score = np.asarray(jax.device_get(model.score.kernel[...]), dtype).T
    _add_tensor_file(tmp, files, {SCORE_TENSOR: np.ascontiguousarray(score)})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({**hf_config(cfg, labels, problem_type), "torch_dtype": np.dtype(dtype).name}, f,
                indent=2)
    if tokenizer is not None:
      tokenizer.save(tmp)


def _add_tensor_file(out_dir: str, files: list[str], tensors: dict) -> None:
  """Adds `tensors` as one more shard beside `files` (what save_hf_params wrote), renaming the
  shards and writing the index so transformers reads them all."""
  total = len(files) + 1
  names = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
  weight_map = {}
  for old, new in zip(files, names):
    with safe_open(os.path.join(out_dir, old), framework="np") as f:
      weight_map.update({key: new for key in f.keys()})
    os.replace(os.path.join(out_dir, old), os.path.join(out_dir, new))
  save_file(tensors, os.path.join(out_dir, names[-1]), metadata={"format": "pt"})
  weight_map.update({key: names[-1] for key in tensors})
  size = sum(os.path.getsize(os.path.join(out_dir, n)) for n in names)  # headers included: a bound
  old_index = os.path.join(out_dir, INDEX_FILE)
  if os.path.exists(old_index):
    os.remove(old_index)
  with open(old_index, "w") as f:
    json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2)


def read_labels(model_dir: str) -> tuple[list[str] | None, str]:
  """(class names in id order, problem type "single_label" / "multi_label") from a HF
  config.json; names None when it is no sequence-classification config."""
  path = os.path.join(model_dir, "config.json")
  hf = read_json(path)
  problem = {v: k for k, v in PROBLEM_TYPES.items()}.get(hf.get("problem_type"), "single_label")
  archs = hf.get("architectures") or []
  if not any(str(a).endswith("ForSequenceClassification") for a in archs):
    return None, problem
  id2label = hf.get("id2label") or {}
  try:
    ids = sorted(int(k) for k in id2label)
  except ValueError:
    raise FtjaxError(f"{path}: id2label keys must be integers, got {sorted(id2label)[:3]}") from None
  if ids != list(range(len(ids))) or not ids:
    raise FtjaxError(f"{path}: id2label must name the classes 0..N-1, got ids {ids[:5]}")
  return [str(id2label[str(i)]) for i in ids], problem


def load_pretrained(model_dir: str, num_labels: int | None = None, *, dtype=jnp.float32,
                    seed: int = 0) -> tuple[SequenceClassifier, list[str] | None, str]:
  """A HF *ForSequenceClassification directory (saved by transformers or `save_pretrained`) ->
  (SequenceClassifier, class names, problem type). A causal-LM directory gets a new random
  `score` of `num_labels` outputs (names None)."""
  labels, problem = read_labels(model_dir)
  cfg = load_hf_config(model_dir)
  if labels is None:
    if not num_labels:
      raise FtjaxError(f"{model_dir}: a causal-LM checkpoint; say how many classes (num_labels)")
    lm = from_params(cfg, load_hf_params(model_dir, cfg, dtype=np.dtype(dtype)), dtype=dtype)
    return SequenceClassifier.from_causal_lm(lm, num_labels, seed=seed), None, problem
  if num_labels is not None and num_labels != len(labels):
    raise FtjaxError(f"{model_dir}: id2label names {len(labels)} classes, expected {num_labels}")
  params = load_hf_params(model_dir, cfg.replace(tie_word_embeddings=True), dtype=np.dtype(dtype),
                          read_elsewhere=(SCORE_TENSOR,))
  score = _read_tensor(model_dir, SCORE_TENSOR, (len(labels), cfg.hidden_size))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: SequenceClassifier(
      cfg, len(labels), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))))
  state = {"model": params["model"], "score": {"kernel": score.T.astype(np.dtype(dtype))}}
  return nnx.merge(graphdef, jax.device_put(state)), labels, problem


def _read_tensor(model_dir: str, name: str, shape: tuple) -> np.ndarray:
  where = tensor_files(model_dir)
  if name not in where:
    raise FtjaxError(f"{model_dir}: missing tensor {name!r} (expected shape {list(shape)})")
  with safe_open(where[name], framework="np") as f:
    tensor = f.get_tensor(name)
  if tuple(tensor.shape) != tuple(shape):
    raise FtjaxError(f"{where[name]}: tensor {name!r} has shape {list(tensor.shape)}, expected "
                     f"{list(shape)}")
  return tensor
