"""train.lr = "auto" by measurement (ftjax/lr_probe.py runs it, ftjax/data/lr_plan.py plans it)
and train.epochs = "auto" with early stopping (ftjax/data/auto.py): issue 24."""

import json
import logging
import math

import pytest

from ftjax import config as config_lib
from ftjax import lr_probe, objectives
from ftjax import train as train_lib
from ftjax.data import auto, lr_plan
from tiny import quickstart_data, run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=120, n_eval=16)


def test_choice_rule():
  """Out: a non-finite step, a non-finite loss, a loss above the start's. Among the rest the
  lowest held-out loss, and within 1% of it the larger rate."""
  def row(lr, loss, finite=True):
    return {"lr": lr, "held_out_loss": loss, "finite": finite}
  out = lr_plan.choose([row(1e-5, 2.9), row(1e-4, 2.00), row(1e-3, 2.015), row(1e-2, 3.5),
                         row(1e-1, math.nan), row(1.0, 1.0, finite=False)], start_loss=3.0)
  assert out["chosen"] == 1e-3  # 2.015 is within 1% of the best 2.00: the larger rate wins
  reasons = {r["lr"]: r["out"] for r in out["candidates"]}
  assert reasons[1e-2].startswith("held-out loss above the start's")
  assert reasons[1e-1] == "held-out loss not finite" and reasons[1.0] == "a step was not finite"
  assert reasons[1e-4] is None and reasons[1e-3] is None
  # just outside the tie band: the lower loss wins
  assert lr_plan.choose([row(1e-4, 2.00), row(1e-3, 2.03)], 3.0)["chosen"] == 1e-4
  assert lr_plan.choose([row(1e-4, math.nan)], 3.0)["chosen"] is None  # all out: the table


def test_candidates_span_two_orders_of_magnitude():
  for method in config_lib.METHODS:
    c = lr_plan.candidates(method)
    assert len(c) == 5 and c == sorted(c) and c[-1] / c[0] == pytest.approx(100, rel=0.01)
  assert lr_plan.candidates("lora")[0] == 5e-5 and lr_plan.candidates("lora")[-1] == 5e-3


def test_skip_rule_and_budget():
  c = config_lib.base_config()
  c.train.batch_size = 8
  for steps, expect in ((99, None), (100, 4), (150, 6), (1000, 8)):
    c.train.steps = steps
    p = lr_plan.plan(c, rows=240)
    if expect is None:  # 5 rates x 4 steps > 20% of 99 steps
      assert "cannot afford it" in p["skipped"] and ">= 100 steps" in p["skipped"]
    else:
      assert p["steps_each"] == expect and p["steps"] <= 0.2 * steps
      assert p["held_out_rows"] == 24  # 10% of 240 rows, in whole micro-batches of 8
  c.train.steps = 1000
  assert "too few" in lr_plan.plan(c, rows=12)["skipped"]  # 8 held out leave 4 < a batch
  c.objective, c.data.seq_len, c.grpo.reward_funcs = "grpo", 512, "exact_answer"
  assert "no loss on fixed rows" in lr_plan.plan(c, rows=200, scorable=objectives.get(c).eval_loss)["skipped"]


@pytest.fixture(scope="module")
def probe_run(model_dir, data_dir):
  """A tiny LoRA run set up as train() sets it up, and its data report."""
  from ftjax.run import setup
  c = run_config(model_dir, data_dir, **{"train.steps": 100, "train.lr": "auto"})
  examples, report = train_lib.check_data(c)
  return setup(c, examples=examples), report


def test_probe_picks_the_better_rate_with_one_compile(probe_run, monkeypatch):
  """A rate too small to move (1e-7) against one that learns (3e-3) and one so large its
  update overflows (1e30: the loss is not finite): the learning one is chosen; one compiled step
  serves all three."""
  run, _ = probe_run
  compiles = []
  compile_ = lr_probe._compile
  monkeypatch.setattr(lr_probe, "_compile", lambda *a: compiles.append(1) or compile_(*a))
  planned = {"candidates": [1e-7, 3e-3, 1e30], "steps_each": 4, "held_out_rows": 8}
  result = lr_probe.probe(run, planned)
  small, good, huge = result["candidates"]
  assert result["chosen"] == 3e-3 and len(compiles) == 1
  # the rate is a traced argument of that one program: each candidate trained differently
  assert small["train_losses"] != good["train_losses"] != huge["train_losses"]
  assert small["train_losses"][0] == good["train_losses"][0]  # the same start, the same batch
  assert good["held_out_loss"] < 0.99 * result["start_held_out_loss"]
  assert abs(small["held_out_loss"] - result["start_held_out_loss"]) < 1e-3  # did not move
  assert huge["out"] is not None and "finite" in huge["out"], huge  # diverged: out


