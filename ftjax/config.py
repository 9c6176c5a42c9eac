"""The one config schema, and its validation.

Every file under configs/ starts from `base_config()` and changes values; the schema is locked,
so a typo (`--config.trian.lr=...`) is an error instead of a silently ignored key. `validate`
runs before anything loads or compiles.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ftjax.errors import FtjaxError
from ftjax.models.ops import ATTENTION_BACKENDS, REMAT_POLICIES

# PEFT methods (each with its block below) and full fine-tuning.
METHODS = ("lora", "qlora", "ia3", "prompt", "prefix", "adapter", "full")
MERGEABLE = ("lora", "qlora", "ia3", "full")  # adapters with a merged form (export.merged)
QUANT_TYPES = ("", "nf4", "fp4", "int8")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LENGTH_POLICIES = ("truncate", "drop", "error")
NONFINITE_POLICIES = ("stop", "skip")
ON_ERROR_POLICIES = ("fail", "skip")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name_or_path = "smollm2-135m-instruct"  # local dir, .gguf, Hub id or built-in name
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"  # storage dtype of the frozen params (the base model)
  # Storage dtype of the trained params and their optimizer state. float32 keeps an f32 master
  # copy even when the base is stored / computed in bfloat16 (bf16 Adam moments lose updates).
  c.model.trainable_dtype = "float32"
  # Activation checkpointing of the layer body: none | full | dots | dots_no_batch | projections.
  # Keeping only the projections' (LoRA-included) outputs measured ~8% faster than keeping every
  # matmul output and ~25% faster than keeping everything on CPU: the rest is cheaper to
  # recompute than to stack per layer (docs/benchmarks.md).
  c.model.remat = "projections"
  # Attention kernel of the training forward pass, all with the packing segment mask: xla (any
  # backend; the reference) | cudnn (cuDNN flash attention, GPU) | splash (Pallas, TPU).
  c.model.attention = "xla"
  c.model.scan_unroll = 1  # layers per scan iteration; -1 unrolls all (slower compile; no faster here)
  # Shrink the loaded model for tests ("runlocal"): 0 keeps it as is.
  c.model.num_layers = 0

  # lora | ia3 | prompt | prefix | adapter | full; PEFT methods combine with "+", e.g.
  # "lora+prompt": both attached as named adapters ("lora", "prompt") and trained together.
  c.method = "lora"
  # Whole modules trained beside a lora / ia3 / adapter method and saved with it (HF PEFT's
  # modules_to_save): comma-separated names matched as suffixes of module names, e.g. "lm_head,norm".
  c.modules_to_save = ""

  c.lora = ml_collections.ConfigDict()  # LoRA, rsLoRA, DoRA, LoRA+
  c.lora.rank = 8
  c.lora.alpha = 8.0
  c.lora.dropout = 0.0
  c.lora.targets = "all-linear"  # regex over module names, or a comma-separated list of names
  c.lora.rslora = False
  c.lora.use_dora = False
  c.lora.init_a = "kaiming"  # kaiming | gaussian
  c.lora.loraplus_lr_ratio = 1.0  # LoRA+: lr(B) = ratio * lr(A); ~16 in the paper

  c.ia3 = ml_collections.ConfigDict()  # IA3; "" takes HF PEFT's defaults for the family
  c.ia3.targets = ""
  c.ia3.feedforward = ""

  c.prompt = ml_collections.ConfigDict()  # prompt tuning
  c.prompt.num_virtual_tokens = 20
  c.prompt.init = "RANDOM"  # RANDOM | SAMPLE_VOCAB | TEXT
  c.prompt.init_text = ""

  c.prefix = ml_collections.ConfigDict()  # prefix tuning
  c.prefix.num_virtual_tokens = 20
  c.prefix.projection = False
  c.prefix.encoder_hidden_size = 0  # 0: the kv width

  # A 4-bit frozen base (QLoRA with method lora): kernels quantised while loading, layer by
  # layer, in bitsandbytes' format; trained adapters stay f32. method="qlora" is method="lora"
  # with quant.type="nf4".
  c.quant = ml_collections.ConfigDict()
  c.quant.type = ""  # "" (none) | nf4 | fp4 (4-bit, bitsandbytes' format) | int8 (per channel)
  c.quant.block_size = 64  # 4-bit only
  c.quant.double_quant = True  # 4-bit only
  c.quant.skip = "lm_head"  # modules kept in float (the embedding table always is)

  c.adapter = ml_collections.ConfigDict()  # bottleneck adapter layers
  c.adapter.architecture = "houlsby"  # houlsby (after attention and MLP) | pfeiffer (after MLP)
  c.adapter.reduction_factor = 16
  c.adapter.non_linearity = "relu"
  c.adapter.targets = ""  # "": the architecture's places

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # JSONL path
  c.data.eval = ""
  c.data.format = "auto"  # auto | input_output | instruction | chat | text
  c.data.seq_len = 256
  c.data.pack = True
  c.data.length_policy = "truncate"
  c.data.system_prompt = ""
  # Key renaming before format detection, "source:ours" pairs, e.g. "question:input,answer:output".
  c.data.fields = ""
  c.data.generate = ""  # name of a built-in generated dataset written on first run ("quickstart")
  # `python -m ftjax.data check` (ftjax/data/check.py): what to do with invalid records, and leakage.
  c.data.check = ml_collections.ConfigDict()
  c.data.check.on_error = "fail"  # fail: stop, listing every problem | skip: drop bad records, count them
  c.data.check.drop_leaked = False  # drop train examples whose input (near-)duplicates an eval input
  c.data.check.near_dup = 0.4  # word 5-gram Jaccard at or above which two texts are near-duplicates

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8  # sequences per optimizer step (over all devices and micro-batches)
  c.train.grad_accum = 1
  c.train.lr = 2e-4
  c.train.schedule = "cosine"
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.max_grad_norm = 1.0
  c.train.seed = 0
  c.train.log_every = 10  # 0: only at the end
  # A step whose loss or gradient is NaN/inf never updates the state; "stop" ends the run
  # naming the step (the last checkpoint stays the latest), "skip" logs it and goes on.
  c.train.nonfinite = "stop"
  c.train.eval_every = 50  # 0: only at the end
  c.train.eval_batches = 0  # 0: the whole eval split
  c.train.checkpoint_every = 0  # 0: only at the end
  c.train.keep_checkpoints = 2
  # Positions of each row the vocab head + loss run on at a time (f32 logits never whole):
  # 0 = auto, on only where a micro-batch's logits would pass 512 MiB per device; -1 = never.
  c.train.vocab_chunk = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # Generation-based evaluation on the eval split at the end: base model (few-shot prompt) vs
  # fine-tuned model, greedy.
  c.eval = ml_collections.ConfigDict()
  c.eval.generate = False
  c.eval.scorer = "exact_match"  # exact_match | quickstart_json
  c.eval.few_shot = 3
  c.eval.max_examples = 100
  c.eval.max_new_tokens = 64
  c.eval.batch_size = 32

  c.export = ml_collections.ConfigDict()
  c.export.merged = False  # also write the merged HF model at the end of training
  c.export.adapter = True

  c.lock()
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises FtjaxError on impossible values or combinations, before anything is loaded."""
  def check(ok, msg):
    if not ok:
      raise FtjaxError(f"config: {msg}")

  parts = methods(c)
  check(all(m in METHODS for m in parts) and len(set(parts)) == len(parts)
        and ("full" not in parts or len(parts) == 1),
        f"method={c.method!r}; expected one of {METHODS}, or PEFT methods joined by '+'")
  for key in ("dtype", "param_dtype", "trainable_dtype"):
    check(c.model[key] in DTYPES, f"model.{key}={c.model[key]!r}; expected one of {tuple(DTYPES)}")
  check(c.model.remat in REMAT_POLICIES,
        f"model.remat={c.model.remat!r}; expected one of {tuple(REMAT_POLICIES)}")
  check(bool(c.model.name_or_path), "model.name_or_path is empty")
  check(c.model.attention in ATTENTION_BACKENDS,
        f"model.attention={c.model.attention!r}; expected one of {tuple(ATTENTION_BACKENDS)}")
  check(c.model.attention != "cudnn" or c.model.dtype == "bfloat16",
        f"model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN flash attention runs in "
        f"16 bits), not {c.model.dtype!r}")
  check(c.model.scan_unroll == -1 or c.model.scan_unroll >= 1,
        f"model.scan_unroll={c.model.scan_unroll}; expected -1 (all) or >= 1")
  check(c.lora.rank > 0, f"lora.rank={c.lora.rank}; must be > 0")
  check(0.0 <= c.lora.dropout < 1.0, f"lora.dropout={c.lora.dropout}; must be in [0, 1)")
  check(c.lora.init_a in ("kaiming", "gaussian"), f"lora.init_a={c.lora.init_a!r}")
  check(c.lora.loraplus_lr_ratio > 0, f"lora.loraplus_lr_ratio={c.lora.loraplus_lr_ratio}; must be > 0")
  check(c.quant.type in QUANT_TYPES, f"quant.type={c.quant.type!r}; expected one of {QUANT_TYPES}")
  check(not (quant_type(c) and "full" in parts),
        "a 4-bit base (quant.type / method=qlora) with method='full': quantised weights cannot "
        "be trained; use a PEFT method (lora: QLoRA) or a float base")
  check(c.quant.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096),
        f"quant.block_size={c.quant.block_size}; bitsandbytes' sizes are 32, 64, ..., 4096")
  check(any(m in ("lora", "qlora") for m in parts) or c.lora.loraplus_lr_ratio == 1.0,
        "lora.loraplus_lr_ratio (LoRA+) needs method='lora'")
  check(any(m in ("lora", "qlora", "ia3", "adapter") for m in parts) or not c.modules_to_save,
        f"modules_to_save goes with method lora, ia3 or adapter, not {c.method!r}")
  check(all(m in MERGEABLE for m in parts) or not c.export.merged,
        f"export.merged: a {c.method} adapter has no merged form; use one of {MERGEABLE} or keep "
        "export.merged=False (the adapter is exported alone)")
  check(bool(c.data.train) or bool(c.data.generate), "data.train is empty (give a JSONL path)")
  check(c.data.generate in ("", "quickstart"), f"data.generate={c.data.generate!r}; known: quickstart")
  check(c.data.seq_len >= 8, f"data.seq_len={c.data.seq_len}; must be >= 8")
  check(c.data.length_policy in LENGTH_POLICIES,
        f"data.length_policy={c.data.length_policy!r}; expected one of {LENGTH_POLICIES}")
  check(c.data.check.on_error in ON_ERROR_POLICIES,
        f"data.check.on_error={c.data.check.on_error!r}; expected one of {ON_ERROR_POLICIES}")
  check(0.0 < c.data.check.near_dup <= 1.0, f"data.check.near_dup={c.data.check.near_dup}; must be in (0, 1]")
  fields(c.data.fields)  # raises on a malformed mapping
  check(c.train.steps > 0, f"train.steps={c.train.steps}; must be > 0")
  check(c.train.grad_accum > 0, f"train.grad_accum={c.train.grad_accum}; must be > 0")
  check(c.train.batch_size % c.train.grad_accum == 0,
        f"train.batch_size={c.train.batch_size} is not divisible by train.grad_accum={c.train.grad_accum}")
  check(c.train.vocab_chunk >= -1, f"train.vocab_chunk={c.train.vocab_chunk}; expected -1 (never), "
        "0 (auto) or a chunk length")
  check(c.train.lr > 0, f"train.lr={c.train.lr}; must be > 0")
  check(c.train.schedule in SCHEDULES, f"train.schedule={c.train.schedule!r}; expected one of {SCHEDULES}")
  check(0 <= c.train.warmup_steps <= c.train.steps,
        f"train.warmup_steps={c.train.warmup_steps} must be within [0, train.steps={c.train.steps}]")
  check(c.train.log_every >= 0, f"train.log_every={c.train.log_every}; must be >= 0 (0: only at the end)")
  check(c.train.nonfinite in NONFINITE_POLICIES,
        f"train.nonfinite={c.train.nonfinite!r}; expected one of {NONFINITE_POLICIES}")
  check(c.eval.scorer in ("exact_match", "quickstart_json"), f"eval.scorer={c.eval.scorer!r}")
  check(not c.eval.generate or bool(c.data.eval) or bool(c.data.generate),
        "eval.generate needs data.eval")


def quant_type(c: ml_collections.ConfigDict) -> str:
  """The base's 4-bit type: quant.type, or nf4 for method qlora."""
  return c.quant.type or ("nf4" if "qlora" in methods(c) else "")


def methods(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """"lora+prompt" -> ("lora", "prompt")."""
  return tuple(m.strip() for m in c.method.split("+"))


def fields(text: str) -> dict | None:
  """"question:input,answer:output" -> {"question": "input", "answer": "output"}; "": None."""
  pairs = [p.split(":") for p in names(text)]
  if any(len(p) != 2 or not all(x.strip() for x in p) for p in pairs):
    raise FtjaxError(f"config: data.fields={text!r}; expected 'source:ours' pairs, e.g. "
                     "'question:input,answer:output'")
  return {a.strip(): b.strip() for a, b in pairs} or None


def names(text: str) -> tuple[str, ...]:
  """"a, b" -> ("a", "b")."""
  return tuple(x.strip() for x in text.split(",") if x.strip())


def targets(text: str):
  """"all-linear", a regex, or "q_proj,v_proj" (a list of names, matched as PEFT does); "": None."""
  if not text:
    return None
  if text == "all-linear" or "," not in text and any(ch in text for ch in "/.*[("):
    return text
  return names(text)
