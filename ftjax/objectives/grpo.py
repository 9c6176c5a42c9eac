"""GRPO (`objective = "grpo"`): RL from verifiable rewards, TRL GRPOTrainer's names and defaults.

The train data are prompts (ftjax/data/prompts.py). Each step `next_rows` takes
train.batch_size / grpo.num_generations prompts, samples G completions of each with ftjax's
sampler on the current params (grpo_rollout.rollout_rows: same mesh, no weight sync), scores
them with the reward functions (grpo_rewards), and turns the group-normalised rewards into each
completion's advantage (grpo_loss.group_advantages). The step trains GRPOLoss on those rows;
per-row values ride along as row stats, logged as train/<name> means: reward, reward_std (the
mean of the groups' stds, as TRL), rewards/<fn>, completion_length, frac_reward_zero_std and
rollout_tokens_per_s.

grpo.num_iterations > 1: one batch of rollouts is trained num_iterations times, its sampling
log-probs ("old_logps") computed once when it is sampled. A resumed run samples a new batch
(the reuse count is not checkpointed).

Eval: the eval prompts answered greedily (and once sampled) by the starting model (before training: the base, the
adapters not trained yet) and by the tuned one at the end, mean reward and per-function means
with bootstrap 95% CIs, in summary.json ("reward_eval") and report.md, with a few samples.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.data import dataset as dataset_lib
from ftjax.data import formats
from ftjax.data import prompts as prompt_data
from ftjax.data import sources
from ftjax.data.selection import Split
from ftjax.errors import FtjaxError
from ftjax.evaluation.curves import read_curves
from ftjax.generate import cache_length, cache_shardings, generate_ids, stop_ids
from ftjax.objectives import grpo_loss
from ftjax.objectives.base import Objective
from ftjax.objectives.grpo_rewards import Rewards
from ftjax.objectives.grpo_rollout import GRPOLoss, rollout_rows, sequence_token_logps
from ftjax.step import merge_model

log = logging.getLogger(__name__)

BASE_EVAL_FILE = "grpo_base_eval.json"
ROW_STATS = ("reward", "reward_std", "completion_length", "frac_reward_zero_std",
             "rollout_tokens_per_s")
SAMPLES = 3  # eval completions shown in the report per model


def _fn_name(name: str) -> str:
  """A reward's metric name: the function's own name ("pkg.mod:brevity" -> "brevity")."""
  return name.rsplit(":", 1)[-1]


class GRPO(Objective):
  name = "grpo"
  config_block = "grpo"
  eval_loss = False

  def __init__(self, config):
    super().__init__(config)
    self._reuse = None  # (rows, times trained) of the current rollout batch
    self._old_logps_fn = None

  @property
  def block(self):
    return self.config.grpo

  @property
  def prompt_len(self) -> int:
    return self.config.data.seq_len - self.block.max_new_tokens

  @functools.cached_property
  def rewards(self) -> Rewards:
    return Rewards(self.block.reward_funcs, self.block.reward_weights)

  def _check(self, ok, key, expected):
    if not ok:
      raise FtjaxError(f"config: grpo.{key}={self.block[key]!r}; expected {expected}")

  def validate(self):
    b, t = self.block, self.config.train
    self._check(b.num_generations >= 2, "num_generations", ">= 2 (advantages compare "
                "completions of one prompt)")
    if isinstance(t.batch_size, int) and t.batch_size % b.num_generations:
      raise FtjaxError(f"config: train.batch_size={t.batch_size} counts completions and must be a "
                       f"multiple of grpo.num_generations={b.num_generations}")
    self._check(b.max_new_tokens >= 1, "max_new_tokens", ">= 1")
    if self.config.data.seq_len <= b.max_new_tokens:
      raise FtjaxError(f"config: data.seq_len={self.config.data.seq_len} must exceed "
                       f"grpo.max_new_tokens={b.max_new_tokens} (a row holds prompt + completion)")
    self._check(b.loss_type in grpo_loss.LOSS_TYPES, "loss_type", f"one of {grpo_loss.LOSS_TYPES}")
    self._check(b.scale_rewards in grpo_loss.SCALE_REWARDS, "scale_rewards",
                f"one of {grpo_loss.SCALE_REWARDS}")
    self._check(b.num_iterations >= 1, "num_iterations", ">= 1")
    self._check(b.temperature > 0, "temperature", "> 0 (rollouts are sampled)")
    self._check(0 < b.top_p <= 1, "top_p", "in (0, 1]")
    self._check(b.top_k >= 0, "top_k", ">= 0")
    self._check(0 <= b.epsilon < 1, "epsilon", "in [0, 1)")
    self._check(b.epsilon_high >= 0, "epsilon_high", ">= 0 (0: the same as grpo.epsilon)")
    self._check(b.beta >= 0, "beta", ">= 0")
    if b.beta > 0 and self.config.method == "full":
      raise FtjaxError("config: grpo.beta > 0 needs a reference model; under method=full there "
                       "is no adapter to disable and ftjax does not store a copy of the starting "
                       "weights yet: set grpo.beta=0 or train an adapter (method=lora)")
    if self.config.data.shards > 1 or jax.process_count() > 1:
      # a prompt row's "index" names an example of the one train Dataset; shards would need
      # their own lookup (not built yet)
      raise FtjaxError("config: objective=grpo runs on one process with data.shards 0 or 1 for "
                       f"now (data.shards={self.config.data.shards}, {jax.process_count()} processes)")
    self.rewards  # noqa: B018 - names an empty or unimportable grpo.reward_funcs now

  # --- rows ---

  def row_spec(self):
    seq = (self.config.data.seq_len,)
    spec = {k: (seq, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    spec["loss_mask"] = (seq, np.float32)
    spec["advantages"] = ((), np.float32)
    for key in self.row_stats():
      spec[key] = ((), np.float32)
    if self.block.num_iterations > 1:
      spec["old_logps"] = (seq, np.float32)
    return spec

  def row_stats(self) -> tuple[str, ...]:
    return ROW_STATS + tuple(f"rewards/{_fn_name(n)}" for n in self.rewards.names)

  def loss_fn(self, model_cfg, mesh):
    b = self.block
    return GRPOLoss(loss_type=b.loss_type, epsilon_low=float(b.epsilon),
                    epsilon_high=float(b.epsilon_high or b.epsilon), beta=float(b.beta),
                    max_completion_length=int(b.max_new_tokens), temperature=float(b.temperature),
                    on_policy=b.num_iterations == 1, remat=self.config.model.remat,
                    row_stats=self.row_stats())

  # --- data ---

  def _read(self, path, fields=None, system_prompt=None):
    items, problems, origin = [], [], []
    for p in dataset_lib.expand(path):
      records, bad = sources.read_all(p)
      records = [formats.rename(r, fields) for r in records] if fields else records
      found, invalid = prompt_data.read_prompts(records, system_prompt=system_prompt)
      items += found
      origin += [p] * len(found)
      problems += bad + invalid
    return items, problems, origin

  def check_split(self, path, tokenizer, *, seq_len, length_policy="truncate", system_prompt=None,
                  fields=None, **_):
    """The data check's Split: prompts validated at file:line (ftjax.data.prompts), their token
    lengths against data.seq_len - grpo.max_new_tokens."""
    items, problems, origin = self._read(path, fields, system_prompt)
    max_len = seq_len - self.block.max_new_tokens
    kept, _, over = prompt_data.tokenize_prompts(items, tokenizer, max_len=10 ** 9)
    lengths = {id(item): len(ids) for item, ids in kept}
    action = {"truncate": "truncated", "drop": "dropped", "error": "error"}[length_policy]
    for item, ids in kept:
      if len(ids) > max_len:
        problems.append(sources.Problem(
            "over_length", item.where, f"{item.where}: over_length: prompt of {len(ids)} tokens, "
            f"over data.seq_len - grpo.max_new_tokens = {max_len} ({action})"))
    problems.sort(key=lambda q: (q.where.rsplit(":", 1)[0], _line(q.where)))
    return Split(items, problems, lengths, origin)

  def token_stats(self, examples, lengths, tokenizer, *, pack):
    if not examples:
      return {"examples": 0}
    stats, n = self.dataset_token_stats(examples, lengths, tokenizer)
    # prompt tokens against the budget data.seq_len - grpo.max_new_tokens
    return dict(stats, prompt_budget=self.prompt_len, over_budget=int((n > self.prompt_len).sum()))

  def dataset(self, examples, tokenizer, *, train, name, length_policy=None):
    d = self.config.data
    kept, counts, _ = prompt_data.tokenize_prompts(
        examples, tokenizer, max_len=self.prompt_len,
        length_policy=length_policy or d.length_policy)
    if not kept:
      raise FtjaxError(f"{name}: no prompt left after data.length_policy={d.length_policy!r} "
                       f"(counts: {counts})", code="empty_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = prompt_data.prompt_rows(kept, self.prompt_len, pad)
    n = len(kept)
    tokens = int(rows["prompt_len"].sum())
    summary = dict(counts, kept=n, files=[], max_len=self.prompt_len, seq_len=self.prompt_len,
                   packed=False, rows=n, tokens=tokens, trained_tokens=0, no_user_turn=0,
                   no_trained_tokens=0, first_over_length=None,
                   fill=tokens / max(1, rows["prompt_ids"].size))
    return dataset_lib.Dataset([item for item, _ in kept], rows, summary, self.prompt_len)

  def read_examples(self, path):
    return self._read(path, system_prompt=self.config.data.system_prompt or None)[0]

  # --- rollouts ---

  def next_rows(self, run, state, take_rows):
    if self._reuse is not None and self._reuse[1] < self.block.num_iterations:
      rows, used = self._reuse
      self._reuse = (rows, used + 1)
      return rows
    prompts = take_rows(self.config.train.batch_size // self.block.num_generations)
    rows = self._rollout(run, state, prompts)
    self._reuse = (rows, 1)
    return rows

  def _rollout(self, run, state, prompt_rows: dict) -> dict:
    b, t = self.block, self.config.train
    g = b.num_generations
    real = np.asarray(prompt_rows["prompt_len"]) > 0  # padding rows (an epochs budget) at the end
    prompts = [p for p, ok in zip(prompt_data.unpad(prompt_rows), real) if ok]
    items = [run.train_ds.examples[i] for i in np.asarray(prompt_rows["index"])[real]]
    # The previous update runs asynchronously: wait for its params first, or the rollout's time
    # (and rollout_tokens_per_s) would include it (a SmolLM2 run logged 17-29 tokens/s so).
    model = run.model(jax.block_until_ready(state["trainable"]))
    tok = run.tokenizer
    start = time.perf_counter()
    rows, completions, _ = rollout_rows(
        model, prompts, num_generations=g, seq_len=self.config.data.seq_len,
        max_new_tokens=b.max_new_tokens, eos_ids=stop_ids(run.model_cfg, tok),
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        temperature=b.temperature, top_k=b.top_k, top_p=b.top_p,
        seed=t.seed * 1_000_003 + int(state["step"]), mask_truncated=b.mask_truncated_completions)
    seconds = time.perf_counter() - start
    sampled = sum(len(c) for c in completions)
    log.info("rollout: %d completions, %d tokens in %.2f s (%.0f tokens/s)", len(completions),
             sampled, seconds, sampled / seconds)
    per_func, total = self._score([it for it in items for _ in range(g)], completions, tok)
    advantages, zero_std = grpo_loss.group_advantages(jnp.asarray(total), g, b.scale_rewards)
    grouped = total.reshape(-1, g)
    with np.errstate(all="ignore"):  # a group with < 2 scored completions: std NaN -> 0
      group_std = np.nan_to_num(np.nanstd(grouped, axis=1, ddof=1))
    rows["advantages"] = np.asarray(advantages, np.float32)
    rows["reward"] = np.nan_to_num(total)
    rows["reward_std"] = np.repeat(group_std, g).astype(np.float32)
    rows["completion_length"] = np.array([len(c) for c in completions], np.float32)
    rows["frac_reward_zero_std"] = np.asarray(zero_std, np.float32)
    rows["rollout_tokens_per_s"] = np.full(len(completions), sampled / seconds, np.float32)
    for j, name in enumerate(self.rewards.names):
      # an unscored completion (None) counts 0 in the function's mean
      rows[f"rewards/{_fn_name(name)}"] = np.nan_to_num(per_func[:, j])
    if b.num_iterations > 1:
      rows["old_logps"] = self._old_logps(run, state, rows)
    return self._pad_rows(rows, t.batch_size)

  def _score(self, items, completions, tok):
    """([completions, functions], weighted sum [completions]) of token completions."""
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    as_given = [[{"role": "assistant", "content": x}] if it.conversational else x
                for it, x in zip(items, texts)]
    keys = sorted({k for it in items for k in it.columns})
    columns = {k: [it.columns.get(k) for it in items] for k in keys}
    per_func = self.rewards([it.raw_prompt for it in items], as_given, columns)
    return per_func, self.rewards.weighted_sum(per_func)

  def _pad_rows(self, rows, n):
    spec = self.row_spec()
    out = {}
    for k, (shape, dtype) in spec.items():
      v = np.asarray(rows[k], dtype)
      out[k] = np.concatenate([v, np.zeros((n - v.shape[0],) + tuple(shape), dtype)])
    return out

  def _old_logps(self, run, state, rows):
    """The sampling policy's per-token log-probs, micro-batch by micro-batch."""
    if self._old_logps_fn is None:
      temperature = float(self.block.temperature)

      def fn(trainable, frozen, mutable, batch):
        model = merge_model(run.graphdef, trainable, frozen, mutable)
        return sequence_token_logps(model, batch, temperature=temperature)
      self._old_logps_fn = jax.jit(fn)
    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    micro = self.config.train.batch_size // self.config.train.grad_accum
    n = rows["inputs"].shape[0]
    out = [np.asarray(self._old_logps_fn(state["trainable"], run.frozen, state["mutable"],
                                         {k: rows[k][i:i + micro] for k in keys}))
           for i in range(0, n, micro)]
    return np.concatenate(out).astype(np.float32)

  # --- memory (ftjax.plan) ---

  def rollout_memory(self, run) -> dict:
    """Per-device bytes a rollout holds beside the train state, for ftjax.plan: {"kv_cache": the
    KV cache of the train.batch_size (G x prompts) rows the decode loop runs with, exactly as
    generate_ids builds it; "buffers": the prompts' prefill cache (each prompt prefilled once, in
    and out of the prefill: 2 / G of the rows, counted here as the whole batch's, an upper bound)
    + the f32 logits of the last position + the token buffer}. `run` may be abstract."""
    rows, b = self.config.train.batch_size, self.block
    length = cache_length(self.prompt_len, b.max_new_tokens)
    cache = jax.eval_shape(lambda t, f, m: merge_model(run.graphdef, t, f, m).init_cache(rows, length),
                           run.trainable, run.frozen, run.mutable)
    kv = _device_bytes(cache, cache_shardings(run.mesh, cache))
    batch_shards = run.mesh.shape.get("data", 1) * run.mesh.shape.get("fsdp", 1)
    rows_here = -(-rows // batch_shards)
    per_row = run.model_cfg.vocab_size * 4 + b.max_new_tokens * 4  # f32 logits, int32 tokens
    return {"kv_cache": kv, "buffers": kv + rows_here * per_row}

  # --- eval: rewards of greedy answers to the eval prompts ---

  def before_training(self, run, workdir):
    """The starting model's eval rewards (the base: a fresh adapter computes as it), stored in
    the workdir so that a resumed run reads them rather than scoring trained params."""
    self._workdir = workdir  # its metrics.jsonl holds the reward curve (report_section)
    if run.eval_ds is None:
      return
    path = os.path.join(workdir, BASE_EVAL_FILE)
    if os.path.exists(path):
      with open(path) as f:
        self._base_eval = json.load(f)
      return
    self._base_eval = self.reward_eval(run, run.model(run.trainable))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self._base_eval, f, indent=1)
    os.replace(tmp, path)  # never a half-written file under the final name

  def end_eval(self, run, trainable):
    if run.eval_ds is None:
      return {}
    tuned = self.reward_eval(run, run.model(trainable))
    base = getattr(self, "_base_eval", None)
    for label, result in (("base", base), ("tuned", tuned)):
      if result:
        log.info("eval reward (%s, greedy, %d prompts): %.4f [%.4f, %.4f]", label,
                 result["prompts"], result["reward"], *result["reward_ci95"])
    return {"reward_eval": {"base": base, "tuned": tuned}}

  def reward_eval(self, run, model) -> dict:
    """Greedy completions of the first eval.max_examples eval prompts -> mean reward and each
    function's mean (unscored completions left out), bootstrap 95% CIs, a few samples."""
    ds, tok = run.eval_ds, run.tokenizer
    n = min(len(ds.examples), self.config.eval.max_examples)
    prompts = prompt_data.unpad({k: v[:n] for k, v in ds.rows.items()})
    items = [ds.examples[i] for i in ds.rows["index"][:n]]
    eos = stop_ids(run.model_cfg, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    chunk, b = self.config.train.batch_size, self.block

    def answer(temperature):
      completions = []
      for i in range(0, n, chunk):
        completions += generate_ids(model, prompts[i:i + chunk], b.max_new_tokens,
                                    temperature=temperature, seed=self.config.train.seed,
                                    eos_ids=eos, pad_id=pad, top_k=b.top_k, top_p=b.top_p,
                                    prompt_width=self.prompt_len)  # the rollouts' shapes
      per_func, total = self._score(items, completions, tok)
      out = _mean_ci(total, "reward", self.config.eval.bootstrap)
      for j, name in enumerate(self.rewards.names):
        out.update(_mean_ci(per_func[:, j], f"rewards/{_fn_name(name)}", self.config.eval.bootstrap))
      return out, completions, total

    greedy, completions, total = answer(0.0)
    # one completion per prompt sampled as the rollouts are (grpo.temperature, top_k, top_p)
    out = {"prompts": n, **greedy, "sampled": answer(b.temperature)[0]}
    out["samples"] = [{"prompt": _text(items[i].raw_prompt),
                       "completion": tok.decode(completions[i], skip_special_tokens=True),
                       "reward": None if np.isnan(total[i]) else float(total[i])}
                      for i in range(min(SAMPLES, n))]
    return out

  def _trend_lines(self) -> list[str]:
    workdir = getattr(self, "_workdir", None)
    curve = read_curves(workdir).get("train/reward", []) if workdir else []
    trend = reward_trend([v for _, v in curve], self.config.eval.bootstrap)
    if trend is None:
      return []
    fmt = lambda k: f"{trend[k]:.3f} [{trend[k + '_ci95'][0]:.3f}, {trend[k + '_ci95'][1]:.3f}]"
    return ["", f"Train reward (each step's rollouts, {trend['steps']} logged steps): first quarter "
            f"{fmt('first')}, last quarter {fmt('last')} (bootstrap 95% CIs over steps); the "
            "curve is in rewards.png."]

  def report_section(self, summary):
    ev = summary.get("reward_eval")
    if not ev or not ev.get("tuned"):
      return ""
    base, tuned = ev.get("base"), ev["tuned"]
    keys = [k for k in tuned if (k == "reward" or k.startswith("rewards/")) and "_ci95" not in k]
    lines = ["## GRPO: eval rewards (greedy, eval prompts)", "",
             f"{tuned['prompts']} eval prompts answered greedily; mean with a bootstrap 95% CI.", "",
             "| metric | base | tuned |", "|---|---|---|"]
    fmt = lambda r, k: (f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]"
                        if r and r.get(k) is not None else "n/a")
    lines += [f"| {k} | {fmt(base, k)} | {fmt(tuned, k)} |" for k in keys]
    sampled = lambda r: r.get("sampled") if r else None
    lines += [f"| {k} (sampled, T={self.block.temperature}) | {fmt(sampled(base), k)} | "
              f"{fmt(sampled(tuned), k)} |" for k in keys]
    lines += self._trend_lines()
    for label, result in (("base", base), ("tuned", tuned)):
      for s in (result or {}).get("samples", []):
        lines += ["", f"**{label}**, reward {s['reward']}: prompt `{_short(s['prompt'])}` -> "
                  f"`{_short(s['completion'])}`"]
    return "\n".join(lines) + "\n"


