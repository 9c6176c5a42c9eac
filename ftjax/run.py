"""One training run's pieces, built from a config: model, adapter, data, mesh, optimizer.

`setup(config)` loads and validates everything a run needs before anything compiles; the train
loop (ftjax/train.py), the export command (ftjax/export.py) and the benchmark share it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ftjax import config as config_lib
from ftjax import models, objectives, peft, quant
from ftjax import step as step_lib
from ftjax.checkpoint import Checkpointer
from ftjax.data import selection, write_generated
from ftjax.data.loader import Shards
from ftjax.data.template import choose_chat_template
from ftjax.errors import FtjaxError
from ftjax.models.resolve import stored_quantisation
from ftjax.objectives import Objective
from ftjax.optim import make_optimizer
from ftjax.parallel import distributed, sharding

log = logging.getLogger("ftjax.run")


@dataclasses.dataclass
class Run:
  """Everything `setup` builds; train(), the export CLI and the benchmark share it."""
  config: ml_collections.ConfigDict
  model_cfg: Any
  tokenizer: Any
  peft_configs: dict[str, peft.PeftConfig]  # {adapter name: config}; {} for full fine-tuning
  graphdef: nnx.GraphDef
  trainable: dict
  frozen: dict
  mutable: dict
  train_ds: Any
  eval_ds: Any
  mesh: Any
  optimizer: Any
  schedule: Any
  loss_fn: Any  # the objective's loss function (see ftjax.objectives.base)
  quantised: bool = False  # a 4-bit base (config.quant / method qlora)
  objective: Objective | None = None  # None: built from run.config (objectives.get)

  def __post_init__(self):
    if self.objective is None:
      self.objective = objectives.get(self.config)

  def batch_sharding(self, ndim: int = 3) -> NamedSharding:
    """A train batch array [accum, micro_batch, ...]: micro-batch rows over data x fsdp."""
    return sharding.batch_sharding(self.mesh, ndim=ndim, batch_axis=1)

  def batch_shardings(self) -> dict:
    """{key: sharding} of the objective's train batch."""
    return {k: self.batch_sharding(2 + len(shape))
            for k, (shape, _) in self.objective.row_spec().items()}

  def place_batch(self, rows: dict) -> dict:
    """This process's rows of the next batch ([its share of train.batch_size, ...] each, the
    slice `distributed.batch_share` names) -> the global batch on the mesh."""
    accum = self.config.train.grad_accum
    micro = self.config.train.batch_size // accum
    out = {}
    for k, (shape, _) in self.objective.row_spec().items():
      local = rows[k].reshape((accum, -1) + tuple(shape))
      out[k] = distributed.global_batch({k: local}, self.batch_sharding(local.ndim),
                                        (accum, micro) + tuple(shape))[k]
    return out

  def place_eval_batch(self, batch: dict) -> dict:
    """A whole eval batch [n, ...] (every process holds all eval data) -> the global batch,
    each process contributing its rows."""
    out = {}
    for k, v in batch.items():
      sharding_ = sharding.batch_sharding(self.mesh, ndim=v.ndim)
      index, count = distributed.batch_share(sharding_, v.shape, axis=0)
      size = v.shape[0] // count
      out[k] = distributed.global_batch({k: v[index * size:(index + 1) * size]}, sharding_,
                                        v.shape)[k]
    return out

  def model(self, trainable: dict | None = None) -> nnx.Module:
    """The NNX model holding `trainable` (default: the initial trainable params)."""
    return step_lib.merge_model(self.graphdef, self.trainable if trainable is None else trainable,
                                self.frozen, self.mutable)


