"""GRPO's rollouts as train rows, and its loss over them.

Rollouts come from ftjax's own sampler (ftjax.generate) on the current params, on the training
mesh: no second engine, no weight sync. Each completion becomes one row in the layout SFT rows
have (ftjax.data.packing): the row holds prompt + completion tokens, `inputs` / `targets` shift it
by one, `loss_mask` marks the targets that are completion tokens (up to and including the stop
token), `segment_ids` 0 marks padding. So the model's forward is the one SFT trains with, and the
per-token log-probs of the sampled tokens are recomputed in the train step (TRL does the same).

Two per-row values ride along: `advantages` (from the group's rewards) and `old_logps`, the
sampling policy's log-probs, kept for `grpo.num_iterations` > 1 (a batch of rollouts reused for
several updates); on its first update they equal the current log-probs, which the loss then
takes as stop_gradient(logps) instead (TRL's shortcut, exact).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import peft
from ftjax.generate import generate_ids
from ftjax.objectives import grpo_loss


def rollout_rows(model, prompts: list[list[int]], *, num_generations: int, seq_len: int,
                 max_new_tokens: int, eos_ids, pad_id: int = 0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 mask_truncated: bool = False) -> tuple[dict, list[list[int]], np.ndarray]:
  """Samples `num_generations` completions per prompt -> (rows, completions, truncated).

  rows: SFT-layout arrays [prompts * G, seq_len] (prompt i's completions are rows i*G..i*G+G-1);
  completions: each completion's token ids, the stop token kept; truncated: [prompts * G] bool,
  True where the completion hit max_new_tokens without a stop token (with `mask_truncated`
  its tokens are not trained, as TRL's mask_truncated_completions).
  """
  eos = {int(i) for i in eos_ids}
  repeated = [p for p in prompts for _ in range(num_generations)]
  # Every batch padded to the prompt budget (seq_len - max_new_tokens): one compile of the
  # sampler for the whole run, whatever the prompts' lengths (bucketed widths compiled once per
  # bucket, and a shared prefix once per prefix length, before). Each prompt is prefilled once
  # for its G completions (num_return_sequences): G times less prefill, the same samples.
  completions = generate_ids(model, prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, eos_ids=eos, pad_id=pad_id,
                             top_k=top_k, top_p=top_p, prompt_width=seq_len - max_new_tokens,
                             num_return_sequences=num_generations)
  n = len(repeated)
  tokens = np.full((n, seq_len + 1), pad_id, np.int32)
  trained = np.zeros((n, seq_len + 1), np.float32)  # 1 at completion tokens
  segment = np.zeros((n, seq_len + 1), np.int32)
  truncated = np.zeros(n, bool)
  for r, (prompt, completion) in enumerate(zip(repeated, completions)):
    row = (list(prompt) + list(completion))[:seq_len + 1]
    tokens[r, :len(row)] = row
    segment[r, :len(row)] = 1
    trained[r, len(prompt):len(row)] = 1.0
    truncated[r] = not completion or completion[-1] not in eos
  if mask_truncated:
    trained[truncated] = 0.0
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len))
  rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": trained[:, 1:],
          "segment_ids": segment[:, :-1], "positions": np.array(positions)}
  return rows, completions, truncated


def sequence_token_logps(model, batch: dict, *, temperature: float = 1.0, remat: str = "none",
                         rng=None) -> jax.Array:
  """log p(target) at every position [b, t] under logits / temperature (0 where not trained)."""
  hidden = model.hidden_states(batch["inputs"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"], remat=remat, rng=rng)
  logps = grpo_loss.token_logps(model.logits(hidden), batch["targets"], temperature)
  return logps * batch["loss_mask"]


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
  """The GRPO loss for ftjax.step over rollout rows (see grpo_loss.policy_loss_sums).

  on_policy: num_iterations == 1: old log-probs = stop_gradient(current) instead of the row's.
  beta > 0: the reference is the same model with its adapters disabled, in the same forward
  program (no copy of the weights).
  """
  loss_type: str = "dapo"
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.0
  max_completion_length: int = 0
  temperature: float = 1.0
  on_policy: bool = True
  remat: str = "none"
  # Per-row values the rollout computed on the host (reward, completion_length, ...): reported
  # as means over the batch's real rows.
  row_stats: tuple[str, ...] = ()
  vocab_chunk: int = 0  # the logits are whole (train.vocab_chunk is SFT's); ftjax.plan reads it

  def __call__(self, model, batch: dict, rng=None) -> dict:
    logps = sequence_token_logps(model, batch, temperature=self.temperature, remat=self.remat,
                                 rng=rng)
    old = jax.lax.stop_gradient(logps) if self.on_policy else batch["old_logps"]
    ref = None
    if self.beta:
      with peft.disable_adapters(model):
        ref = jax.lax.stop_gradient(sequence_token_logps(model, batch, temperature=self.temperature))
    mask = batch["loss_mask"]
    sums = grpo_loss.policy_loss_sums(
        logps, old, ref, batch["advantages"], mask, loss_type=self.loss_type,
        epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
        max_completion_length=self.max_completion_length)
    tokens = sums.pop("completion_tokens")
    rows = jnp.sum((batch["segment_ids"].sum(-1) > 0).astype(jnp.float32))
    out = {"loss_sum": sums["loss_sum"], "count": sums["count"]}
    # TRL's metric names, each a mean over its own population (the step divides by x__count).
    for ours, name in (("clip_low_tokens", "clip_ratio/low_mean"),
                       ("clip_high_tokens", "clip_ratio/high_mean"),
                       ("clip_region_tokens", "clip_ratio/region_mean"),
                       ("kl_tokens", "kl")):
      if ours in sums:
        out[name], out[name + "__count"] = sums[ours], tokens
    for key in self.row_stats:
      out[key], out[key + "__count"] = jnp.sum(batch[key]), rows
    return out
