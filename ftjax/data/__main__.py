"""`python -m ftjax.data check --config configs/<name>.py [--config.a.b=v ...] [--out DIR]`.

Checks the config's train and eval data (ftjax.data.check), then, when the data passes and
cost.probe_steps > 0, loads the model and compiles and times the train step for the cost plan
(ftjax.cost): prints a summary, writes DIR/data_report.json (default: the current folder) and
exits 1 when data.check.on_error="fail" and a record is invalid (2 on a config error).
"""

import sys

from ftjax.errors import cli_errors

USAGE = "usage: python -m ftjax.data check --config configs/<name>.py [--config.a.b=v ...] [--out DIR]"


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] != "check":
    print(USAGE, file=sys.stderr)
    sys.exit(2)
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "a configs/<name>.py file", lock_config=True)
  flags.DEFINE_string("out", ".", "folder for data_report.json")
  sys.exit(_check([argv[0]] + argv[2:]))


@cli_errors
def _check(argv) -> int:
  from absl import flags
  from ftjax import config as config_lib
  from ftjax.data import check
  from ftjax.models.resolve import tokenizer_for
  from ftjax.run import _prepare_data
  from ftjax.train import parse_flags

  cfg = parse_flags(argv)
  config_lib.validate(cfg)
  _prepare_data(cfg)  # a generated dataset (data.generate) is written as training would
  report = check.run_check(cfg, tokenizer_for(cfg.model.name_or_path), out_dir=flags.FLAGS.out)
  print(check.summary_text(report))
  if report["failed"]:
    print(check.failure_message(report), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  main()
