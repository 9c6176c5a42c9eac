"""The docs against the code: the generated configuration reference, the commands and the links."""

import importlib.util
import os
import re

import pytest

from ftjax import config_reference
from ftjax.errors import FtjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = [os.path.join(DOCS, f) for f in sorted(os.listdir(DOCS)) if f.endswith(".md")] + [
    os.path.join(ROOT, "README.md")]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_configuration_reference_matches_the_code():
  assert config_reference.DOC == os.path.join(DOCS, "configuration.md")
  assert _read(config_reference.DOC) == config_reference.reference(), (
      f"docs/configuration.md is stale: regenerate it with `{config_reference.COMMAND}`")


def test_every_config_key_is_in_the_reference_with_its_default():
  text = config_reference.reference()
  values = config_reference.leaves(config_reference.config_lib.base_config())
  assert len(values) > 100
  for path, value in values.items():
    assert f"| `{path}` | {config_reference._default(value)} |" in text, path
  assert "One of: `cosine`, `linear`, `constant`." in text  # train.schedule, from SCHEDULES


def test_a_key_without_a_description_is_an_error():
  source = _read(config_reference.SOURCE)
  line = '  c.lora.targets = "all-linear"  # regex over module names, or a comma-separated list of names\n'
  assert source.count(line) == 1
  with pytest.raises(FtjaxError, match=r"without a description: lora\.targets \(line \d+\)"):
    config_reference.reference(source=source.replace(line, '  c.lora.targets = "all-linear"\n'))


def test_comments_above_and_at_the_end_of_a_line_are_joined():
  source = ("def base_config():\n  c = ml_collections.ConfigDict()\n"
            "  # The block.\n  c.a = ml_collections.ConfigDict()\n"
            "  # First line,\n  # second line.\n  c.a.x = 1  # and the end.\n\n"
            "  # Not attached: a blank line follows.\n\n  c.a.y = 2\n")
  found = config_reference.entries(source)
  assert found["a"].section and found["a"].description == "The block."
  assert found["a.x"].description == "First line, second line. and the end."
  assert found["a.y"].description == ""


def test_getting_started_commands_name_real_modules():
  text = _read(os.path.join(DOCS, "getting_started.md"))
  modules = set(re.findall(r"python -m (ftjax[\w.]*)", text))
  assert {"ftjax.train", "ftjax.export", "ftjax.generate", "ftjax.data", "ftjax.evaluate"} <= modules
  for name in modules:
    assert importlib.util.find_spec(name) is not None, f"getting_started.md runs missing {name}"


def test_relative_links_resolve():
  for page in PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      path = os.path.join(os.path.dirname(page), target.split("#")[0])
      assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to missing {target}"


def test_docs_stand_alone():
  for page in PAGES:
    assert not re.search(r"(\.\./|/work/)shared", _read(page)), page


def test_the_command_writes_the_reference(tmp_path, capsys):
  out = tmp_path / "configuration.md"
  config_reference.main(["--reference", "--write", str(out)])
  assert out.read_text(encoding="utf-8") == config_reference.reference()
  config_reference.main(["--reference"])
  assert capsys.readouterr().out.endswith(config_reference.reference())


def _anchor(heading):
  """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text):
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # a "# comment" in a code block is no heading
  return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_to_a_section_name_a_heading_of_that_page():
  for page in PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
      if re.match(r"[a-z]+:", target) or "#" not in target:
        continue
      path, anchor = target.split("#", 1)
      path = os.path.join(os.path.dirname(page), path) if path else page
      assert anchor in _anchors(_read(path)), f"{os.path.relpath(page, ROOT)} links to missing {target}"


def test_readme_is_a_front_door():
  """README.md stays short (the rest lives in docs/) and keeps the two commands .ci/run relies on."""
  text = _read(os.path.join(ROOT, "README.md"))
  assert len(text.splitlines()) <= 250
  assert "pip install -e . && python -m ftjax.train --config configs/quickstart.py" in text
  assert "pip install -e '.[test]' && python -m pytest -q -n 2 tests" in text
  assert "python -m pytest -q -n 2 tests" in _read(os.path.join(ROOT, ".ci", "run"))
  assert "## Faults and guarantees" in text and "(docs/faults.md)" in text
