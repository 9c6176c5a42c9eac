"""The code's shape: no function in ftjax/ over MAX_LINES lines (issue 20), so a new feature is a
new small function or hook, not one more branch in the middle of a long one."""

import ast
import pathlib

MAX_LINES = 100
# The config schema is one long list of keys with their comments (docs/configuration.md is
# generated from it): splitting it would scatter the reference, not simplify code.
EXEMPT = {("ftjax/config.py", "base_config")}
ROOT = pathlib.Path(__file__).resolve().parent.parent


def long_functions(root: pathlib.Path, max_lines: int) -> list[str]:
  """'path:line name (n lines)' of every function or method longer than `max_lines`, counted
  from its `def` (decorators excluded) to its last line, nested functions included."""
  out = []
  for path in sorted((root / "ftjax").rglob("*.py")):
    rel = path.relative_to(root).as_posix()
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > max_lines and (rel, node.name) not in EXEMPT:
          out.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
  return out


def test_no_function_in_ftjax_is_over_100_lines():
  too_long = long_functions(ROOT, MAX_LINES)
  assert not too_long, (f"functions over {MAX_LINES} lines (split them into named steps):\n"
                        + "\n".join(too_long))


def test_the_check_sees_a_long_function(tmp_path):
  """The counter itself: a 101-line function is reported, a 100-line one is not."""
  (tmp_path / "ftjax").mkdir()
  body = "\n".join(f"  x{i} = {i}" for i in range(99))
  (tmp_path / "ftjax" / "m.py").write_text(
      f"def ok():\n{body}\n\n\ndef long():\n{body}\n  y = 0\n")
  assert long_functions(tmp_path, MAX_LINES) == ["ftjax/m.py:103 long (101 lines)"]
