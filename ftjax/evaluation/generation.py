"""The eval set, the prompting baselines and greedy answers for any model, scored.

`EvalPlan.build` loads and checks everything before anything compiles: every eval example needs
a reference answer, and the few-shot examples come from the train split (or eval.few_shot_pool)
and never repeat an eval input (ftjax.data.quality.leakage: exact or near-duplicate).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from ftjax.data import load_examples, read_options
from ftjax.data.quality import leakage
from ftjax.errors import FtjaxError
from ftjax.evaluation import metrics as metrics_lib
from ftjax.generate import generate_ids, rows_per_batch, stop_ids

ZERO_SHOT, TEMPLATE = "zero-shot", "your template"


def split(messages):
  """(prompt messages, reference answer): the conversation up to its last assistant turn."""
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return [{"role": m["role"], "content": m["content"]} for m in messages[:last]], messages[last]["content"]


def few_shot_prompt(prompt: list[dict], shots: list[tuple[list[dict], str]]) -> list[dict]:
  """Inserts solved examples as earlier user/assistant turns, after any system message."""
  head = [m for m in prompt if m["role"] == "system"]
  rest = [m for m in prompt if m["role"] != "system"]
  turns = []
  for shot_prompt, answer in shots:
    turns += [m for m in shot_prompt if m["role"] != "system"]
    turns.append({"role": "assistant", "content": answer})
  return head + turns + rest


def template_prompt(prompt: list[dict], template: str) -> list[dict]:
  """The user's own prompt: the last user turn becomes `template` with {input} replaced by it."""
  last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
  out = [dict(m) for m in prompt]
  out[last]["content"] = template.replace("{input}", prompt[last]["content"])
  return out


def _has_reference(ex) -> bool:
  return bool(ex.messages) and any(m["role"] == "assistant" and m["content"].strip()
                                   for m in ex.messages)


@dataclasses.dataclass
class EvalPlan:
  """The eval examples, their prompts and references, the shots, and the metrics."""
  examples: list  # ftjax.data Examples
  prompts: list[list[dict]]
  references: list[str]
  shots: list[tuple[list[dict], str]]
  shot_sources: list[str]  # "path:LINE" of each shot
  metrics: dict[str, metrics_lib.Metric]
  options: metrics_lib.Options
  eval_cfg: object

  @classmethod
  def build(cls, eval_path: str, eval_cfg, *, pool_path: str = "", data_cfg=None,
            near_dup: float = 0.4, read=None) -> "EvalPlan":
    """`read(path)`: the examples of a split (default: ftjax.data.load_examples with data_cfg's
    options; a preference objective reads its pairs, prompt + chosen reply)."""
    fmt_kw = read_options(data_cfg) if data_cfg is not None else {}
    read = read or (lambda path: load_examples(path, **fmt_kw))
    examples = read(eval_path)[: eval_cfg.max_examples]
    missing = [ex.where for ex in examples if not _has_reference(ex)]
    if missing:
      raise FtjaxError(
          f"{missing[0]}: eval example without a reference answer ({len(missing)} of "
          f"{len(examples)} lack one); generation metrics compare each answer with a reference, "
          "so the eval set needs input/output, instruction/output or chat records ending in an "
          "assistant turn, not plain text")
    prompts, refs = zip(*(split(ex.messages) for ex in examples))
    shots, sources = [], []
    if eval_cfg.few_shot:
      if not pool_path:
        raise FtjaxError(f"eval.few_shot={eval_cfg.few_shot} needs a pool of solved examples "
                         "(data.train, eval.few_shot_pool or --shots); shots never come from eval")
      if os.path.abspath(pool_path) == os.path.abspath(eval_path):
        raise FtjaxError(f"few-shot pool {pool_path} is the eval set itself; draw shots from train")
      pool = [ex for ex in read(pool_path) if _has_reference(ex)][: eval_cfg.few_shot]
      if len(pool) < eval_cfg.few_shot:
        raise FtjaxError(f"{pool_path}: {len(pool)} solved examples for eval.few_shot={eval_cfg.few_shot}")
      overlap = leakage(pool, examples, threshold=near_dup)
      if overlap:
        p = overlap[0]
        raise FtjaxError(
            f"few-shot pool overlaps the eval set: {p['train']} repeats {p['eval']} "
            f"({p['kind']}, similarity {p['similarity']:.2f}; {len(overlap)} pair(s)); a shot "
            "that shows an eval answer inflates the baseline. Remove it from the pool")
      shots = [split(ex.messages) for ex in pool]
      sources = [ex.where for ex in pool]
    return cls(list(examples), list(prompts), list(refs), shots, sources,
               metrics_lib.resolve(metrics_lib.split_names(eval_cfg.metrics)),
               metrics_lib.options(eval_cfg), eval_cfg)

  def systems(self) -> dict:
    """{prompting baseline name: prompt builder} in report order."""
    out = {}
    if self.eval_cfg.zero_shot:
      out[ZERO_SHOT] = lambda p: p
    if self.shots:
      out[f"{len(self.shots)}-shot"] = lambda p: few_shot_prompt(p, self.shots)
    if self.eval_cfg.prompt_template:
      out[TEMPLATE] = lambda p: template_prompt(p, self.eval_cfg.prompt_template)
    return out

  def score(self, predictions: list[str], n: int | None = None) -> dict:
    refs = self.references[: len(predictions) if n is None else n]
    return {name: m.score(predictions, refs, self.options) for name, m in self.metrics.items()}

  def answer(self, model, tokenizer, build=lambda p: p, desc: str = "generate",
             limit: int | None = None) -> list[str]:
    """Greedy answers of `model` to the first `limit` (all) eval prompts, with a progress bar."""
    prompts = self.prompts[:limit]
    ids = [tokenizer.encode(tokenizer.apply_chat_template(build(p), add_generation_prompt=True),
                            add_special_tokens=False) for p in prompts]
    return answer_ids(model, tokenizer, ids, self.eval_cfg.max_new_tokens,
                      self.eval_cfg.batch_size, desc)

  def run(self, model, tokenizer, name: str, build=lambda p: p, limit: int | None = None) -> dict:
    predictions = self.answer(model, tokenizer, build, desc=name, limit=limit)
    return {"name": name, "examples": len(predictions), "scores": self.score(predictions),
            "predictions": predictions}