def peft_configs(config) -> dict[str, peft.PeftConfig]:
  """{adapter name: config} of the PEFT methods the config selects ({} for full fine-tuning);
  each is named after its method. modules_to_save goes with the first wrapping method."""
  options = objectives.get(config).peft_options(config_lib.names(config.modules_to_save) or None)
  out, to_save = {}, options["modules_to_save"]
  for name in config_lib.methods(config):
    wraps = name in ("lora", "qlora", "ia3", "adapter")
    method = method_config(config, name, to_save if wraps else None, options["task_type"])
    if method is not None:
      out[name] = method
      if wraps:
        to_save = None
  return out


def method_config(config, method: str, modules_to_save,
                  task_type: str = "CAUSAL_LM") -> peft.PeftConfig | None:
  """One PEFT method's config from its block of the run config (None: full fine-tuning)."""
  if method in ("lora", "qlora"):  # qlora: LoRA on the 4-bit base (config.quant)
    c = config.lora
    return peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                           target_modules=config_lib.targets(c.targets), use_rslora=c.rslora,
                           target_parameters=config_lib.names(c.target_parameters) or None,
                           use_dora=c.use_dora,
                           init_lora_weights="gaussian" if c.init_a == "gaussian" else True,
                           modules_to_save=modules_to_save, task_type=task_type)
  if method == "ia3":
    c = config.ia3
    return peft.IA3Config(target_modules=config_lib.targets(c.targets),
                          feedforward_modules=config_lib.targets(c.feedforward),
                          modules_to_save=modules_to_save, task_type=task_type)
  if method == "prompt":
    c = config.prompt
    return peft.PromptTuningConfig(num_virtual_tokens=c.num_virtual_tokens, prompt_tuning_init=c.init,
                                   prompt_tuning_init_text=c.init_text or None,
                                   tokenizer_name_or_path=config.model.name_or_path)
  if method == "prefix":
    c = config.prefix
    return peft.PrefixTuningConfig(num_virtual_tokens=c.num_virtual_tokens,
                                   prefix_projection=c.projection,
                                   encoder_hidden_size=c.encoder_hidden_size or None)
  if method == "adapter":
    c = config.adapter
    return peft.BottleneckAdapterConfig(
        reduction_factor=c.reduction_factor, non_linearity=c.non_linearity,
        architecture=c.architecture, target_modules=config_lib.targets(c.targets),
        modules_to_save=modules_to_save)
  return None


def quantisation(config) -> dict | None:
  """The 4-bit settings of the base (None: a float base)."""
  kind = config_lib.quant_type(config)
  if not kind:
    return None
  return dict(block_size=config.quant.block_size, quant_type=kind,
              double_quant=config.quant.double_quant, skip=config_lib.names(config.quant.skip))


def data_shards(config, share: tuple[int, int]) -> tuple[range, int]:
  """(this process's shard indices, number of shards) of the train data. `share`: its slice of
  the global batch (index, count) from `distributed.batch_share`."""
  index, count = share
  num = config.data.shards or count
  if num % count:
    raise FtjaxError(f"config: data.shards={num} does not split evenly over the {count} "
                     "processes (groups) that supply the batch; use a multiple of it")
  per = num // count
  return range(index * per, (index + 1) * per), num


def build_datasets(config, tokenizer, share: tuple[int, int] = (0, 1), examples=None):
  """(train, eval or None) Datasets of the examples `ftjax.data.selection` keeps: bad records out
  under data.check.on_error="skip" (under "fail" they stop the run, listed at file:line), leaked
  train examples out with data.check.drop_leaked, data.mix and a held-out split applied.
  `examples`: {"train", "eval"} already checked (train() passes the ones its check kept).

  With data shards (several processes, or data.shards > 1) the train data is `Shards`: example
  i belongs to shard i % data.shards, and this process packs only its own."""
  d = config.data
  objective = objectives.get(config)
  owned, num_shards = data_shards(config, share)
  if examples is None:
    report, examples = objective.check_data(tokenizer)
    if report["failed"]:
      raise FtjaxError(selection.failure_message(report))
  kept = examples
  if num_shards > 1:
    train_ds = Shards({i: objective.dataset(kept["train"][i::num_shards], tokenizer, train=True,
                                            name=f"{d.train} (shard {i} of {num_shards})")
                       for i in owned}, num_shards, accum=config.train.grad_accum)
  else:
    train_ds = objective.dataset(kept["train"], tokenizer, train=True, name=d.train)
  # Eval data is small: every process holds all of it and places its part of each batch.
  eval_ds = (objective.dataset(kept["eval"], tokenizer, train=False, name=d.eval or "held-out eval")
             if kept.get("eval") else None)
  log.info("train data: %s", train_ds.describe())
  if eval_ds is not None:
    log.info("eval data: %s", eval_ds.describe())
  return train_ds, eval_ds


