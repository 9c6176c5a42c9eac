"""EleutherAI lm-evaluation-harness model adapter: `--model ftjax`.

    pip install 'ftjax[lm_eval]'
    python -m ftjax.lm_eval --model ftjax --model_args pretrained=runs/quickstart/merged \
        --tasks hellaswag --batch_size 8
    python -m ftjax.lm_eval --model ftjax \
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,adapter=runs/quickstart/adapter ...

`@register_model("ftjax")` only takes effect once this module is imported, and lm_eval's own
`lm_eval` command does not import it: `python -m ftjax.lm_eval ARGS` imports it (registering the
model) and then runs lm_eval's CLI with the same ARGS. From Python, import this module and use
`lm_eval.simple_evaluate(model="ftjax", ...)` or `FtjaxLM(...)` directly.

Scores come from one jitted forward pass per batch (log-probs of the continuation tokens and
whether each was the argmax, as lm_eval's HF adapter computes them); generate_until runs
ftjax.generate's batched greedy/sampled decoding and cuts the text at the `until` strings.
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import models, peft
from ftjax.errors import FtjaxError
from ftjax.generate import generate_ids

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval import utils as lm_utils
  from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                    postprocess_generated_text)
except ImportError as e:  # an optional dependency: say which package and extra
  raise ImportError("ftjax.lm_eval needs lm-evaluation-harness: pip install 'ftjax[lm_eval]' "
                    f"(or pip install lm-eval) ({e})") from e

# Batches are padded to a multiple of this many tokens: batches of similar lengths share one
# compile of the forward pass, and the padding (masked out, right of the tokens) costs little.
_WIDTH_BUCKET = 64

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, tokens, targets, segment_ids):
  """[b, t] log p(target | prefix) per position and whether the target was the argmax."""
  model = nnx.merge(graphdef, state)
  model.eval()  # a run's model may hold adapter dropout: scores are deterministic
  logits = model(tokens, segment_ids=segment_ids)  # f32
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return picked, greedy


def _bool_arg(value) -> bool:
  if isinstance(value, bool):
    return value
  return str(value).lower() in ("1", "true", "yes")


@register_model("ftjax")
class FtjaxLM(TemplateLM):
  """An ftjax model (built-in name, HF folder, .gguf file or Hub id; `adapter=`: a PEFT adapter
  folder, ftjax's or HF PEFT's) for lm_eval. model_args: pretrained, adapter, dtype (float32 |
  bfloat16 | float16), batch_size, max_length (default: the model's context), max_gen_toks."""

  def __init__(self, pretrained: str, adapter: str | None = None, dtype: str = "float32",
               batch_size: int | str = 8, max_length: int | None = None,
               max_gen_toks: int = 256, seed: int = 0, **kwargs) -> None:
    # kwargs: what lm_eval's CLI passes every model (device, max_batch_size, ...); the model
    # runs where jax puts it, so they are accepted and unused
    super().__init__()
    if dtype not in _DTYPES:
      raise FtjaxError(f"lm_eval model_args dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    model, tokenizer = models.load(pretrained, _DTYPES[dtype])
    if adapter:
      model = peft.load_adapter(model, adapter)
    self._setup(model, tokenizer, pretrained, batch_size, max_length, max_gen_toks, seed)

  @classmethod
  def from_model(cls, model, tokenizer, name: str = "ftjax", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0) -> "FtjaxLM":
    """An adapter over a model already in memory (a run's end hook, a notebook): nothing is
    loaded; `name` stands for `pretrained` in lm_eval's outputs."""
    lm = cls.__new__(cls)
    TemplateLM.__init__(lm)
    lm._setup(model, tokenizer, name, batch_size, max_length, max_gen_toks, seed)
    return lm

  def _setup(self, model, tokenizer, name, batch_size, max_length, max_gen_toks, seed) -> None:
    self.model, self.tokenizer = model, tokenizer
    if str(batch_size).startswith("auto"):
      batch_size = 8  # no memory probing: a fixed default
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise FtjaxError(f"lm_eval model ftjax: batch_size={batch_size}; expected a number >= 1 or 'auto'")
    self._max_length = int(max_length or self.model.config.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    self.pretrained = name
    graphdef, state = nnx.split(self.model)
    self._graphdef, self._state = graphdef, jax.tree.map(jnp.asarray, state)

  # -- tokens ------------------------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    # as lm_eval's HF adapter: BOS when the model has one, else EOS, before an empty context
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.eot_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    if add_special_tokens is None:  # a string that already starts with BOS gets no second one
      bos = self.tokenizer.bos_token
      add_special_tokens = not (bos and string.startswith(bos))
    return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

  def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  # -- chat templates (lm_eval --apply_chat_template) ----------------------------------------
  @property
  def tokenizer_name(self) -> str:
    return str(self.pretrained).replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return getattr(self.tokenizer, "chat_template", None) or ""

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(chat_history,
                                              add_generation_prompt=add_generation_prompt)

  # -- scoring -----------------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[(key, context ids, continuation ids)] -> [(sum of continuation log-probs, is_greedy)].

    As lm_eval's HF adapter: the input is context + continuation minus its last token,
    left-truncated to max_length; the continuation's tokens are scored at the end."""
    rows = []
    for _, context, continuation in requests:
      if not continuation:
        raise FtjaxError("lm_eval: a loglikelihood request with an empty continuation")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole, len(continuation)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    # longest first: a batch holds similar lengths (less padding) and the first batch shows
    # at once whether the longest fits in memory
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      batch = order[start:start + self.batch_size]
      for i, score in zip(batch, self._score_batch([rows[i] for i in batch])):
        results[i] = score
    return results

  def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    width = -(-max(len(w) - 1 for w, _ in rows) // _WIDTH_BUCKET) * _WIDTH_BUCKET
    tokens = np.zeros((len(rows), width), np.int32)
    targets = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)  # 0: padding, masked out of attention
    for r, (whole, _) in enumerate(rows):
      n = len(whole) - 1
      tokens[r, :n], targets[r, :n], segments[r, :n] = whole[:-1], whole[1:], 1
    logp, greedy = _token_logprobs(self._graphdef, self._state, jnp.asarray(tokens),
                                   jnp.asarray(targets), jnp.asarray(segments))
    logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
    out = []
    for r, (whole, n_cont) in enumerate(rows):
      end = len(whole) - 1
      span = slice(max(end - n_cont, 0), end)  # a continuation longer than max_length: its tail
      out.append((float(logp[r, span].sum()), bool(greedy[r, span].all())))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihoods (perplexity tasks), in disjoint max_length windows as
    lm_eval's HF adapter splits them."""
    windows, owner = [], []
    for r, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(string),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append(((None,), context, continuation))
        owner.append(r)
    totals = [0.0] * len(requests)
    for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
      totals[r] += logp
    return totals

  # -- generation --------------------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Batched generation (ftjax.generate.generate_ids), requests grouped by their generation
    settings; each text is cut at the first of its `until` strings (and the EOS text)."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    out: list[str | None] = [None] * len(requests)
    for members in groups.values():
      for start in range(0, len(members), self.batch_size):
        batch = members[start:start + self.batch_size]
        texts = self._generate_batch([requests[i].args[0] for i in batch], requests[batch[0]].args[1])
        for i, text in zip(batch, texts):
          out[i] = text
    return out

  def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_new = int(kwargs.pop("max_gen_toks"))
    room = self.max_length - max_new
    if room < 1:
      raise FtjaxError(f"lm_eval: max_gen_toks={max_new} leaves no room for a prompt in the "
                       f"model's {self.max_length} tokens")
    prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
    temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
    pad = self.tokenizer.pad_token_id
    ids = generate_ids(self.model, prompts, max_new, temperature=temperature, seed=self.seed,
                       eos_ids={self.eot_token_id}, pad_id=0 if pad is None else pad,
                       top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0))
    return [postprocess_generated_text(self.tok_decode(row), until, None) for row in ids]


def main(argv: list[str] | None = None) -> None:
  """`python -m ftjax.lm_eval ARGS`: lm_eval's own CLI with `--model ftjax` registered."""
  from lm_eval.__main__ import cli_evaluate
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
