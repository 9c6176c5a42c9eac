"""docs/configuration.md, generated from `ftjax.config.base_config()` and its source.

  python -m ftjax.config --reference            # print the Markdown
  python -m ftjax.config --reference --write    # rewrite docs/configuration.md (or --write PATH)

The descriptions live in one place, the comments of `base_config()` in ftjax/config.py: the
comment lines right above a `c.block.key = ...` line and the comment at its end. Defaults and
types come from the built config itself, the allowed values from the tuples `validate` checks
against, so the reference cannot drift from the code. A key without a comment is an error here
(and so a failing test), not an empty cell.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import os
import sys
import tokenize

import ml_collections

from ftjax import config as config_lib
from ftjax.data.formats import FORMATS
from ftjax.errors import FtjaxError, cli_errors
from ftjax.evaluation.metrics import LOSS_METRICS, METRICS, NORMALIZERS
from ftjax.models.ops import ATTENTION_BACKENDS, REMAT_POLICIES

SOURCE = config_lib.__file__
SHOWN = "ftjax/config.py"  # in messages: the path in the repository
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(SOURCE))), "docs", "configuration.md")
COMMAND = "python -m ftjax.config --reference --write"

# Keys whose values `validate` checks against a named tuple (or registry) of the code.
ALLOWED = {
    "method": tuple(config_lib.METHODS) + ("PEFT methods joined by `+`",),
    "model.dtype": tuple(config_lib.DTYPES),
    "model.param_dtype": tuple(config_lib.DTYPES),
    "model.trainable_dtype": tuple(config_lib.DTYPES),
    "model.remat": tuple(REMAT_POLICIES),
    "model.attention": tuple(ATTENTION_BACKENDS),
    "quant.type": config_lib.QUANT_TYPES,
    "data.format": ("auto",) + tuple(FORMATS),
    "data.length_policy": config_lib.LENGTH_POLICIES,
    "data.check.on_error": config_lib.ON_ERROR_POLICIES,
    "train.schedule": config_lib.SCHEDULES,
    "train.nonfinite": config_lib.NONFINITE_POLICIES,
    "eval.metrics": tuple(LOSS_METRICS) + tuple(METRICS) + ("`pkg.module:function`",),
    "eval.normalize": NORMALIZERS,
}
MULTI = {"eval.metrics", "eval.normalize"}  # comma-separated lists of the allowed values


@dataclasses.dataclass(frozen=True)
class Entry:
  """One `c.a.b = ...` assignment of base_config(): where it is and what its comments say."""
  path: str
  line: int
  description: str
  section: bool  # `c.a = ml_collections.ConfigDict()`: a block of keys, not a value


def entries(source: str) -> dict[str, Entry]:
  """Every `c.<path> = ...` statement of base_config() in `source`, in source order, with its
  description: the comment lines directly above it (no blank line between) and its end-of-line
  comment, joined."""
  lines = source.splitlines()
  trailing, comment_only = {}, {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row, col = tok.start
      text = tok.string.lstrip("#").strip()
      if lines[row - 1][:col].strip():
        trailing[row] = text
      else:
        comment_only[row] = text
  function = next((node for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.FunctionDef) and node.name == "base_config"), None)
  if function is None:
    raise FtjaxError(f"{SHOWN}: no base_config() function")
  found = {}
  for stmt in function.body:
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
      continue
    path = _dotted(stmt.targets[0])
    if path is None:
      continue
    above, row = [], stmt.lineno - 1
    while row in comment_only:
      above.insert(0, comment_only[row])
      row -= 1
    end = [trailing[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in trailing]
    value = stmt.value
    section = (isinstance(value, ast.Call) and _dotted(value.func, root=None) is not None
               and _dotted(value.func, root=None).endswith("ConfigDict") and not value.args)
    found[path] = Entry(path, stmt.lineno, " ".join(above + end).strip(), section)
  return found


def _dotted(node, root: str | None = "c") -> str | None:
  """`c.a.b` -> "a.b" (root "c"); with root None, any `x.y.z` -> "x.y.z"."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  if root is None:
    return ".".join([node.id] + parts)
  return ".".join(parts) if node.id == root and parts else None


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  """{"a.b": value} for every value (not block) of the config."""
  out = {}
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaves(value, path + "."))
    else:
      out[path] = value
  return out