def attach_adapters(model: nnx.Module, config) -> tuple[dict, tuple]:
  """Attaches the config's PEFT methods to `model` in place -> ({name: config}, (graphdef,
  trainable, frozen, mutable) states). Also runs under nnx.eval_shape (`abstract_run`)."""
  methods = peft_configs(config)
  for i, (name, method) in enumerate(methods.items()):
    peft.add_adapter(model, name, method, rngs=config.train.seed + 1 + i)
  if methods:
    peft.set_adapter(model, list(methods))  # a combination trains together
  return methods, nnx.split(model, peft.trainable(model) if methods else nnx.Param, nnx.Param, ...)


def start_adapter(model: nnx.Module, config, *, before_attach: bool) -> nnx.Module:
  """model.adapter: folded into the base before the run's adapters attach (adapter_merge), or
  loaded into the run's (only) adapter after they attach, as its starting weights."""
  path, merge = config.model.adapter, config.model.adapter_merge
  if not path or merge != before_attach:
    return model
  if merge:
    log.info("model.adapter: folding %s into the base weights", path)
    return peft.merge_and_unload(peft.load_adapter(model, path, adapter_name="start"))
  names = list(peft.configs(model))
  if len(names) != 1:
    raise FtjaxError(f"model.adapter={path!r} continues one adapter; this run attaches "
                     f"{len(names)} ({', '.join(names)}): set model.adapter_merge=True")
  log.info("model.adapter: %s adapter starts from %s", names[0], path)
  peft.load_adapter_weights(model, path, names[0])
  return model


# --- one path for a run: the model and its placement, abstract (ftjax.plan) or loaded ---------

def dtypes(config) -> dict:
  """{"dtype", "param_dtype", "trainable_dtype"}: model.* as jnp dtypes."""
  return {k: config_lib.DTYPES[config.model[k]] for k in ("dtype", "param_dtype", "trainable_dtype")}


def micro_batch(config, mesh) -> int:
  """train.batch_size / train.grad_accum, refused unless it splits over the mesh's
  data-parallel devices."""
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.batch_size // config.train.grad_accum
  if micro % batch_shards:
    raise FtjaxError(f"config: micro-batch {micro} (train.batch_size / train.grad_accum) is not "
                     f"divisible by the {batch_shards} data-parallel devices of the mesh")
  return micro


def place(state, mesh, dtype=None, abstract: bool = False) -> dict:
  """An nnx State -> its pure dict on `mesh`, each array sharded by the logical axes in its
  metadata, cast to `dtype` when given (trained params keep their own f32 master dtype).
  abstract: ShapeDtypeStructs carrying those shardings instead (nothing is allocated)."""
  tree = nnx.to_pure_dict(state)
  shardings = sharding.tree_shardings(tree, sharding.logical_axes(state), mesh)
  if abstract:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s),
                        tree, shardings)
  if dtype is not None:
    tree = jax.tree.map(lambda x: x.astype(dtype) if isinstance(x, jax.Array)  # on device
                        else np.asarray(x, dtype), tree)
  return jax.device_put(tree, shardings)


