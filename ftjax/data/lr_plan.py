"""The learning-rate probe's plan and choice (train.lr = "auto"), apart from running it.

What a run can afford and how a rate is chosen are decided from the config and the data check's
counts, before anything loads: the data check prices the probe in the cost plan, the report
prints its table. ftjax/lr_probe.py runs it (the train step, the held-out loss); its docstring
gives the budget and choice rules these constants implement.
"""

from __future__ import annotations

import math

import numpy as np

N_CANDIDATES = 5
# (lowest, highest) candidate rate per method: two orders of magnitude each (docs/methods.md).
CANDIDATES = {"lora": (5e-5, 5e-3), "qlora": (5e-5, 5e-3), "full": (5e-6, 5e-4),
              "ia3": (3e-4, 3e-2), "adapter": (1e-5, 1e-3), "prompt": (3e-3, 3e-1),
              "prefix": (3e-3, 3e-1)}
BUDGET_FRACTION, MIN_STEPS_EACH, MAX_STEPS_EACH = 0.2, 4, 8
TIE = 0.01  # relative held-out loss within which the larger rate is preferred
HELD_OUT_FRACTION, MAX_HELD_OUT_BATCHES = 0.1, 4


def candidates(method: str) -> list[float]:
  low, high = CANDIDATES[method]
  return [float(f"{x:.3g}") for x in np.geomspace(low, high, N_CANDIDATES)]


def plan(config, rows: int, *, scorable: bool = True) -> dict:
  """The probe this run can afford (before anything loads: the cost plan prices it):
  {"candidates", "steps_each", "steps", "held_out_rows", "fraction"} or {"skipped": why}.
  scorable: the objective has a loss on fixed rows (Objective.eval_loss; GRPO has not)."""
  t = config.train
  method = config.method.split("+")[0].strip()  # the first of ftjax.config.methods (above data)
  if not scorable:
    return {"skipped": f"objective {config.objective!r} has no loss on fixed rows to score a rate on"}
  if config.data.shards > 1:
    return {"skipped": "sharded train data (data.shards > 1): the probe needs every row here"}
  steps_each = min(MAX_STEPS_EACH, int(BUDGET_FRACTION * t.steps) // N_CANDIDATES)
  if steps_each < MIN_STEPS_EACH:
    need = math.ceil(N_CANDIDATES * MIN_STEPS_EACH / BUDGET_FRACTION)
    return {"skipped": f"the run's {t.steps} steps cannot afford it ({N_CANDIDATES} candidates x "
                       f"{MIN_STEPS_EACH} steps within {BUDGET_FRACTION:.0%} of the run needs "
                       f">= {need} steps)"}
  micro = t.batch_size // t.grad_accum
  held_out = micro * max(1, min(MAX_HELD_OUT_BATCHES, round(HELD_OUT_FRACTION * rows / micro)))
  if rows - held_out < t.batch_size:
    return {"skipped": f"{rows} train rows are too few to hold out {held_out} and still fill a "
                       f"batch of {t.batch_size}"}
  steps = N_CANDIDATES * steps_each
  return {"candidates": candidates(method), "steps_each": steps_each, "steps": steps,
          "held_out_rows": held_out, "fraction": round(steps / t.steps, 3)}


def plan_line(p: dict) -> str:
  """The cost plan's line of the probe."""
  if "skipped" in p:
    return f"lr probe: skipped ({p['skipped']}); train.lr from the fixed table"
  return (f"lr probe: {len(p['candidates'])} rates x {p['steps_each']} steps = {p['steps']} "
          f"steps ({p['fraction']:.0%} of the run's) + one compile, scored on "
          f"{p['held_out_rows']} held-out train rows")


def choose(rows: list[dict], start_loss: float) -> dict:
  """The rule of the module docstring over the candidates' rows ({"lr", "held_out_loss",
  "finite"}) -> {"chosen" (None: all out), "start_held_out_loss", "candidates" (each with "out":
  why or None), "rule"}."""
  for r in rows:
    loss = r["held_out_loss"]
    r["out"] = ("a step was not finite" if not r["finite"] else
                "held-out loss not finite" if loss is None or not math.isfinite(loss) else
                "held-out loss above the start's (diverging)" if loss > start_loss else None)
  kept = [r for r in rows if r["out"] is None]
  chosen = None
  if kept:
    best = min(r["held_out_loss"] for r in kept)
    chosen = max(r["lr"] for r in kept if r["held_out_loss"] <= best * (1 + TIE))
  return {"chosen": chosen, "start_held_out_loss": start_loss, "candidates": rows,
          "rule": f"lowest held-out loss; within {TIE:.0%} of it the larger rate"}


def table_text(result: dict) -> str:
  """The probe's table as text (the log) and Markdown rows (the report)."""
  lines = ["| lr | held-out loss | |", "|---|---|---|",
           f"| (start) | {result['start_held_out_loss']:.4f} | |"]
  for r in result["candidates"]:
    note = "**chosen**" if r["lr"] == result["chosen"] else (r["out"] or "")
    loss = "not finite" if r["held_out_loss"] is None else f"{r['held_out_loss']:.4f}"
    lines.append(f"| {r['lr']:g} | {loss} | {note} |")
  return "\n".join(lines)
