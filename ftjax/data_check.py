"""`python -m ftjax.data check --config configs/<name>.py [--config.a.b=v ...] [--out DIR]`
(ftjax/data/__main__.py runs this module).

Checks the config's train and eval data (ftjax.data.selection, .quality), then, when the data
passes and cost.probe_steps > 0, loads the model and compiles and times the train step for the
cost plan (`run_check`: ftjax.cost.probe, the one part of the check that needs the training
stack and the run's objective, which is why this command sits above them, outside the data
package, while the rest of ftjax.data sits below):
prints a summary (ftjax.data.report), writes DIR/data_report.json (default: the current folder) and
exits 1 when data.check.on_error="fail" and a record is invalid (2 on a config error).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from ftjax import config as config_lib
from ftjax import cost, objectives
from ftjax.cli import parse_flags
from ftjax.data import auto, selection, write_generated
from ftjax.data import report as data_report
from ftjax.errors import cli_errors
from ftjax.files import write_json
from ftjax.models.resolve import tokenizer_for

USAGE = "usage: python -m ftjax.data check --config configs/<name>.py [--config.a.b=v ...] [--out DIR]"


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] != "check":
    print(USAGE, file=sys.stderr)
    sys.exit(2)
  config_flags.DEFINE_config_file("config", None, "a configs/<name>.py file", lock_config=True)
  flags.DEFINE_string("out", ".", "folder for data_report.json")
  sys.exit(_check([argv[0]] + argv[2:]))


@cli_errors
def _check(argv) -> int:
  cfg = parse_flags(argv)
  config_lib.validate(cfg)
  write_generated(cfg)  # data.generate: written as training would
  report = run_check(cfg, tokenizer_for(cfg.model.name_or_path), out_dir=flags.FLAGS.out)
  print(data_report.summary_text(report))
  if report["failed"]:
    print(selection.failure_message(report), file=sys.stderr)
    return 1
  return 0


def run_check(config, tokenizer, out_dir=".", probe=True):
  """Checks, adds the cost plan (probing the real step when `probe` and cost.probe_steps > 0
  and the data passed), writes out_dir/data_report.json, returns the report (its absolute
  path in report["written_to"], which the summary prints)."""
  objective = objectives.get(config)
  report, _ = objective.check_data(tokenizer)
  # train.epochs / "auto": the steps the plan prices. A failed check prices the records that
  # passed, what the run would train on once the bad ones are fixed or skipped.
  auto.resolve_from_report(config, report, scorable=objective.eval_loss)
  probed = None
  if probe and config.cost.probe_steps and not report["failed"]:
    probed = cost.probe(config, config.cost.probe_steps)
  data_report.add_cost_plan(report, config, probed)
  os.makedirs(out_dir, exist_ok=True)
  report["written_to"] = os.path.abspath(os.path.join(out_dir, "data_report.json"))
  write_json(report["written_to"], report)
  return report


if __name__ == "__main__":
  main()