def test_train_with_lr_auto_writes_the_choice_everywhere(model_dir, data_dir, tmp_path, caplog,
                                                        monkeypatch):
  """train.lr="auto": the probe runs (5 rates x 2 steps), the run trains at its choice, and
  the choice with the table is in the log, auto.json, config.json, the cost plan and
  report.md. (The budget is widened to let a 10-step run afford the probe and keep the test
  fast; test_skip_rule_and_budget checks the real one.)"""
  monkeypatch.setattr(lr_plan, "BUDGET_FRACTION", 1.0)
  monkeypatch.setattr(lr_plan, "MIN_STEPS_EACH", 2)
  c = run_config(model_dir, data_dir, **{"train.steps": 10, "train.lr": "auto",
                                         "export.adapter": False, "train.log_every": 0})
  workdir = tmp_path / "run"
  with caplog.at_level(logging.INFO, logger="ftjax.lr_probe"):
    train_lib.train(c, str(workdir))
  saved = json.loads((workdir / "auto.json").read_text())
  probe = saved["lr_probe"]
  assert [r["lr"] for r in probe["candidates"]] == lr_plan.candidates("lora")
  assert probe["steps_each"] == 2 and probe["chosen"] in lr_plan.candidates("lora")
  assert saved["resolved"]["train.lr"] == probe["chosen"]
  assert saved["how"]["train.lr"] == "measured by the lr probe"
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["lr"] == probe["chosen"]  # what the run trained at
  table = lr_plan.table_text(probe)
  assert table in caplog.text and table in (workdir / "report.md").read_text()
  assert f"| {probe['chosen']:g} | " in table and "**chosen**" in table
  data_report = json.loads((workdir / "data_report.json").read_text())
  assert data_report["cost"]["lr_probe"]["steps"] == 10
  assert "lr probe: 5 rates x 2 steps = 10 steps (100% of the run's)" in (
      workdir / "data_report.md").read_text()


def test_epochs_auto_stops_early_and_keeps_the_best(model_dir, tmp_path_factory, tmp_path):
  """train.epochs="auto" with an eval split: a ceiling of 2 x the fixed rule's epochs, evals
  twice an epoch, patience 2. Eight train examples fully fine-tuned at a high rate overfit (the
  eval loss turns up): the run stops long before the ceiling and exports the best eval's state."""
  small = quickstart_data(tmp_path_factory, n_train=8, n_eval=16)
  c = run_config(model_dir, small, **{"train.epochs": "auto", "train.lr": 1e-2, "method": "full",
                                         "export.adapter": False, "train.log_every": 0,
                                         "eval.metrics": "loss"})
  summary = train_lib.train(c, str(tmp_path / "run"))
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["train"]["epochs"] == min(25, 2 * auto.auto_epochs(8)[0]) == 25  # the ceiling
  assert config["train"]["patience"] == 2 and config["train"]["eval_every"] > 0
  curve = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  curve = [(m.get("step"), m.get("eval/loss")) for m in curve if "eval/loss" in m]
  assert summary["stopped_early"] and summary["steps"] < config["train"]["steps"], curve
  assert summary["best_step"] is not None and summary["best_step"] < summary["steps"]


def test_skipped_probe_and_resume_read_auto_json(probe_run, tmp_path, monkeypatch, caplog):
  """A skipped probe keeps the table's rate and says why (log, auto.json); a resumed run takes
  the rate its checkpoint was trained at from auto.json instead of probing again."""
  run, report = probe_run
  table_lr = run.config.train.lr
  report = dict(report, lr_probe={"skipped": "the run's 50 steps cannot afford it"})
  with caplog.at_level(logging.INFO, logger="ftjax.lr_probe"):
    same = lr_probe.resolve_lr(run, report, str(tmp_path), resuming=False)
  assert same is run and run.config.train.lr == table_lr
  assert "lr probe skipped: the run's 50 steps cannot afford it" in caplog.text
  saved = json.loads((tmp_path / "auto.json").read_text())
  assert saved["lr_probe"]["skipped"] and saved["resolved"]["train.lr"] == table_lr
  saved["lr_probe"] = {"chosen": 1.5e-3, "candidates": []}
  (tmp_path / "auto.json").write_text(json.dumps(saved))
  monkeypatch.setattr(lr_probe, "probe", lambda *a: pytest.fail("probed again on resume"))
  report["lr_probe"] = {"candidates": [1e-4], "steps_each": 4, "held_out_rows": 8}
  resumed = lr_probe.resolve_lr(run, report, str(tmp_path), resuming=True)
  assert resumed.config.train.lr == 1.5e-3 and resumed.optimizer is not run.optimizer
  run.config.train.lr = table_lr  # the module's run, as it was