def load_model(config, *, mesh=None, name_or_path: str | None = None, quantize=False):
  """(model, tokenizer) of `config`: model.name_or_path (or `name_or_path`) stored in
  model.param_dtype, computing in model.dtype, cut to model.num_layers. With `mesh` the float
  params are created on it as they are read (the model is never whole in host memory) and left
  where they are; without, on the default device (a notebook's look)."""
  d = dtypes(config)
  return models.load(name_or_path or config.model.name_or_path, d["param_dtype"],
                     compute_dtype=d["dtype"], quantize=quantize, mesh=mesh,
                     num_layers=config.model.num_layers,
                     place=(lambda p: p) if mesh is not None else jax.device_put)


def abstract_model(config, model_cfg) -> nnx.Module:
  """The model `load_model` + `attach_adapters` would give, as shape/dtype stand-ins with their
  logical axes (a 4-bit base and the adapters included): nothing is read or allocated."""
  d, settings = dtypes(config), quantisation(config)

  def quantise_and_attach(model):
    if settings:
      model = quant.quantize_model(model, **settings)
    model = objectives.get(config).build_model(model)  # SFT: the causal LM itself
    attach_adapters(model, config)
    return model
  _, model_cfg = models.shrink_layers(None, model_cfg, config.model.num_layers)
  return models.abstract_model(model_cfg, dtype=d["dtype"], param_dtype=d["param_dtype"],
                               transform=quantise_and_attach)


def _assemble(config, model: nnx.Module, tokenizer, mesh, datasets=(None, None),
              abstract: bool = False, objective: Objective | None = None) -> Run:
  """The Run of a model with its adapters attached: split into trainable / frozen / mutable by
  one filter, placed on the mesh (or abstractly), with the step's optimizer and loss."""
  methods = peft_configs(config)
  graphdef, train_state, frozen_state, mutable_state = nnx.split(
      model, peft.trainable(model) if methods else nnx.Param, nnx.Param, ...)
  trainable = place(train_state, mesh, dtypes(config)["trainable_dtype"], abstract)
  frozen, mutable = place(frozen_state, mesh, None, abstract), place(mutable_state, mesh, None, abstract)
  optimizer, schedule, loss_fn = step_parts(config, trainable, model.config, mesh)
  return Run(config, model.config, tokenizer, methods, graphdef, trainable, frozen, mutable,
             *datasets, mesh, optimizer, schedule, loss_fn,
             quantised=quantisation(config) is not None, objective=objective)


def setup(config: ml_collections.ConfigDict, with_data: bool = True, examples=None) -> Run:
  """A Run of `config`; `examples`: checked {"train", "eval"} Examples (see build_datasets)."""
  config_lib.validate(config)
  objective = objectives.get(config)
  if config_lib.unresolved(config):
    raise FtjaxError(f"config: {', '.join(config_lib.unresolved(config))} = 'auto' is chosen from "
                     "the data (ftjax.data.auto.resolve, which train() and the data check run); "
                     "give a number here")
  # --- model: float params created on the mesh as they are read (sharded, storage dtype); a
  # 4-bit base's kernels quantised as they load, layer by layer; placed below by logical axes ---
  quant_settings = quantisation(config)
  if not quant_settings and stored_quantisation(config.model.name_or_path):
    log.warning("%s is a 4-bit checkpoint; loading it dequantised to float since quant.type is "
                "unset (set method=qlora or quant.type to train on the 4-bit base as stored)",
                config.model.name_or_path)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model, tokenizer = load_model(config, mesh=mesh, quantize=quant_settings or False)
  choose_chat_template(tokenizer, config.data.chat_template)
  model = objective.build_model(model)  # SFT: the causal LM itself
  model = start_adapter(model, config, before_attach=True)
  attach_adapters(model, config)  # and which params train: one filter (in _assemble)
  model = start_adapter(model, config, before_attach=False)

  # --- data (validated before anything compiles): a process reads only the shards of the data
  # its devices' batch rows come from ---
  datasets = (None, None)
  micro = micro_batch(config, mesh)
  if with_data:
    write_generated(config)
    share = distributed.batch_share(sharding.batch_sharding(mesh, 3, 1),
                                    (config.train.grad_accum, micro, config.data.seq_len), axis=1)
    datasets = build_datasets(config, tokenizer, share, examples)
  return _assemble(config, model, tokenizer, mesh, datasets, objective=objective)


