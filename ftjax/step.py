"""The pure train and eval steps, for any Flax NNX model.

A model crosses into the jitted step as plain nested dicts. `split_model` splits it once into a
static graphdef and three state dicts:

  trainable  the params the `trainable` filter selects (ftjax.peft.AdapterParam for PEFT,
             nnx.Param for full fine-tuning): differentiated and updated by the optimizer
  frozen     every other param: no gradient, no optimizer state, never changed
  mutable    every other variable (BatchNorm statistics, RNG counters): carried through the step

Inside the step `nnx.merge` rebuilds the model from them. That happens while jit traces, once:
the compiled step takes and returns arrays, with no Python walk of the object graph per call.

`loss_fn(model, batch, rng)` returns sums over the batch's targets: {"loss_sum", "count", ...}.
The step divides the summed loss of the whole accumulation window once by its total count (not a
mean of per-micro-batch means; transformers#34191), and reports every other sum as a mean per
target (the causal-LM loss sums "accuracy"), or, for a sum `x` returned with `x__count`, per
that count (e.g. a reward per completion where the loss counts tokens).

A step whose loss or gradient is not finite leaves the state as it was (only `step` advances)
and says so in metrics["finite"]; the train loop then stops or skips by its policy. So a
non-finite update can never reach a checkpoint. The learning-rate schedule counts applied
updates (the optimizer's own count), not steps: a skip delays the rest of the schedule by one
step, as in HF Trainer, which skips lr_scheduler.step() with a skipped optimizer step; the
logged metrics["lr"] reads the same count, so it is the rate the update applied.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax.losses import CausalLMLoss
from ftjax.optim import applied_updates
from ftjax.tree import Params

def split_model(model: nnx.Module, trainable) -> tuple[nnx.GraphDef, Params, Params, Params]:
  """(graphdef, trainable, frozen, mutable) with the three states as nested dicts of arrays."""
  graphdef, train, frozen, mutable = nnx.split(model, trainable, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(train), nnx.to_pure_dict(frozen), nnx.to_pure_dict(mutable)


def merge_model(graphdef: nnx.GraphDef, trainable: Params, frozen: Params, mutable: Params):
  return nnx.merge(graphdef, trainable, frozen, mutable)


def init_state(trainable: Params, mutable: Params, optimizer: optax.GradientTransformation,
               seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
          "opt_state": optimizer.init(trainable), "mutable": mutable,
          "rng": jax.random.key_data(jax.random.key(seed))}


def train_step(state: dict, frozen: Params, batch: dict, *, graphdef: nnx.GraphDef,
               loss_fn: Callable, optimizer: optax.GradientTransformation,
               schedule: Callable | None = None) -> tuple[dict, dict]:
  """One optimizer update from a batch whose leaves are [accum, micro_batch, ...].

  `schedule` (optional) only reports the learning rate of this step in the metrics, read at
  the optimizer's count of applied updates (see the module docstring).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def micro(carry, xs):
    grads, mutable = carry
    micro_batch, key = xs

    def loss(trainable):
      model = nnx.merge(graphdef, trainable, frozen, mutable)
      out = loss_fn(model, micro_batch, key)
      return out["loss_sum"], (out, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    g, (out, mutable) = jax.grad(loss, has_aux=True)(state["trainable"])
    return (jax.tree.map(jnp.add, grads, g), mutable), out

  accum = jax.tree.leaves(batch)[0].shape[0]
  zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
  (grads, mutable), outs = jax.lax.scan(micro, (zeros, state["mutable"]),
                                        (batch, jax.random.split(rng, accum)))
  sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), outs)
  count = jnp.maximum(sums["count"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

  def update(_):
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    return optax.apply_updates(state["trainable"], updates), opt_state, mutable

  def keep(_):
    return state["trainable"], state["opt_state"], state["mutable"]

  trainable, opt_state, mutable = jax.lax.cond(finite, update, keep, None)
  metrics = {k: v / (jnp.maximum(sums[k + "__count"], 1.0) if k + "__count" in sums else count)
             for k, v in sums.items() if k not in ("loss_sum", "count") and not k.endswith("__count")}
  metrics.update(loss=sums["loss_sum"] / count, count=sums["count"], grad_norm=grad_norm,
                 finite=finite)
  if schedule is not None:
    # The learning rate this step applied (or would have, when skipped): the schedule at the
    # optimizer's own count of applied updates, the clock its update reads, not at `step`.
    metrics["lr"] = schedule(applied_updates(state["opt_state"], default=state["step"]))
  new_state = dict(state, step=state["step"] + 1, trainable=trainable, opt_state=opt_state,
                   mutable=mutable)
  return new_state, metrics


def fit(model: nnx.Module, batches: Iterable[dict], *, optimizer: optax.GradientTransformation,
        trainable, loss_fn: Callable | None = None, seed: int = 0) -> list[dict]:
  """Trains `model` in place, one optimizer step per batch; returns each step's metrics.

  The whole train step for a model in a notebook or script: split once, one jitted step with
  donated state, the trained state written back into `model` at the end. `trainable`: an nnx
  filter (ftjax.peft.AdapterParam, nnx.Param, ...). `loss_fn` defaults to the causal-LM loss
  (batches as ftjax.data produces them); batches carry no accumulation axis.
  """
  graphdef, train, frozen, mutable = split_model(model, trainable)
  state = init_state(train, mutable, optimizer, seed)
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                                   loss_fn=loss_fn or CausalLMLoss(remat="projections")),
                 donate_argnums=0)
  history = []
  for batch in batches:
    state, metrics = step(state, frozen, jax.tree.map(lambda x: jnp.asarray(x)[None], batch))
    history.append(metrics)
  nnx.update(model, state["trainable"], state["mutable"])
  return [{k: float(v) for k, v in m.items()} for m in jax.device_get(history)]


def eval_step(trainable: Params, frozen: Params, mutable: Params, batch: dict, *,
              graphdef: nnx.GraphDef, loss_fn: Callable) -> dict:
  """The loss sums on one un-accumulated batch, in eval mode (no dropout)."""
  model = nnx.merge(graphdef, trainable, frozen, mutable)
  model.eval()
  return loss_fn(model, batch, None)
