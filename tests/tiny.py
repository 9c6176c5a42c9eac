"""A tiny ftjax-native model and random batches for train-step tests."""

import numpy as np
from flax import nnx

from ftjax.models import CausalLM
from ftjax.models.config import ModelConfig

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)


def tiny_model(seed=0, cfg=TINY, **kwargs) -> CausalLM:
  """Random init with std 0.1: large enough that every layer changes the logits."""
  return CausalLM(cfg, init_std=0.1, rngs=nnx.Rngs(seed), **kwargs)


def random_batch(rng: np.random.RandomState, batch: int, seq: int, vocab: int = 64):
  tokens = rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32)
  mask = (rng.rand(batch, seq) > 0.3).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def counting_batch(batch: int, seq: int, vocab: int = 64):
  """Rows count up from random starts (next token = this token + 1): learnable in a few steps."""
  starts = np.random.RandomState(0).randint(0, vocab, (batch, 1))
  tokens = ((starts + np.arange(seq + 1)) % vocab).astype(np.int32)
  ones = np.ones((batch, seq), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones.astype(np.float32),
          "segment_ids": ones, "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


def tiny_tokenizer(vocab_size: int = 400, corpus=()):
  """A byte-level BPE with ChatML special tokens, EOS = pad = <|im_end|> (like SmolLM2)."""
  from tokenizers import Tokenizer as Backend
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from ftjax.data import quickstart_task
  from ftjax.tokenizer import Tokenizer

  backend = Backend(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  lines = [e["input"] + "\n" + e["output"] for e in quickstart_task.make_examples(200, seed=7)]
  lines += list(corpus) + ["user assistant system"] * 10
  backend.train_from_iterator(lines, trainer)
  return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)


def make_model_dir(path, family: str = "llama", vocab_size: int = 512, seed: int = 0, corpus=()):
  """A random-init HF model + tokenizer folder that `resolve_model` loads like a real one."""
  import torch
  import transformers
  tok = tiny_tokenizer(corpus=corpus)
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
      tie_word_embeddings=True, initializer_range=0.1)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.save_pretrained(str(path))
  tok.save(str(path))
  return str(path)


def run_config(model_dir, data_dir, *, with_eval: bool = True, **overrides):
  """The config of a tiny run: the model folder of `make_model_dir`, the train (and eval) JSONL
  of `data_dir`, seq 128, batch 8, no warmup, no periodic eval, no forgetting probe, one device;
  `overrides` are dotted keys, e.g. run_config(m, d, **{"train.steps": 3, "method": "full"}).
  The forgetting probe (on in the base config) is off unless a test asks for it: it perplexes
  a general text and decodes general prompts with the base and the tuned model, 2 of a tiny
  run's ~10 CPU seconds, in every run that does not look at it."""
  import os
  from ftjax import config as config_lib
  c = config_lib.base_config()
  c.model.name_or_path = model_dir
  c.data.train = os.path.join(data_dir, "train.jsonl")
  if with_eval:
    c.data.eval = os.path.join(data_dir, "eval.jsonl")
  c.data.seq_len = 128
  c.train.batch_size = 8
  c.train.warmup_steps = 0
  c.train.eval_every = 0
  c.eval.forgetting = False
  c.mesh.data = 1  # one device: the sharding tests choose their meshes explicitly
  return set_dotted(c, overrides)


def set_dotted(c, overrides: dict):
  """`c` with dotted keys set, e.g. {"train.steps": 3}."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def quickstart_data(tmp_path_factory, n_train: int, n_eval: int) -> str:
  """A folder with train.jsonl / eval.jsonl of the quickstart task (seed 3)."""
  from ftjax.data import quickstart_task
  out = tmp_path_factory.mktemp("data")
  quickstart_task.write_splits(str(out), n_train=n_train, n_eval=n_eval, seed=3)
  return str(out)
