"""Generation-based evaluation: the base model with a few-shot prompt (the baseline) against the
fine-tuned model, greedy decoding on the eval split, scored by a metric fixed in the config
before training.
"""

from __future__ import annotations

import logging

from ftjax.data import load_examples
from ftjax.generate import stop_token_ids, generate_ids

log = logging.getLogger("ftjax.evaluate")


def _scorer(name: str):
  if name == "quickstart_json":
    from ftjax.data.quickstart_task import score
    return score
  return lambda pred, ref: {"exact_match": float(pred.strip() == ref.strip())}


def _split(messages):
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


def generation_eval(run, model, few_shot: int = 0) -> dict:
  """Mean scores of `model` (greedy) over up to eval.max_examples examples of the run's eval
  split, prompted with `few_shot` solved examples from the train split."""
  cfg, tok = run.config, run.tokenizer
  fmt_kw = dict(format=cfg.data.format, system_prompt=cfg.data.system_prompt or None)
  examples = load_examples(cfg.data.eval, **fmt_kw)[: cfg.eval.max_examples]
  shots = []
  if few_shot:
    shots = [_split(e.messages) for e in load_examples(cfg.data.train, **fmt_kw)[:few_shot]]
  prompts, refs = [], []
  for ex in examples:
    prompt, ref = _split(ex.messages)
    messages = few_shot_prompt(prompt, shots) if shots else prompt
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    prompts.append(tok.encode(text, add_special_tokens=False))
    refs.append(ref)
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  eos = stop_token_ids(model.config, [tok.eos_token_id])
  score = _scorer(cfg.eval.scorer)
  totals: dict[str, float] = {}
  samples = []
  # Batches of similar prompt lengths: less left-padding to compute.
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  for start in range(0, len(order), cfg.eval.batch_size):
    rows = order[start:start + cfg.eval.batch_size]
    outs = generate_ids(model, [prompts[i] for i in rows], cfg.eval.max_new_tokens,
                        eos_ids=eos, pad_id=pad)
    for i, out in zip(rows, outs):
      pred = tok.decode([t for t in out if t not in eos], skip_special_tokens=True)
      for k, v in score(pred, refs[i]).items():
        totals[k] = totals.get(k, 0.0) + v
      if i < 3:
        samples.append({"prediction": pred, "reference": refs[i]})
  result = {k: v / len(prompts) for k, v in totals.items()}
  result.update(examples=len(prompts), few_shot=few_shot, samples=samples)
  return result


def fmt(result: dict | None) -> str:
  if not result:
    return "-"
  return ", ".join(f"{k} {v:.1%}" for k, v in result.items() if isinstance(v, float))


def report(summary: dict) -> str:
  lines = [f"finished {summary['steps']} steps ({summary['method']}, "
           f"{summary['trainable_params']:,} trainable params)"]
  if summary.get("eval"):
    lines.append(f"eval loss {summary['eval']['loss']:.4f}, token accuracy {summary['eval']['accuracy']:.1%}")
  if summary.get("baseline") is not None:
    lines.append(f"base model, {summary['baseline']['few_shot']}-shot prompt: {fmt(summary['baseline'])}")
  if summary.get("finetuned") is not None:
    lines.append(f"fine-tuned model:              {fmt(summary['finetuned'])}")
  return "\n".join(lines)
