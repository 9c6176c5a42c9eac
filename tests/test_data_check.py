"""`python -m ftjax.data check`: every problem with its code and line, policies, quality, leakage."""

import json
import os
import subprocess
import sys

import pytest

from ftjax.config import base_config
from ftjax.data import check, sources
from ftjax.errors import FtjaxError
from tiny import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = " ".join(f"word{i}" for i in range(300))
NEAR_A = ("the committee met on tuesday to review the annual budget for the city library and "
          "agreed to extend the opening hours during the winter months for students")
NEAR_B = NEAR_A.replace("tuesday", "thursday")  # one word of 27 changed


def _chat(user, assistant, role="assistant"):
  return json.dumps({"messages": [{"role": "user", "content": user},
                                  {"role": role, "content": assistant}]})


# line -> code ("" for a valid record); line 17 is not UTF-8
PLANTED = [
  (_chat("what is the capital of france", "paris"), ""),
  ("{not json", "bad_json"),
  ("[1, 2]", "data_type"),
  (json.dumps({"prompt": "no messages here"}), "missing_field"),
  (_chat("hi", "hello", role="bot"), "unknown_role"),
  (_chat("say nothing", "   "), "empty_output"),
  (_chat("repeat a lot", LONG), "over_length"),
  (_chat("Name a colour.", "Blue"), ""),
  (_chat("  name a   COLOUR ", "blue."), ""),  # exact duplicate of line 8 once normalised
  (_chat(NEAR_A, "noted"), ""),
  (_chat(NEAR_B, "noted"), ""),  # near duplicate of line 10
  (_chat("is water wet", "yes"), ""),
  (_chat("is water wet", "no"), ""),  # conflicting output for line 12's input
  (json.dumps({"messages": [{"role": "user", "content": 7},
                            {"role": "assistant", "content": "x"}]}), "wrong_type"),
  (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no_assistant_turn"),
  ("", ""),  # blank line: not a record
  (None, "bad_encoding"),
]
EXPECTED = [(i + 1, code) for i, (_, code) in enumerate(PLANTED) if code]


def _write_planted(path):
  with open(path, "wb") as f:
    for text, _ in PLANTED:
      f.write(b'{"messages": "\xff\xfe"}\n' if text is None else text.encode() + b"\n")
  return str(path)


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _config(train, eval_="", **data):
  c = base_config()
  c.data.train, c.data.eval, c.data.seq_len = train, eval_, 256
  for key, value in data.items():
    if key in ("on_error", "drop_leaked", "near_dup"):
      c.data.check[key] = value
    else:
      c.data[key] = value
  return c


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def test_every_problem_with_code_and_line(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report, kept = check.check(_config(path, length_policy="error"), tok)
  found = [(int(p["where"].rsplit(":", 1)[1]), p["code"]) for p in report["problems"]]
  assert sorted(found) == EXPECTED
  assert all(p["where"].startswith(path + ":") for p in report["problems"])
  assert report["counts"] == {code: 1 for _, code in EXPECTED}
  assert report["errors"] == len(EXPECTED) and report["failed"]
  q = report["quality"]
  assert q["exact_duplicates"]["listed"] == [[f"{path}:8", f"{path}:9"]]
  near = q["near_duplicates"]["listed"]
  assert [(p["a"], p["b"]) for p in near] == [(f"{path}:10", f"{path}:11")]
  # 28 words with the output "noted": 24 shingles each, the 5 holding the changed word differ
  assert near[0]["similarity"] == pytest.approx(19 / 29, abs=1e-3)
  assert q["conflicting_outputs"]["listed"] == [[f"{path}:12", f"{path}:13"]]
  assert {ex.where for ex in kept["train"]} == {f"{path}:{i}" for i in (1, 8, 9, 10, 11, 12, 13)}


def test_json_array_and_csv_report_every_problem(tmp_path, tok):
  array = tmp_path / "bad.json"
  array.write_bytes(b'[\n{"input": "a b", "output": "c"},\n{"input": "d" "output": "e"},\n'
                    b'{"input": "f", "output": "g"},\n{"input": "\xff", "output": "h"},\n'
                    b'{"input": "i", output: 1},\n{"input": "j ]", "output": "k"},\n'
                    b'{"input": "spans",\n "output": "\xfe two lines"}\n]\n')
  csv = tmp_path / "bad.csv"
  csv.write_text('input,output\na b,c\n"two\nlines",d\ne,f,g\nh\ni,\n"j, k",l\n')
  report, kept = check.check(_config(f"{array},{csv}", on_error="skip"), tok)
  found = [(p["where"].rsplit("/", 1)[1], p["code"]) for p in report["problems"]]
  assert found == [("bad.json:3", "bad_json"), ("bad.json:5", "bad_encoding"),
                   ("bad.json:6", "bad_json"), ("bad.json:9", "bad_encoding"), ("bad.csv:5", "bad_csv"), ("bad.csv:6", "bad_csv"),
                   ("bad.csv:7", "wrong_type")]  # an empty cell is None, as pandas reads it
  assert [ex.where.rsplit("/", 1)[1] for ex in kept["train"]] == [
      "bad.json:2", "bad.json:4", "bad.json:7", "bad.csv:2", "bad.csv:3", "bad.csv:8"]
  assert kept["train"][4].messages[0]["content"] == "two\nlines"


def test_a_failed_check_still_prices_auto_epochs(tmp_path, tok):
  """The cost plan of a failed check resolves train.epochs="auto" from the records that passed
  (what the run would train on once the bad ones are fixed), not the default step count."""
  c = _config(_write_planted(tmp_path / "bad.jsonl"))
  c.train.epochs = "auto"
  report = check.run_check(c, tok, out_dir=str(tmp_path / "out"), probe=False)
  assert report["failed"] and report["auto"]
  assert report["cost"]["steps"] == c.train.steps != base_config().train.steps


def test_over_length_follows_length_policy(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report, kept = check.check(_config(path, length_policy="truncate", on_error="skip"), tok)
  over = [p for p in report["problems"] if p["code"] == "over_length"]
  assert len(over) == 1 and not over[0]["error"] and "(truncated)" in over[0]["message"]
  assert f"{path}:7" in {ex.where for ex in kept["train"]}
  assert report["splits"]["train"]["truncated"] == 1
  assert report["splits"]["train"]["skipped"] == len(EXPECTED) - 1
  assert not report["failed"]


def _cli(model_dir, out, *overrides):
  args = [sys.executable, "-m", "ftjax.data", "check", "--config", "configs/quickstart.py",
          f"--out={out}", f"--config.model.name_or_path={model_dir}", "--config.data.generate=",
          "--config.data.eval=", "--config.eval.generate=False", "--config.data.system_prompt=",
          "--config.data.seq_len=256", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_fail_policy_names_every_line(tmp_path, model_dir):
  path = _write_planted(tmp_path / "bad.jsonl")
  out = tmp_path / "out"
  r = _cli(model_dir, out, f"--config.data.train={path}", "--config.data.length_policy=error")
  assert r.returncode == 1, r.stderr
  assert f"{len(EXPECTED)} data problems" in r.stderr
  for line, code in EXPECTED:
    assert f"{path}:{line}: " in r.stderr, code
  assert "compil" not in (r.stderr + r.stdout).lower()  # nothing was built: data only
  report = json.loads((out / "data_report.json").read_text())
  assert report["failed"] and len(report["problems"]) == len(EXPECTED)


def test_cli_skip_policy_counts_skipped(tmp_path, model_dir):
  path = _write_planted(tmp_path / "bad.jsonl")
  r = _cli(model_dir, tmp_path, f"--config.data.train={path}", "--config.data.check.on_error=skip",
           "--config.data.length_policy=drop")
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / "data_report.json").read_text())
  train = report["splits"]["train"]
  assert train["skipped"] == len(EXPECTED) - 1  # over_length is dropped by the length policy
  assert train["dropped"] == 1 and train["kept"] == 7
  assert "records skipped" in r.stdout
  # the cost plan, from a probe of the real step (tests/test_cost.py checks its arithmetic)
  cost = report["cost"]
  assert cost["steps"] == 20 and cost["here"]["step_s"] > 0 and cost["memory"]["fits"]
  assert "cost plan: 20 steps" in r.stdout and "peak memory" in r.stdout


def test_cli_config_error_exits_2(tmp_path, model_dir):
  r = _cli(model_dir, tmp_path, "--config.data.train=x.jsonl", "--config.data.check.on_error=maybe")
  assert r.returncode == 2 and "data.check.on_error" in r.stderr


def test_leakage_found_and_dropped(tmp_path, tok):
  train = _write(tmp_path / "train.jsonl", [
    json.dumps({"input": "What is the boiling point of water at sea level?", "output": "100 C"}),
    json.dumps({"input": NEAR_A, "output": "ok"}),
    json.dumps({"input": "Who wrote the novel about a white whale?", "output": "Melville"}),
    json.dumps({"input": "Translate 'cat' to French.", "output": "chat"}),
  ])
  paraphrase = NEAR_A.replace("agreed to", "decided to").replace("winter months", "cold months")
  eval_ = _write(tmp_path / "eval.jsonl", [
    json.dumps({"input": "what is the boiling point of   WATER at sea level", "output": "100"}),
    json.dumps({"input": paraphrase, "output": "ok"}),
    json.dumps({"input": "How many legs does a spider have?", "output": "8"}),
  ])
  report, kept = check.check(_config(train, eval_), tok)
  leaks = {(p["train"], p["eval"], p["kind"]): p["similarity"] for p in report["leakage"]["listed"]}
  assert set(leaks) == {(f"{train}:1", f"{eval_}:1", "exact"), (f"{train}:2", f"{eval_}:2", "near")}
  assert leaks[(f"{train}:1", f"{eval_}:1", "exact")] == 1.0
  assert 0.4 <= leaks[(f"{train}:2", f"{eval_}:2", "near")] < 1.0
  assert len(kept["train"]) == 4  # drop_leaked off: reported only

  kept = check.clean_examples(_config(train, eval_, drop_leaked=True), tok)
  assert [ex.where for ex in kept["train"]] == [f"{train}:3", f"{train}:4"]
  assert len(kept["eval"]) == 3


def test_training_uses_the_checked_examples(tmp_path, tok):
  from ftjax.run import build_datasets
  path = _write_planted(tmp_path / "bad.jsonl")
  train_ds, eval_ds = build_datasets(_config(path, on_error="skip"), tok)
  assert eval_ds is None
  assert sorted(ex.where for ex in train_ds.examples) == [
      f"{path}:{i}" for i in (1, 10, 11, 12, 13, 7, 8, 9)]  # string order; 7 truncated
  assert train_ds.summary["truncated"] == 1
  with pytest.raises(FtjaxError, match=r"(?s)8 data problems.*bad\.jsonl:17: not valid UTF-8"):
    build_datasets(_config(path), tok)  # default (fail): the problems stop the run, all listed


def test_labels_and_repeated_outputs(tok):
  from ftjax.data.formats import Example

  def ex(i, q, a):
    return Example(f"x.jsonl:{i}", messages=[{"role": "user", "content": q, "weight": 0},
                                             {"role": "assistant", "content": a, "weight": 1}])
  examples = [ex(i, f"review number {i}", "positive" if i % 2 else "negative") for i in range(20)]
  examples.append(ex(20, "review number 20", "neutral"))
  q = check.quality(examples, {id(e): 10 for e in examples}, threshold=0.4)
  assert q["labels"]["counts"] == {"positive": 10, "negative": 10, "neutral": 1}
  assert q["labels"]["rare"] == ["neutral"]
  assert {r["output"] for r in q["repeated_outputs"]} == {"positive", "negative"}
  assert "skipped" in q["length_outliers"]  # too few examples for percentiles


def test_markdown_section(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report, _ = check.check(_config(path, on_error="skip"), tok)
  md = check.markdown(report)
  assert md.startswith("## Data check") and "`bad_json` 1" in md and "| train | 8 |" in md


def test_gsm8k_train_test_leakage(tok):
  folder = os.path.join(REPO, "..", "shared", "data", "gsm8k")
  if not os.path.isdir(folder):
    pytest.skip(f"{folder} not found")
  fields = {"question": "input", "answer": "output"}
  splits = {}
  for name in ("train", "test"):
    records, problems = sources.read_all(os.path.join(folder, f"{name}.jsonl"))
    splits[name], invalid = check.validate_records(records, fields=fields)
    assert not problems and not invalid
  leaks = check.leakage(splits["train"], splits["test"], threshold=0.4)
  # Measured: 3 pairs (test 603 ~ train 1315 and 5163 at 0.556, test 633 ~ train 21 at 0.405),
  # all the same problem with names / numbers changed; none exact. The next closest is 0.2.
  assert len(leaks) == 3 and {p["kind"] for p in leaks} == {"near"}
  assert [round(p["similarity"], 3) for p in leaks] == [0.556, 0.556, 0.405]
  assert len(check.leakage(splits["train"], splits["test"], threshold=0.2)) == 4


def test_input_output_codes_with_field_renaming():
  from ftjax.data.sources import Record
  records = [Record("q.jsonl:1", {"question": "2+2?", "answer": "4"}),
             Record("q.jsonl:2", {"question": "3+3?"}),
             Record("q.jsonl:3", {"question": "4+4?", "answer": 8}),
             Record("q.jsonl:4", {"question": "5+5?", "answer": " "})]
  examples, problems = check.validate_records(records, fields={"question": "input", "answer": "output"})
  assert [ex.where for ex in examples] == ["q.jsonl:1"]
  assert [(p.where, p.code) for p in problems] == [
      ("q.jsonl:2", "missing_field"), ("q.jsonl:3", "wrong_type"), ("q.jsonl:4", "empty_output")]
