"""Batched text generation with the decoder's KV cache, and `python -m ftjax.generate`.

Prompts of different lengths are left-padded so every row's next token sits in the same last
column: padding has segment id 0 (never attended to) and positions come from the mask, so a
padded row computes exactly what it would alone. One jitted prefill, then the whole decode loop
in one jitted `lax.while_loop` (token -> logits -> greedy pick or top-k / top-p sample -> the
next token), which stops once every row has emitted a stop token: no host round trip per
token, and the cache and output buffer are donated. With a progress bar the loop runs in
chunks of tokens, reporting between them. The model is split into (graphdef, state) once per
call; the jitted functions merge it while tracing, so no token pays for a graph walk, and the
arrays stay where they are (sharded on a mesh, in the model's compute dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import numbers
import os
import sys
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ftjax.errors import FtjaxError, cli_errors, setup_logging
from ftjax.models import CausalLM
from ftjax.models import load
from ftjax.models.config import ModelConfig
from ftjax.parallel import sharding

log = logging.getLogger(__name__)

_WIDTH_BUCKET = 16
_PROGRESS_CHUNK = 8  # new tokens per decode call while a progress bar is shown


def _bucketed(n: int) -> int:
  """`n` rounded up to a multiple of the width bucket (prompt widths and cache lengths)."""
  return -(-n // _WIDTH_BUCKET) * _WIDTH_BUCKET


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, tokens, mask, cache, index):
  """Left-padded prompt chunk written at cache slot `index`, after `index` cached tokens."""
  model = nnx.merge(graphdef, state)
  positions = index + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, cache = model.hidden_states(tokens, positions=positions, segment_ids=mask, cache=cache,
                                      cache_index=index)
  # Only the last position's logits are needed: the vocab head over every prompt token would
  # cost as much as a fifth of the prefill and [b, t, vocab] floats of memory.
  return model.logits(hidden[:, -1]), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length"))
def _new_cache(graphdef, state, batch, length):
  """The model's KV cache for `length` tokens (with any virtual tokens of an adapter in it)."""
  return nnx.merge(graphdef, state).init_cache(batch, length)


@jax.jit
def _tile_prefix(cache, prefix_cache):
  """Copies a batch-1 cache of a shared prompt prefix into every row of the batch cache."""
  def put(full, part):
    return jax.lax.dynamic_update_slice(full, jnp.broadcast_to(part, (full.shape[0], full.shape[1], *part.shape[2:])).astype(full.dtype),
                                        (0,) * full.ndim)
  return jax.tree.map(put, cache, prefix_cache)