def _device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (the largest shard)."""
  return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def reward_trend(rewards, resamples: int = 1000) -> dict | None:
  """The train reward's first and last quarter of steps: {"first": mean, "first_ci95", "last",
  "last_ci95", "steps"}, bootstrap CIs over the steps' means (None under 4 steps)."""
  values = np.asarray(rewards, np.float64)
  quarter = len(values) // 4
  if quarter < 1:
    return None
  return {"steps": len(values), **_mean_ci(values[:quarter], "first", resamples),
          **_mean_ci(values[-quarter:], "last", resamples)}


def _mean_ci(values, key: str, resamples: int, seed: int = 0) -> dict:
  """{key: mean, key_ci95: [lo, hi]} over the non-NaN values (percentile bootstrap)."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if not v.size:
    return {key: None, key + "_ci95": None}
  idx = np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))
  means = v[idx].mean(axis=1)
  return {key: float(v.mean()),
          key + "_ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def _text(prompt) -> str:
  if isinstance(prompt, list):
    return "\n".join(m["content"] for m in prompt)
  return str(prompt)


def _short(text: str, n: int = 120) -> str:
  text = " ".join(str(text).split()).replace("`", "'").replace("|", "/")
  return text[:n] + ("..." if len(text) > n else "")


def _line(where):
  tail = where.rsplit(":", 1)[-1]
  return int(tail) if tail.isdigit() else 0