def abstract_run(config, model_cfg):
  """The Run `setup` builds for `config`, with ShapeDtypeStructs (sharded as the run places
  them) in place of arrays -> (run, abstract state, abstract batch). `model_cfg`: the model's
  ModelConfig (ftjax.plan reads it without the weights). Nothing is loaded."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  micro = micro_batch(config, mesh)
  run = _assemble(config, abstract_model(config, model_cfg), None, mesh, abstract=True)
  # The state's shardings are the ones the run's jitted init gives it.
  init = jit_init_state(run)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(init, run.trainable, run.mutable),
                       init.lower(run.trainable, run.mutable).compile().output_shardings)
  shardings = run.batch_shardings()
  batch = {k: jax.ShapeDtypeStruct((config.train.grad_accum, micro) + tuple(shape), dtype,
                                   sharding=shardings[k])
           for k, (shape, dtype) in run.objective.row_spec().items()}
  return run, state, batch


def step_parts(config, trainable, model_cfg, mesh):
  """(optimizer, schedule, loss_fn) of the train step; `trainable` may be abstract (ftjax.plan).
  The loss is the objective's (ftjax.objectives)."""
  optimizer, schedule = make_optimizer(
      trainable, lr=config.train.lr, steps=config.train.steps, warmup_steps=config.train.warmup_steps,
      schedule=config.train.schedule, weight_decay=config.train.weight_decay, b1=config.train.b1,
      b2=config.train.b2, eps=config.train.eps, max_grad_norm=config.train.max_grad_norm,
      lora_plus_ratio=config.lora.loraplus_lr_ratio)
  return optimizer, schedule, objectives.get(config).loss_fn(model_cfg, mesh)


def jit_init_state(run: Run):
  """The jitted initial train state of (trainable, mutable), with explicit out shardings: each
  optimizer moment where its param is (`sharding.like_params`), counters replicated. `run`'s
  trees may be abstract (ftjax.plan)."""
  init = functools.partial(step_lib.init_state, optimizer=run.optimizer, seed=run.config.train.seed)
  shapes = jax.eval_shape(init, run.trainable, run.mutable)
  replicated = sharding.replicated(run.mesh)
  shardings = {"step": replicated, "rng": replicated,
               "trainable": jax.tree.map(lambda x: x.sharding, run.trainable),
               "mutable": jax.tree.map(lambda x: x.sharding, run.mutable),
               "opt_state": sharding.like_params(shapes["opt_state"], run.trainable, run.mesh)}
  return jax.jit(init, out_shardings=shardings)


def init_or_restore(run: Run, checkpointer: Checkpointer | None):
  """The sharded train state (restored from the latest checkpoint when there is one)."""
  state = jit_init_state(run)(run.trainable, run.mutable)
  data_state = None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    # The live state's shardings: a checkpoint from another mesh is resharded as it loads.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    step, state, data_state = checkpointer.restore_latest(abstract)
    log.info("restored checkpoint at step %d", step)
  return state, data_state


def jit_train_step(run: Run, state):
  """The train step, jitted with explicit shardings and the state donated."""
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, run.frozen)
  batch_sharding = run.batch_shardings()
  step = functools.partial(step_lib.train_step, graphdef=run.graphdef, loss_fn=run.loss_fn,
                           optimizer=run.optimizer, schedule=run.schedule)

  def traced_under_mesh(*args):  # the model pins activations' batch dim to the mesh (ops.constrain_batch)
    with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh):
      return step(*args)
  return jax.jit(
      traced_under_mesh,
      in_shardings=(state_shardings, frozen_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(run.mesh)), donate_argnums=(0,))