def _on_mesh_of(state, cache):
  """The KV cache sharded like the activations (batch over data/fsdp, kv heads over tensor)
  when the model is on a mesh; left where it is otherwise. XLA would put a fresh cache on one
  device: the whole batch's keys and values, next to a model spread over many."""
  mesh = next((x.sharding.mesh for x in jax.tree.leaves(state)
               if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  if mesh is None or mesh.size == 1:
    return cache
  return jax.device_put(cache, cache_shardings(mesh, cache))


def cache_shardings(mesh, cache) -> dict:
  """The NamedSharding of each KV cache array on `mesh` (arrays or ShapeDtypeStructs: ftjax.plan
  sizes a cache it never allocates)."""
  axes = {"k": ("layers", "batch", None, "kv_heads", None),
          "v": ("layers", "batch", None, "kv_heads", None), "segment": ("layers", "batch", None)}
  return {name: NamedSharding(mesh, sharding.logical_to_spec(axes[name], x.shape, mesh))
          for name, x in cache.items()}


def cache_length(prompt_width: int, max_new_tokens: int) -> int:
  """The KV cache length `generate_ids(..., prompt_width=...)` allocates for prompts no longer
  than `prompt_width`: the width rounded up to the bucket, plus the new tokens."""
  return _bucketed(prompt_width) + max_new_tokens


def _shared_prefix_len(prompts: list[list[int]]) -> int:
  """Tokens every prompt starts with (a system prompt, few-shot examples), rounded down to the
  width bucket; each row keeps at least one token of its own."""
  if len(prompts) < 2:
    return 0
  n = min(len(p) for p in prompts) - 1
  k = 0
  first = prompts[0]
  while k < n and all(p[k] == first[k] for p in prompts):
    k += 1
  return k // _WIDTH_BUCKET * _WIDTH_BUCKET


def warp_logits(logits, temperature, top_k: int = 0, top_p=1.0):
  """Sampling logits as transformers' warpers make them, in their order: divided by
  `temperature` (> 0), then every token outside the `top_k` largest (0: off) and outside the
  nucleus (the fewest top tokens whose probability reaches `top_p`; 1: off) set to -inf. The
  most likely token always survives."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    ahead = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    # transformers drops a token when the ascending cumulative mass up to it is <= 1 - top_p,
    # i.e. when the mass ranked above it is >= top_p; the top token (ahead = 0) always stays.
    keep = (ahead < top_p).at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


@dataclasses.dataclass(frozen=True)
class _Sampler:
  """The static part of the sampling settings: one compile per combination."""
  sample: bool  # False: greedy (temperature 0)
  top_k: int
  top_p: bool  # nucleus filter on (its threshold is traced)

  def pick(self, logits, key, temperature, top_p):
    if not self.sample:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, temperature, self.top_k, top_p if self.top_p else None)
    return jax.random.categorical(key, warped, axis=-1).astype(jnp.int32)


def _record(carry, token, eos):
  """Writes each row's new token at column `step` (pad for finished rows) and marks the rows
  that just emitted a stop token as done."""
  step, done = carry["step"], carry["done"]
  column = jnp.where(done, carry["out"][:, step], token)
  out = jax.lax.dynamic_update_slice(carry["out"], column[:, None], (0, step))
  return dict(carry, out=out, token=token, done=done | jnp.isin(token, eos), step=step + 1)


@functools.partial(jax.jit, static_argnames=("sampler",))
def _first_token(logits, carry, eos, key, temperature, top_p, sampler):
  token = sampler.pick(logits, jax.random.fold_in(key, 0), temperature, top_p)
  return _record(carry, token, eos)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler"), donate_argnames=("carry",))
def _decode(graphdef, state, carry, stop, eos, key, temperature, top_p, sampler):
  """New tokens until `stop` are written or every row is done, inside one while_loop: no host
  round trip per token. The cache and output buffer are donated and updated in place."""
  model = nnx.merge(graphdef, state)

  def body(carry):
    token = carry["token"]
    hidden, cache = model.hidden_states(token[:, None], positions=carry["position"][:, None],
                                        segment_ids=jnp.ones_like(token)[:, None],
                                        cache=carry["cache"], cache_index=carry["index"])
    logits = model.logits(hidden[:, 0])
    # The key of token n depends only on (seed, n): chunking the loop never changes a sample.
    token = sampler.pick(logits, jax.random.fold_in(key, carry["step"]), temperature, top_p)
    carry = dict(carry, cache=cache, position=carry["position"] + 1, index=carry["index"] + 1)
    return _record(carry, token, eos)

  def more(carry):
    return (carry["step"] < stop) & ~jnp.all(carry["done"])

  return jax.lax.while_loop(more, body, carry)


def stop_token_ids(cfg: ModelConfig, extra: Iterable[int | None] = ()) -> set[int]:
  """The config's EOS id(s) and generation_config.json's, plus `extra` (e.g. the tokenizer's
  end-of-turn token)."""
  ids = set()
  for eos in (cfg.eos_token_id, cfg.generation_eos_token_ids):
    ids.update(eos if isinstance(eos, (tuple, list)) else (eos,))
  ids.update(extra)
  ids.discard(None)
  return {int(i) for i in ids}


def stop_ids(model_config: ModelConfig, tokenizer=None) -> set[int]:
  """Every token that ends a reply: the EOS id(s) of config.json and generation_config.json,
  the tokenizer's EOS, and the end-of-turn token its chat template writes after an assistant
  message (Gemma's `<end_of_turn>`, ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`): the token
  fine-tuning teaches the model to end on."""
  extra = []
  if tokenizer is not None:
    extra = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
  return stop_token_ids(model_config, extra)


_MARK = "\u2063ftjax-reply\u2063"  # text no template rewrites


def end_of_turn_id(tokenizer) -> int | None:
  """The first special token the chat template writes after an assistant message's content
  (None without a template, or when it writes no special token there)."""
  if not getattr(tokenizer, "chat_template", None):
    return None
  try:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": _MARK}])
  except Exception:  # noqa: BLE001 - a template that needs other roles/keys: no turn end known
    return None
  at = text.rfind(_MARK)
  if at < 0:
    return None
  tail = list(tokenizer.encode(text[at + len(_MARK):], add_special_tokens=False))
  specials = _special_ids(tokenizer)
  return next((t for t in tail if t in specials), None)


def _special_ids(tokenizer) -> set[int]:
  backend = getattr(tokenizer, "backend", None)
  if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
    return {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
  return set(getattr(tokenizer, "all_special_ids", ()))  # a transformers tokenizer


def _progress_bar(progress, total: int):
  """(bar, owned): a new tqdm bar for `progress=True`, the caller's own bar-like object (one
  bar across many calls, e.g. an evaluation's batches), or None."""
  if progress is True:
    from tqdm import tqdm
    return tqdm(total=total, unit="tok", desc="generating", file=sys.stderr, leave=False), True
  return (progress or None), False


def check_sampling(temperature, top_k, top_p, *, flags=False) -> None:
  """FtjaxError unless temperature is a finite number >= 0, top_k an integer >= 0 and top_p in
  (0, 1]. NaN fails every comparison, so `temperature < 0` alone let `nan` through to decode
  greedily (`nan > 0` is False), and `inf` would sample uniformly (logits / inf = 0).
  flags: name the CLI's --options in the message instead of the arguments."""
  name = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
  bad = []
  if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
    bad.append(f"{name('temperature')}={temperature!r}: expected a finite number >= 0 (0 = greedy)")
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
    bad.append(f"{name('top_k')}={top_k!r}: expected an integer >= 0 (0 = all tokens)")
  if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):  # also false for nan
    bad.append(f"{name('top_p')}={top_p!r}: expected a number in (0, 1] (1 = off)")
  if bad:
    raise FtjaxError(("" if flags else "generate: ") + "; ".join(bad))


def generate_ids(model: CausalLM, prompts: list[list[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, eos_ids: Iterable[int] | None = None,
                 pad_id: int = 0, *, top_k: int = 0, top_p: float = 1.0,
                 progress=False, prompt_width: int = 0,
                 num_return_sequences: int = 1) -> list[list[int]]:
  """Token-id prompts -> generated ids per row (prompt excluded; the EOS that stopped a row kept).

  Greedy when temperature == 0; else sampling from softmax(logits / temperature) restricted to
  the `top_k` most likely tokens (0: all) and to the nucleus of mass `top_p` (1: all), as
  transformers' `generate(do_sample=True, ...)` does. The same seed gives the same tokens.
  eos_ids: the stop tokens (default: the config's EOS ids; see `stop_ids` for a chat model).
  progress: True shows a tqdm bar of new tokens with an ETA on stderr; a tqdm bar of the
  caller's is advanced instead (one bar over many calls).

  Runs where the model's arrays are: a model sharded over a mesh generates sharded (the
  partitioner moves what each layer needs), never gathered onto one device first, and in the
  model's compute dtype (its KV cache too).

  prompt_width > 0: every call pads its prompts to at least this many columns (rounded up to the
  width bucket) and prefills them whole (no shared-prefix split), so calls with the same batch
  size and max_new_tokens share one compile of every jitted piece whatever their prompts'
  lengths (GRPO's rollouts, one call per train step).

  num_return_sequences (transformers' name): completions per prompt, prompt i's in rows
  i*n .. i*n+n-1. Each prompt is prefilled once and its KV cache copied to its n rows: the
  same tokens as passing every prompt n times (a test checks it), without n prefills.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise FtjaxError("generate: every prompt needs at least one token")
  if max_new_tokens < 1:
    raise FtjaxError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
  if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, numbers.Integral) \
      or num_return_sequences < 1:
    raise FtjaxError(f"generate: num_return_sequences must be an integer >= 1, got "
                     f"{num_return_sequences!r}")
  check_sampling(temperature, top_k, top_p)
  cfg = model.config
  _check_prompt_lengths(prompts, cfg.max_position_embeddings)
  eos = stop_token_ids(cfg) if eos_ids is None else {int(i) for i in eos_ids}
  graphdef, state = nnx.split(model)  # once, not on every token
  state = jax.tree.map(jnp.asarray, state)  # host arrays onto the device; sharded ones stay put
  logits, cache, position, index = _prefill_prompts(graphdef, state, cfg, prompts, pad_id,
                                                    max_new_tokens, prompt_width)
  n = int(num_return_sequences)
  if n > 1:
    logits, cache = _fan_out(logits, cache, n)
    cache = _on_mesh_of(state, cache)
    position = np.repeat(position, n)
  b = len(prompts) * n
  sample = bool(temperature > 0)
  sampler = _Sampler(sample=sample, top_k=int(top_k) if sample else 0,
                     top_p=sample and bool(top_p < 1))
  key = jax.random.key(seed)
  knobs = dict(eos=jnp.asarray(sorted(eos) or [-1], jnp.int32), key=key,
               temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p))
  carry = {
      "cache": cache, "token": jnp.zeros((b,), jnp.int32),
      "position": jnp.asarray(position, jnp.int32),  # next position per row
      "index": jnp.int32(index), "step": jnp.int32(0),
      "done": jnp.zeros((b,), bool), "out": jnp.full((b, max_new_tokens), pad_id, jnp.int32),
  }
  carry = _first_token(logits, carry, sampler=sampler, **knobs)
  return _decode_rows(graphdef, state, carry, knobs, sampler, eos, max_new_tokens, progress)


def _prefill_prompts(graphdef, state, cfg, prompts, pad_id, max_new_tokens, prompt_width):
  """Left-pads and prefills the prompts -> (last logits [b, vocab], the KV cache, each row's
  next position [b], the cache slot of the first new token)."""
  b = len(prompts)
  # A prefix shared by all prompts is prefilled once, with batch 1, and copied into every row.
  # (Its length, rounded to the bucket, is a shape: prompt_width keeps the shapes fixed instead.)
  shared = 0 if prompt_width else _shared_prefix_len(prompts)
  suffixes = [p[shared:] for p in prompts]
  # Widths rounded up to a bucket: batches of similar prompts (evaluation) share one compile of
  # prefill and step; the extra left padding is masked out and costs little.
  width = _bucketed(max(prompt_width, *map(len, suffixes)))
  tokens = np.full((b, width), pad_id, np.int32)
  mask = np.zeros((b, width), np.int32)
  for r, p in enumerate(suffixes):
    tokens[r, width - len(p):] = p
    mask[r, width - len(p):] = 1
  total = shared + width + max_new_tokens
  if total > cfg.max_position_embeddings:
    log.warning("prompt + new tokens (%d) exceed the model's context (%d)",
                total, cfg.max_position_embeddings)
  cache = _on_mesh_of(state, _new_cache(graphdef, state, b, total))
  if shared:
    prefix = jnp.asarray(prompts[0][:shared], jnp.int32)[None]
    _, prefix_cache = _prefill(graphdef, state, prefix, jnp.ones_like(prefix),
                               _new_cache(graphdef, state, 1, shared), jnp.int32(0))
    cache = _tile_prefix(cache, prefix_cache)
  logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), cache,
                           jnp.int32(shared))
  return logits, cache, shared + mask.sum(axis=1), shared + width


@functools.partial(jax.jit, static_argnames=("n",))
def _fan_out(logits, cache, n):
  """Each prompt's last logits and KV cache rows repeated n times (row i -> rows i*n..i*n+n-1):
  the cache's batch axis is 1 (after layers) in every array."""
  return jnp.repeat(logits, n, axis=0), jax.tree.map(lambda x: jnp.repeat(x, n, axis=1), cache)


def _decode_rows(graphdef, state, carry, knobs, sampler, eos, max_new_tokens, progress):
  """The decode loop after the first token -> each row's tokens through its stop token."""
  b = carry["out"].shape[0]
  bar, owned = _progress_bar(progress, b * max_new_tokens)
  # Without a bar the whole loop is one call; with one, chunks of tokens report between calls.
  chunk = _PROGRESS_CHUNK if bar is not None else max_new_tokens
  written = 0
  try:
    step, done = 1, bool(carry["done"].all()) if bar is not None else False
    while step < max_new_tokens and not done:
      stop = min(step + chunk, max_new_tokens)
      carry = _decode(graphdef, state, carry, jnp.int32(stop), sampler=sampler, **knobs)
      step = max_new_tokens
      if bar is not None:  # one host sync per chunk, only when someone is watching
        step, done = int(carry["step"]), bool(carry["done"].all())
        live = _tokens_so_far(carry, step, eos)
        bar.update(live - written)
        written = live
    steps = int(carry["step"])
    rows = [_until_stop(row, eos) for row in np.asarray(carry["out"])[:, :steps].tolist()]
    if bar is not None:
      bar.update(sum(map(len, rows)) - written)
  finally:
    if owned:
      bar.close()
  return rows


def memory_budget() -> int:
  """Bytes one batch of decoding may take: half of an accelerator's free memory, or half of
  the host's available memory on a CPU (MemAvailable already leaves out the params and every
  other process)."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return max(0, stats["bytes_limit"] - stats.get("bytes_in_use", 0)) // 2
  return _host_available_bytes() // 2


def _host_available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 4 << 30  # unknown: assume a small machine


def decode_bytes_per_row(cfg: ModelConfig, prompt_len: int, prefill_len: int,
                         max_new_tokens: int, dtype_bytes: int = 4) -> int:
  """Peak memory one row adds to a `generate_ids` batch, overestimated: its KV cache (every
  layer, prompt + new tokens) twice (the prefill returns a new cache beside the one it was
  given), and one prefill layer's activations over the row's own `prefill_len` tokens (f32
  attention scores against the whole prompt, the MLP's gate / up / product, a few hidden-state
  copies) and the f32 logits. On SmolLM2-135M (f32) with the quickstart's 3-shot prompts
  (~450 tokens with the answer) that is ~50 MB a row, the KV cache 80% of it."""
  length = _bucketed(prompt_len) + max_new_tokens
  width = _bucketed(prefill_len)
  kv = 2 * cfg.num_layers * length * (2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes + 4)
  scores = cfg.num_heads * width * length * 4
  mlp = 3 * width * cfg.intermediate_size * 4
  hidden = 6 * width * cfg.hidden_size * 4
  logits = 2 * cfg.vocab_size * 4
  return kv + scores + mlp + hidden + logits


def rows_per_batch(model: CausalLM, prompts: list[list[int]], max_new_tokens: int,
                   budget: int | None = None) -> int:
  """The most of `prompts` one `generate_ids` call may take within `budget` bytes (default:
  `memory_budget()`), at least 1: every row is costed as the longest prompt, its shared prefix
  (prefilled once) left out of the prefill."""
  budget = memory_budget() if budget is None else budget
  longest = max(map(len, prompts))
  per_row = decode_bytes_per_row(model.config, longest, longest - _shared_prefix_len(prompts),
                                 max_new_tokens, jnp.dtype(model.dtype).itemsize)
  return max(1, min(len(prompts), budget // per_row))


def _check_prompt_lengths(prompts: list[list[int]], context: int) -> None:
  """Refuses a prompt that leaves no room for a new token in the model's context, before the KV
  cache is allocated: its size follows the prompt (an over-long prompt once asked for 52.9 GB)."""
  longest = max(range(len(prompts)), key=lambda r: len(prompts[r]))
  if len(prompts[longest]) >= context:
    which = f"prompt {longest + 1} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
    raise FtjaxError(f"generate: {which} is {len(prompts[longest])} tokens, but the model's "
                     f"context (max_position_embeddings) is {context} tokens including the new "
                     "ones; shorten the prompt")


def _until_stop(row: list[int], eos: set[int]) -> list[int]:
  """A row's tokens through its first stop token."""
  return next((row[:i + 1] for i, t in enumerate(row) if t in eos), row)


def _tokens_so_far(carry, step: int, eos: set[int]) -> int:
  return sum(len(_until_stop(row, eos)) for row in np.asarray(carry["out"][:, :step]).tolist())


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
  if not chat:
    return [list(tokenizer.encode(p)) for p in prompts]
  # The chat template already writes any BOS / role markers the model expects.
  return [list(tokenizer.encode(
      tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
      add_special_tokens=False)) for p in prompts]


def generate(model: CausalLM, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, chat: bool = True, seed: int = 0, *, top_k: int = 0,
             top_p: float = 1.0, progress=False) -> list[str]:
  """Text prompts -> generated text per prompt (chat-templated as one user turn by default),
  each stopped at the model's `stop_ids` (its EOS ids and the chat template's end of turn)."""
  ids = encode_prompts(tokenizer, prompts, chat)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = generate_ids(model, ids, max_new_tokens, temperature, seed,
                     eos_ids=stop_ids(model.config, tokenizer), pad_id=pad, top_k=top_k,
                     top_p=top_p, progress=progress)
  return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


@cli_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ftjax.generate",
                                   description="Generate text; prints only the generated text.")
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="built-in name, .gguf file, HF model directory or Hub id")
  parser.add_argument("--prompt", action="append", required=True,
                      help="prompt text; repeat for a batch (one output line block each)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-chat", action="store_true", help="use the prompt as raw text")
  args = parser.parse_args(argv)
  setup_logging("%(message)s")
  if args.max_new_tokens < 1:
    raise FtjaxError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
  check_sampling(args.temperature, args.top_k, args.top_p, flags=True)

  model, tokenizer = load(args.model)
  cfg = model.config
  log.info("loaded %s: %s, %d layers, %.1fM params", args.model, cfg.model_type, cfg.num_layers,
           cfg.num_params() / 1e6)
  texts = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                   chat=not args.no_chat, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                   progress=sys.stderr.isatty())  # a bar on a terminal, none in logs or pipes
  for text in texts:
    print(text, flush=True)


if __name__ == "__main__":
  main()
