"""Batched text generation with the decoder's KV cache, and `python -m ftjax.generate`.

Prompts of different lengths are left-padded so every row's next token sits in the same last
column: padding has segment id 0 (never attended to) and positions come from the mask, so a
padded row computes exactly what it would alone. One jitted prefill, then one jitted
single-token step reused for every new token. The model is split into (graphdef, state) once
per call; the jitted functions merge it while tracing, so no token pays for a graph walk.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from ftjax.errors import FtjaxError, cli_errors, setup_logging
from ftjax.models import CausalLM
from ftjax.models.config import ModelConfig

log = logging.getLogger(__name__)

_WIDTH_BUCKET = 16


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


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _step(graphdef, state, token, position, cache, index):
  """One new token per row at cache slot `index` (traced: one compile for the whole loop)."""
  model = nnx.merge(graphdef, state)
  hidden, cache = model.hidden_states(token[:, None], positions=position[:, None],
                                      segment_ids=jnp.ones_like(token)[:, None], cache=cache,
                                      cache_index=index)
  return model.logits(hidden[:, 0]), cache


@jax.jit
def _pick(logits, temperature, key):
  greedy = jnp.argmax(logits, axis=-1)
  # temperature 0 selects the greedy branch; the max() keeps the unused branch finite.
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def stop_token_ids(cfg: ModelConfig, extra: Iterable[int | None] = ()) -> set[int]:
  """The config's EOS id(s) plus `extra` (e.g. the tokenizer's end-of-turn token)."""
  eos = cfg.eos_token_id
  ids = set(eos) if isinstance(eos, tuple) else {eos}
  ids.update(extra)
  ids.discard(None)
  return {int(i) for i in ids}


def generate_ids(model: CausalLM, prompts: list[list[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, eos_ids: Iterable[int] | None = None,
                 pad_id: int = 0) -> list[list[int]]:
  """Token-id prompts -> generated ids per row (prompt excluded; the EOS that stopped a row kept).

  Greedy when temperature == 0, else sampling from softmax(logits / temperature).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise FtjaxError("generate: every prompt needs at least one token")
  cfg = model.config
  eos = stop_token_ids(cfg) if eos_ids is None else {int(i) for i in eos_ids}
  b = len(prompts)
  # A prefix shared by all prompts is prefilled once, with batch 1, and copied into every row.
  shared = _shared_prefix_len(prompts)
  suffixes = [p[shared:] for p in prompts]
  # Widths rounded up to a bucket: batches of similar prompts (evaluation) share one compile of
  # prefill and step; the extra left padding is masked out and costs little.
  width = -(-max(len(p) for p in suffixes) // _WIDTH_BUCKET) * _WIDTH_BUCKET
  tokens = np.full((b, width), pad_id, np.int32)
  mask = np.zeros((b, width), np.int32)
  for r, p in enumerate(suffixes):
    tokens[r, width - len(p):] = p
    mask[r, width - len(p):] = 1
  total = shared + width + max_new_tokens
  if total > cfg.max_position_embeddings:
    log.warning("prompt + new tokens (%d) exceed the model's context (%d)",
                total, cfg.max_position_embeddings)
  graphdef, state = nnx.split(model)  # once, not on every token
  state = jax.tree.map(jnp.asarray, state)
  cache = _new_cache(graphdef, state, b, total)
  key = jax.random.key(seed)
  temp = jnp.float32(temperature)

  if shared:
    prefix = jnp.asarray(prompts[0][:shared], jnp.int32)[None]
    _, prefix_cache = _prefill(graphdef, state, prefix, jnp.ones_like(prefix),
                               _new_cache(graphdef, state, 1, shared), jnp.int32(0))
    cache = _tile_prefix(cache, prefix_cache)
  logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), cache,
                           jnp.int32(shared))
  position = jnp.asarray(shared + mask.sum(axis=1), jnp.int32)  # next position of each row
  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  for step in range(max_new_tokens):
    key, sub = jax.random.split(key)
    token = _pick(logits, temp, sub)
    host = np.asarray(token)
    for r in np.flatnonzero(~done):
      out[r].append(int(host[r]))
      done[r] = int(host[r]) in eos
    if done.all() or step == max_new_tokens - 1:
      break
    logits, cache = _step(graphdef, state, token, position, cache, jnp.int32(shared + width + step))
    position = position + 1
  return out


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
  if not chat:
    return [list(tokenizer.encode(p)) for p in prompts]
  # The chat template already writes any BOS / role markers the model expects.
  return [list(tokenizer.encode(
      tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
      add_special_tokens=False)) for p in prompts]


def generate(model: CausalLM, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, chat: bool = True, seed: int = 0) -> list[str]:
  """Text prompts -> generated text per prompt (chat-templated as one user turn by default)."""
  ids = encode_prompts(tokenizer, prompts, chat)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = generate_ids(model, ids, max_new_tokens, temperature, seed,
                     eos_ids=stop_token_ids(model.config, [tokenizer.eos_token_id]), pad_id=pad)
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
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-chat", action="store_true", help="use the prompt as raw text")
  args = parser.parse_args(argv)
  setup_logging("%(message)s")
  if args.max_new_tokens < 1:
    raise FtjaxError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
  if args.temperature < 0:
    raise FtjaxError(f"--temperature must be >= 0, got {args.temperature}")

  from ftjax.models import load
  model, tokenizer = load(args.model)
  cfg = model.config
  log.info("loaded %s: %s, %d layers, %.1fM params", args.model, cfg.model_type, cfg.num_layers,
           cfg.num_params() / 1e6)
  texts = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                   chat=not args.no_chat, seed=args.seed)
  for text in texts:
    print(text, flush=True)


if __name__ == "__main__":
  main()
