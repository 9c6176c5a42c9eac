"""Nested-dict helpers: param trees keyed "a/b/c" (models, parallel, peft), configs keyed
"a.b.c" (config.json, tracker params). Plain dicts only: nothing here knows a model or a config.
"""

from __future__ import annotations

from typing import Any, Iterator

Params = dict[str, Any]  # a nested dict of arrays, keyed by module / param names


def get_path(tree: Params, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def set_path(tree: Params, path: str, value) -> None:
  keys = path.split("/")
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def flatten(tree: Params, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yields ("a/b/c", leaf) in sorted key order."""
  for key in sorted(tree, key=str):
    value = tree[key]
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      yield from flatten(value, path)
    else:
      yield path, value


def unflatten(items) -> Params:
  tree: Params = {}
  for path, value in items:
    set_path(tree, path, value)
  return tree


def flat(tree: dict, prefix: str = "") -> dict:
  """{"train.lr": 1e-4, ...}: a nested dict (config.to_dict(), a saved config.json) by dotted key."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
