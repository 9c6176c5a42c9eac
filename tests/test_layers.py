"""ftjax's layers import one way (docs/design.md, "Layers").

Every `import` / `from ... import` of an ftjax module in ftjax/, at module level and inside
functions alike, is read with `ast` (nothing is imported). The test fails, naming file:line, on

  - an import from a lower layer to a higher one (LAYERS below, top first);
  - a circle of imports between modules, whatever their layers;
  - a function-local import of an ftjax module without a comment saying why it is local (on
    its line or the line above): a local import must not be a way to hide a circle;
  - an import of another module's private name (`from ftjax.x import _name`).

Importing `ftjax.a.b` from outside the package `ftjax.a` runs `ftjax/a/__init__.py` too, so
that counts as an import of `ftjax.a` as well. Code under `if __name__ == "__main__":` runs
only when the file is the program (the module is then `__main__`, not itself), so it may call
a command above it, as `python -m ftjax.config --reference` does.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ftjax"

# Top first. A module may import its own layer and the layers below it, never one above. A
# module belongs to the layer of the longest prefix that names it ("ftjax.data.report" before
# "ftjax.data"); "ftjax" itself is the package face, ftjax/__init__.py, only. docs/design.md draws the same order and says why each module sits where it does.
LAYERS = (
    ("commands", ("ftjax", "ftjax.plan", "ftjax.notebook", "ftjax.classify", "ftjax.config_reference",
                  "ftjax.data_check")),
    ("train", ("ftjax.train", "ftjax.lr_probe")),
    ("evaluate, export", ("ftjax.evaluate", "ftjax.export")),
    ("cost probe", ("ftjax.cost",)),
    ("run", ("ftjax.run", "ftjax.hooks", "ftjax.metrics", "ftjax.flops")),
    ("objectives", ("ftjax.objectives",)),
    ("step", ("ftjax.step", "ftjax.optim")),
    ("config", ("ftjax.config",)),
    ("evaluation", ("ftjax.evaluation", "ftjax.generate", "ftjax.lm_eval", "ftjax.data.report")),
    ("data", ("ftjax.data",)),
    ("peft", ("ftjax.peft",)),
    ("models", ("ftjax.models", "ftjax.tokenizer", "ftjax.template_sandbox", "ftjax.losses")),
    ("quant", ("ftjax.quant",)),
    ("parallel", ("ftjax.parallel", "ftjax.lock", "ftjax.checkpoint")),
    ("base", ("ftjax.tree", "ftjax.nnx_utils", "ftjax.errors", "ftjax.files", "ftjax.cli",
              "ftjax.preemption", "ftjax.cost_plan", "ftjax.user_functions")),
)


@dataclasses.dataclass(frozen=True)
class Import:
  source: str  # the importing module, "ftjax.data.selection"
  target: str  # the imported module
  name: str  # the name taken from it ("" for `import x`)
  where: str  # "ftjax/data/selection.py:12"
  local: bool  # inside a function
  commented: bool  # a comment on its line or the line above


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
  best, rank = -1, None
  for i, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      inside = module.startswith(prefix + ".") and prefix != "ftjax"
      if (module == prefix or inside) and len(prefix) > best:
        best, rank = len(prefix), i
  if rank is None:
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py's LAYERS; add it")
  return rank


def _main_guard(node) -> bool:
  test = node.test if isinstance(node, ast.If) else None
  return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
          and test.left.id == "__name__" and any(
              isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _targets(node, module: str, is_package: bool) -> list[tuple[str, str]]:
  """(module, name) pairs an import statement takes, resolved to ftjax modules."""
  if isinstance(node, ast.Import):
    return [(a.name, "") for a in node.names]
  base = module if is_package else module.rsplit(".", 1)[0]
  if node.level:
    base = ".".join(base.split(".")[:len(base.split(".")) - node.level + 1])
    origin = f"{base}.{node.module}" if node.module else base
  else:
    origin = node.module
  # `from ftjax.data import selection` imports the module ftjax.data.selection
  return [(f"{origin}.{a.name}", "") if f"{origin}.{a.name}" in MODULES else (origin, a.name)
          for a in node.names]


def read_imports(module: str, path: pathlib.Path) -> list[Import]:
  text = path.read_text()
  lines = text.splitlines()
  tree = ast.parse(text, filename=str(path))
  out = []

  def visit(node, local: bool):
    for child in ast.iter_child_nodes(node):
      if _main_guard(child):
        continue
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        where = f"{path.relative_to(ROOT)}:{child.lineno}"
        line, above = lines[child.lineno - 1], lines[child.lineno - 2] if child.lineno > 1 else ""
        commented = "#" in line or above.strip().startswith("#")
        for target, name in _targets(child, module, path.name == "__init__.py"):
          if target == "ftjax" or target.startswith("ftjax."):
            out.append(Import(module, target, name, where, local, commented))
      visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

  visit(tree, False)
  return out


def edges(imports: list[Import]) -> list[tuple[Import, str]]:
  """(import, module it makes run): the target, and each package __init__ it passes through
  from outside that package."""
  out = []
  for imp in imports:
    target = imp.target
    while target not in MODULES and "." in target:
      target = target.rsplit(".", 1)[0]  # `from ftjax.x import name` where name is no module
    out.append((imp, target))
    parts = target.split(".")
    for i in range(2, len(parts)):
      package = ".".join(parts[:i])
      if not (imp.source == package or imp.source.startswith(package + ".")):
        out.append((imp, package))
  return out


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in read_imports(module, path)]
ALL_EDGES = [(imp, target) for imp, target in edges(ALL_IMPORTS) if target != imp.source]


def upward(all_edges) -> list[str]:
  return sorted({f"{imp.where}: {imp.source} ({LAYERS[layer_of(imp.source)][0]}) imports {target} "
                 f"({LAYERS[layer_of(target)][0]}), a higher layer"
                 for imp, target in all_edges if layer_of(target) < layer_of(imp.source)})


def circles(all_edges) -> list[str]:
  """Each circle of module imports once, as "a -> b (file:line) -> ... -> a"."""
  graph: dict[str, dict[str, str]] = {}
  for imp, target in all_edges:
    graph.setdefault(imp.source, {}).setdefault(target, imp.where)
  found, state = {}, {}

  def walk(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt, where in sorted(graph.get(node, {}).items()):
      if state.get(nxt) == "open":
        loop = stack[stack.index(nxt):]
        key = frozenset(loop)
        if key not in found:
          hops = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(loop, loop[1:] + [nxt])]
          found[key] = "; ".join(hops)
      elif nxt not in state:
        walk(nxt, stack)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      walk(node, [])
  return sorted(found.values())


def test_every_module_has_a_layer():
  for module in MODULES:
    layer_of(module)  # raises naming the module


def test_no_import_runs_up_the_layers():
  bad = upward(ALL_EDGES)
  assert not bad, "imports against the layer order (docs/design.md, Layers):\n" + "\n".join(bad)


def test_no_circle_of_imports():
  found = circles(ALL_EDGES)
  assert not found, "circles of imports:\n" + "\n".join(found)


def test_a_function_local_import_says_why():
  bad = sorted({f"{imp.where}: `{imp.target}` imported inside a function without a comment "
                "saying why (or move it to the top of the file)"
                for imp in ALL_IMPORTS if imp.local and not imp.commented})
  assert not bad, "\n".join(bad)


def test_no_private_name_of_another_module():
  bad = sorted({f"{imp.where}: {imp.source} takes {imp.target}.{imp.name}, a private name"
                for imp in ALL_IMPORTS if imp.name.startswith("_") and imp.target in MODULES
                and imp.target != imp.source})
  assert not bad, "\n".join(bad)


# --- the checker itself, on a planted tree --------------------------------------------------------

def test_the_checks_catch_a_planted_upward_import_circle_and_bare_local_import(tmp_path):
  """The checks above pass on ftjax; here each sees its fault, so a pass is not a blind spot."""
  pkg = tmp_path / "ftjax"
  (pkg / "data").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "errors.py").write_text("from ftjax import train\n")  # base -> train: up, and a circle
  (pkg / "train.py").write_text("from ftjax.errors import E\n")
  (pkg / "data" / "__init__.py").write_text("")
  (pkg / "data" / "selection.py").write_text(
      "def f():\n  from ftjax.errors import E\n\ndef g():\n  # why: kept lazy\n  from ftjax import errors\n")
  global ROOT, MODULES
  old = ROOT, MODULES
  ROOT = tmp_path
  MODULES = {module_name(p): p for p in sorted(pkg.rglob("*.py"))}
  try:
    imports = [imp for m, p in MODULES.items() for imp in read_imports(m, p)]
    found_edges = [(i, t) for i, t in edges(imports) if t != i.source]
    up = upward(found_edges)
    loops = circles(found_edges)
    bare = [i.where for i in imports if i.local and not i.commented]
  finally:
    ROOT, MODULES = old
  assert up == ["ftjax/errors.py:1: ftjax.errors (base) imports ftjax.train (train), a higher layer"]
  assert loops == ["ftjax.errors -> ftjax.train (ftjax/errors.py:1); "
                   "ftjax.train -> ftjax.errors (ftjax/train.py:1)"]
  assert bare == ["ftjax/data/selection.py:2"]  # g's import has its reason above it


@pytest.mark.parametrize("module, other", [("ftjax.data.selection", "ftjax.data"),
                                           ("ftjax.data.report", "ftjax.evaluation")])
def test_layer_of_takes_the_longest_prefix(module, other):
  assert layer_of(module) == layer_of(other)


def test_a_new_module_must_be_given_a_layer():
  with pytest.raises(AssertionError, match="ftjax.newpackage.x: in no layer"):
    layer_of("ftjax.newpackage.x")