def answer_ids(model, tokenizer, ids: list[list[int]], max_new_tokens: int, batch_size: int,
               desc: str) -> list[str]:
  """Decoded greedy answers, batched by similar prompt length (less left padding), with a tqdm
  bar (ETA) over the prompts; one log line per batch when stderr is not a terminal.
  batch_size 0: all prompts in the fewest batches memory allows (`batches`)."""
  from tqdm import tqdm
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = stop_ids(model.config, tokenizer)  # EOS ids and the chat template's end of turn
  out = [""] * len(ids)
  groups = batches(model, ids, max_new_tokens, batch_size)
  t0, done = time.perf_counter(), 0
  with tqdm(total=len(ids), desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True,
            disable=None) as bar:
    for rows in groups:
      gen = generate_ids(model, [ids[i] for i in rows], max_new_tokens, eos_ids=eos, pad_id=pad)
      for i, tokens in zip(rows, gen):
        out[i] = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
      bar.update(len(rows))
      done += len(rows)
      if bar.disable:
        elapsed = time.perf_counter() - t0  # a disabled bar keeps no time
        print(f"{desc}: {done}/{len(ids)} prompts, {elapsed:.0f} s, ETA "
              f"{elapsed / done * (len(ids) - done):.0f} s", file=sys.stderr, flush=True)
  return out


def batches(model, ids: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
  """The prompts' indices in decoding batches, shortest prompts first: the fewest batches of
  at most `batch_size` rows (0: of at most what `rows_per_batch` allows), of near-equal sizes.
  Each batch costs a compile of its shapes and a decode loop as long as its longest answer.
  Measured on SmolLM2-135M (f32, 2-core CPU, CPU seconds, load ~20): the quickstart's 100
  zero-shot prompts in one batch 41 s against 48 s in four of 32 (3-shot: 76 s against 84 s);
  47 decode steps instead of 188."""
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  if not order:
    return []
  size = batch_size if batch_size > 0 else rows_per_batch(model, ids, max_new_tokens)
  count = -(-len(order) // size)
  bounds = [round(k * len(order) / count) for k in range(count + 1)]
  return [order[a:b] for a, b in zip(bounds, bounds[1:])]