def describe(path: str, found: dict[str, Entry]) -> Entry | None:
  """The entry describing a leaf: its own assignment, or, for a key of a dict literal
  (`c.cost.usd_per_hour = ConfigDict(dict(A100=...))`), that literal's assignment."""
  parts = path.split(".")
  for n in range(len(parts), 0, -1):
    entry = found.get(".".join(parts[:n]))
    if entry is not None and not entry.section:
      return entry
  return None


def reference(config: ml_collections.ConfigDict | None = None, source: str | None = None) -> str:
  """The Markdown of docs/configuration.md. FtjaxError when a key has no description."""
  config = config_lib.base_config() if config is None else config
  if source is None:
    with open(SOURCE, encoding="utf-8") as f:
      source = f.read()
  found = entries(source)
  values = leaves(config)
  described = {path: describe(path, found) for path in values}
  missing = [p for p, e in described.items() if e is None or not e.description]
  if missing:
    where = ", ".join(f"{p} (line {described[p].line})" if described[p] else p for p in missing)
    raise FtjaxError(f"{SHOWN}: config keys without a description: {where}. Write one as a "
                     "comment above the key's line in base_config() or at its end")
  order = sorted(values, key=lambda p: (described[p].line, p))
  out = [_HEADER.format(command=COMMAND)]
  blocks = []  # (block path, its keys) in source order; "" for top-level keys
  for path in order:
    block = path.rsplit(".", 1)[0] if "." in path else ""
    while block and block in found and not found[block].section:  # a dict literal's keys
      block = block.rsplit(".", 1)[0] if "." in block else ""
    if not blocks or blocks[-1][0] != block:
      blocks.append((block, []))
    blocks[-1][1].append(path)
  for block, paths in blocks:
    out.append(f"\n## `{block}`\n" if block else "\n## Top-level keys\n")
    if block and found[block].description:
      out.append(_cell(found[block].description, table=False) + "\n")
    out.append("| key | default | type | description |")
    out.append("|---|---|---|---|")
    for path in paths:
      out.append(f"| `{path}` | {_default(values[path])} | {_type(path, values[path])} | "
                 f"{_cell(_with_allowed(path, described[path].description))} |")
  return "\n".join(out) + "\n"


_HEADER = """# Configuration reference

<!-- Generated by `{command}` from ftjax/config.py: do not edit by hand
     (tests/test_docs.py fails when this file and the code differ). -->

Every run is one config: a Python file under `configs/` that starts from
`ftjax.config.base_config()` and changes values (`configs/quickstart.py`). Any key can be
overridden on the command line, `--config.lora.rank=16`, `--config.data.train=my.jsonl`; the
schema is locked, so a misspelt key is an error, and `ftjax.config.validate` checks the values
and their combinations before anything loads or compiles. A resumed run refuses a change of
the keys that decide what it trains (docs/usage.md).

The defaults below are `base_config()`'s; the quickstart changes some of them. Descriptions
are the comments of `base_config()` in ftjax/config.py; allowed values, where the code names
them, are the ones `validate` checks."""


def _with_allowed(path: str, description: str) -> str:
  allowed = ALLOWED.get(path)
  if not allowed:
    return description
  shown = ", ".join(v if v.startswith("`") or " " in v else f"`{v}`" if v else '`""`'
                    for v in allowed)
  kind = "Any of (comma-separated)" if path in MULTI else "One of"
  end = "" if description.endswith(".") else "."
  return f"{description}{end} {kind}: {shown}."


def _default(value) -> str:
  if isinstance(value, str):
    return f'`"{value}"`'
  return f"`{value!r}`"


def _type(path: str, value) -> str:
  name = type(value).__name__
  if path.startswith("train.") and path.split(".", 1)[1] in config_lib.AUTO_KEYS:
    return 'number or `"auto"`'
  return name


def _cell(text: str, table: bool = True) -> str:
  return text.replace("|", "\\|") if table else text


@cli_errors
def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ftjax.config",
                                   description="The configuration reference, from the code.")
  parser.add_argument("--reference", action="store_true", required=True,
                      help="print docs/configuration.md's Markdown")
  parser.add_argument("--write", nargs="?", const=DOC, default=None, metavar="PATH",
                      help=f"write it to PATH instead (default {os.path.relpath(DOC)})")
  args = parser.parse_args(argv)
  text = reference()
  if args.write is None:
    sys.stdout.write(text)
    return
  with open(args.write, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {args.write}")


if __name__ == "__main__":
  main()
