"""Render a chat template once per conversation shape instead of once per example.

Rendering is most of what tokenising chat data costs after the encoding itself: finding where
each assistant message sits takes two Jinja renders per example (template.py). Most templates
never look at a message's content; they only paste it. For those, the rendering of a conversation
is a fixed skeleton per *shape* (the sequence of roles and weights, and which contents are empty)
with the contents pasted in. So the template is rendered once per shape with opaque placeholder
contents, cut into pieces exactly as template._template_pieces cuts a real example, and each
example of that shape becomes `str.format` of its contents into those pieces.

A template that does look at contents must not take this path. Three guards, any of which sends a
shape or an example back to the per-example renders:
  - the shape is rendered twice, with two different placeholders, the second padded with spaces.
    The placeholders carry the characters an escaping filter would change (quotes, <, &, \\), so
    a template that escapes, rewrites or drops a content fails to reproduce them; the padded one
    tells whether the template keeps surrounding whitespace or trims it (`| trim`, Llama 3);
  - the string literals a template compares contents against or passes to a method of theirs
    (Qwen3's `'</think>' in content`, `content.split('</think>')`) are read off its syntax tree:
    an example whose contents contain one is rendered the slow way;
  - the first examples of each shape and every 256th one after are also rendered by Jinja and
    must match the substituted text exactly, or the whole shape goes the slow way.
"""

from __future__ import annotations

import functools

import jinja2
from jinja2 import nodes

_CHECK_EVERY = 256  # examples of a shape between two full renders that verify the substitution
_CHECK_FIRST = 2  # examples of each shape verified before substituting
_ESCAPED = "\"'<>&\\"  # changed by |e, |tojson, |replace(...) and friends: a placeholder carries them


def _placeholder(i, variant):
  return f"\ue000{variant}{i}{_ESCAPED}\ue001"


def shape_of(messages):
  """What the skeleton depends on: roles, weights and whether each content is empty (templates
  test `if message.content`). Whitespace-only contents (which a trimming template empties) have
  no shape: None sends them the slow way."""
  key = []
  for m in messages:
    content = m["content"]
    if content and not content.strip():
      return None
    key.append((m["role"], m["weight"], bool(content)))
  return tuple(key)


class Skeletons:
  """Per-shape piece formats for one tokenizer's template; `pieces(example)` is the fast path."""

  def __init__(self, tok, template_pieces, render):
    self._tok = tok
    self._template_pieces = template_pieces  # template._template_pieces (the slow, exact path)
    self._render = render  # template._render
    self._shapes = {}  # shape -> [piece formats, trims, examples seen], or None: the slow way
    self._triggers = content_literals(getattr(tok, "chat_template", None) or "")

  def pieces(self, example):
    """The example's pieces, as template._template_pieces would give them, or None when this
    example must be rendered the slow way."""
    messages = example.messages
    shape = shape_of(messages)
    if shape is None or (self._triggers and any(
        t in m["content"] for m in messages for t in self._triggers)):
      return None
    entry = self._shapes.get(shape, False)
    if entry is False:
      entry = self._shapes[shape] = self._build(example)
    if entry is None:
      return None
    formats, trims = entry[0], entry[1]
    contents = [m["content"].strip() if trims else m["content"] for m in messages]
    pieces = [(f.format(*contents) if isinstance(f, str) else f, kind, w) for f, kind, w in formats]
    entry[2] += 1
    if entry[2] <= _CHECK_FIRST or entry[2] % _CHECK_EVERY == 0:
      if "".join(p for p, _, _ in pieces if isinstance(p, str)) != self._render(self._tok, messages, False):
        self._shapes[shape] = None
        return None
    return pieces

  def _build(self, example):
    """[piece formats, trims, count] for the example's shape, or None when the template does not
    paste contents opaquely."""
    def with_contents(variant, pad=""):
      return [dict(m, content=f"{pad}{_placeholder(i, variant)}{pad}" if m["content"] else "")
              for i, m in enumerate(example.messages)]
    try:
      plain = with_contents("a")
      pieces = self._template_pieces(type(example)(example.where, messages=plain), self._tok)
      padded = self._render(self._tok, with_contents("b", " "), False)
    except Exception:  # noqa: BLE001 -- the slow path raises the template's own error, with context
      return None
    full = "".join(p for p, _, _ in pieces if isinstance(p, str))
    as_padded, as_trimmed = full, full
    for i, m in enumerate(plain):
      if m["content"]:
        as_padded = as_padded.replace(m["content"], f" {_placeholder(i, 'b')} ")
        as_trimmed = as_trimmed.replace(m["content"], _placeholder(i, "b"))
    if padded not in (as_padded, as_trimmed):
      return None
    formats = []
    for text, kind, weight in pieces:
      if isinstance(text, str):
        text = text.replace("{", "{{").replace("}", "}}")
        for i, m in enumerate(plain):
          if m["content"]:
            text = text.replace(m["content"], "{%d}" % i)
      formats.append((text, kind, weight))
    return [formats, padded == as_trimmed and as_padded != as_trimmed, 0]


@functools.lru_cache(maxsize=16)
def content_literals(source: str) -> tuple[str, ...]:
  """String constants a template compares a message's content with, or hands to one of its
  methods or filters (`'</think>' in content`, `content.split('</think>')`, `content |
  replace('a', 'b')`): a content holding one may render differently from a placeholder."""
  if not source:
    return ()
  try:
    tree = jinja2.Environment().parse(source)
  except jinja2.TemplateSyntaxError:
    return ()  # rendering will report it
  found = set()
  for node in tree.find_all((nodes.Compare, nodes.Call, nodes.Filter, nodes.Test)):
    if _mentions_content(node):
      found.update(_constants(node))
  return tuple(sorted(s for s in found if s))


def _mentions_content(node):
  for n in node.find_all((nodes.Name, nodes.Getattr, nodes.Getitem)):
    if isinstance(n, nodes.Name) and n.name == "content":
      return True
    if isinstance(n, nodes.Getattr) and n.attr == "content":
      return True
    if isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content":
      return True
  return False


def _constants(node):
  """String constants under `node`, except the keys of subscripts (`message['content']`)."""
  for child in node.iter_child_nodes():
    if isinstance(child, nodes.Const):
      if isinstance(child.value, str):
        yield child.value
    elif isinstance(child, nodes.Getitem):
      yield from _constants(child.node)
    else:
      yield from _constants(child)
