"""The one config schema, and its validation.

Every file under configs/ starts from `base_config()` and changes values; the schema is locked,
so a typo (`--config.trian.lr=...`) is an error instead of a silently ignored key. `validate`
runs before anything loads or compiles.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ftjax.data.auto import AUTO_KEYS  # train.* keys that take "auto"
from ftjax.data.formats import parse_fields as fields
from ftjax.errors import FtjaxError
from ftjax.evaluation import harness, metrics as eval_metrics
from ftjax.models.ops import ATTENTION_BACKENDS, REMAT_POLICIES
from ftjax.tree import flat  # noqa: F401 (config.flat: a config by dotted key)

# PEFT methods (each with its block below) and full fine-tuning.
METHODS = ("lora", "qlora", "ia3", "prompt", "prefix", "adapter", "full")
MERGEABLE = ("lora", "qlora", "ia3", "full")  # adapters with a merged form (export.merged)
QUANT_TYPES = ("", "nf4", "fp4", "int8")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # log.trackers: what ftjax.metrics can write to
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LENGTH_POLICIES = ("truncate", "drop", "error")
NONFINITE_POLICIES = ("stop", "skip")
ON_ERROR_POLICIES = ("fail", "skip")
GENERATED = ("", "quickstart", "preference", "arithmetic")  # data.generate: ftjax/data/<name>_task.py


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name_or_path = "smollm2-135m-instruct"  # local dir, .gguf, Hub id or built-in name
  # Start from a previous run's adapter (its WORKDIR/adapter, or any HF PEFT adapter directory),
  # e.g. preference tuning after SFT. model.adapter_merge=False: its weights are where this run's
  # adapter starts (same method, rank and targets: training continues); True: it is folded into
  # the base weights first and this run trains a new adapter on top (not on a 4-bit base). "": off.
  c.model.adapter = ""
  c.model.adapter_merge = False  # fold model.adapter into the base first (above)
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

  # The training objective (ftjax/objectives): "sft" = supervised fine-tuning, the next-token loss
  # on the completion tokens of (instruction, response) pairs, chats or plain text. Objectives
  # with their own keys keep them in a block named after them.
  c.objective = "sft"

  # objective="classification": a linear `score` head on the last real token's hidden state
  # (transformers' *ForSequenceClassification; PEFT task_type SEQ_CLS), trained with the adapter.
  # Data: {"input" or "text", "label"} records (data.fields renames keys); docs/methods.md.
  c.classification = ml_collections.ConfigDict()
  # Class names in id order: "" = the sorted distinct labels of data.train (stored with the
  # export's id2label), "a,b,c", or a file with one name a line. Fix them for ids stable across runs.
  c.classification.labels = ""
  # single_label: one label a text, softmax cross-entropy | multi_label: "label" a list (or a
  # comma-separated string), one sigmoid binary cross-entropy per class.
  c.classification.problem_type = "single_label"
  # One weight per class in id order, e.g. "1,4,1" ("": none): scales each class's loss, as
  # torch's CrossEntropyLoss(weight=) / BCEWithLogitsLoss(weight=).
  c.classification.class_weights = ""
  # none: the text tokenised as it is | chat: as one user turn of the chat template, with the
  # generation prompt. No EOS is appended either way (pooling takes the last real token).
  c.classification.template = "none"

  # lora | ia3 | prompt | prefix | adapter | full; PEFT methods combine with "+", e.g.
  # "lora+prompt": both attached as named adapters ("lora", "prompt") and trained together.
  c.method = "lora"
  # Whole modules trained beside a lora / ia3 / adapter method and saved with it (HF PEFT's
  # modules_to_save): comma-separated names matched as suffixes of module names, e.g. "lm_head,norm".
  c.modules_to_save = ""

  c.lora = ml_collections.ConfigDict()  # LoRA, rsLoRA, DoRA, LoRA+
  c.lora.rank = 8  # r: the inner width of the low-rank update B @ A
  c.lora.alpha = 8.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
  c.lora.dropout = 0.0  # dropout on the LoRA branch's input while training
  c.lora.targets = "all-linear"  # regex over module names, or a comma-separated list of names
  # Weights adapted directly (HF PEFT's target_parameters), comma-separated: the MoE experts'
  # "experts.gate_up_proj" (gate and up, one A per expert) and "experts.down_proj", the router's
  # "gate.weight"; each expert gets its own A / B at lora.rank. "": none beyond lora.targets.
  # On Mixtral / Qwen3-MoE lora.targets acts as in HF PEFT 0.21 on transformers 5: "all-linear"
  # also adapts the experts and the router, and the transformers 4 names w1,w3,w2 (qwen3_moe:
  # gate_proj,up_proj,down_proj) and gate adapt the experts / router (w1 + w3 fused: rank
  # 2 * rank, alpha 2 * alpha).
  c.lora.target_parameters = ""
  c.lora.rslora = False  # rsLoRA: scale alpha / sqrt(rank), steadier at large ranks
  c.lora.use_dora = False  # DoRA: also train a magnitude per output feature
  c.lora.init_a = "kaiming"  # kaiming | gaussian
  # LoRA+: lr(B) = ratio * lr(A); ~16 in the paper. As PEFT's loraplus, every trained vector
  # (DoRA magnitude, bias, norm scale) is in B's group too; ftjax has no LoRA on embeddings.
  c.lora.loraplus_lr_ratio = 1.0

  c.ia3 = ml_collections.ConfigDict()  # IA3; "" takes HF PEFT's defaults for the family
  c.ia3.targets = ""  # modules whose outputs are scaled (k, v and the FFN in PEFT's defaults)
  c.ia3.feedforward = ""  # those of ia3.targets scaled at their input (the FFN down projection)

  c.prompt = ml_collections.ConfigDict()  # prompt tuning
  c.prompt.num_virtual_tokens = 20  # trained embeddings put before every sequence
  c.prompt.init = "RANDOM"  # RANDOM | SAMPLE_VOCAB | TEXT
  c.prompt.init_text = ""  # with init TEXT: the text whose token embeddings start the prompt

  c.prefix = ml_collections.ConfigDict()  # prefix tuning
  c.prefix.num_virtual_tokens = 20  # trained key/value positions per layer
  c.prefix.projection = False  # reparametrise through a 2-layer MLP while training (folded at save)
  c.prefix.encoder_hidden_size = 0  # hidden width of that MLP; 0: the kv width

  # A 4-bit frozen base (QLoRA with method lora): kernels quantised while loading, layer by
  # layer, in bitsandbytes' format; trained adapters stay f32. method="qlora" is method="lora"
  # with quant.type="nf4".
  c.quant = ml_collections.ConfigDict()
  c.quant.type = ""  # "" (none) | nf4 | fp4 (4-bit, bitsandbytes' format) | int8 (per channel)
  c.quant.block_size = 64  # weights per absmax scale (4-bit only)
  c.quant.double_quant = True  # 8-bit codes for the absmax scales too (4-bit only)
  c.quant.skip = "lm_head"  # modules kept in float (the embedding table always is)

  c.adapter = ml_collections.ConfigDict()  # bottleneck adapter layers
  c.adapter.architecture = "houlsby"  # houlsby (after attention and MLP) | pfeiffer (after MLP)
  c.adapter.reduction_factor = 16  # bottleneck width = hidden size / this
  c.adapter.non_linearity = "relu"  # activation inside the bottleneck
  c.adapter.targets = ""  # modules the adapters follow; "": the architecture's places

  c.data = ml_collections.ConfigDict()
  # Train data: a file (.jsonl, .json, .txt, .parquet, .csv, .tsv, .arrow) or a folder of them;
  # also save_to_disk folders (DIR?split=test), Hub datasets (hub:NAME?config=C&split=S&revision=R)
  # and several sources joined by commas.
  c.data.train = ""
  c.data.eval = ""  # eval data, the same forms as data.train ("": none, or data.eval_fraction)
  c.data.format = "auto"  # auto | input_output | instruction | chat | text
  c.data.seq_len = 256  # tokens per packed row (a longer example follows data.length_policy)
  c.data.pack = True  # several examples per row, each attending only to itself
  c.data.length_policy = "truncate"  # an example over data.seq_len: cut, dropped, or an error
  c.data.system_prompt = ""  # a system turn put before every example that has none
  # Key renaming before format detection, "source:ours" pairs, e.g. "question:input,answer:output".
  c.data.fields = ""
  # Train data split into this many shards (example i -> shard i % shards), each packed and
  # shuffled on its own; each process reads and tokenises only its shards. 0: one per process.
  # A single process with data.shards=N sees the batches N processes would.
  c.data.shards = 0
  # name of a built-in generated dataset written on first run: "quickstart" (SFT), "preference"
  # (its preference pairs, ftjax/data/preference_task.py)
  c.data.generate = ""
  # auto (the tokenizer's own; conversations without one are an error) | chatml | plain | a .jinja file
  c.data.chat_template = "auto"
  c.data.mix = ""  # one weight per data.train source, e.g. "3,1": drawn in that proportion
  c.data.eval_fraction = 0.0  # without data.eval: hold out this fraction of the train records
  c.data.eval_seed = 0  # which records are held out (and the order of a mix)
  # `python -m ftjax.data check` (ftjax/data/selection.py): what to do with invalid records, and leakage.
  c.data.check = ml_collections.ConfigDict()
  c.data.check.on_error = "fail"  # fail: stop, listing every problem | skip: drop bad records, count them
  c.data.check.drop_leaked = False  # drop train examples whose input (near-)duplicates an eval input
  c.data.check.near_dup = 0.4  # near duplicates: character 5-gram Jaccard >= this, boilerplate excluded

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100  # optimizer steps (unless train.epochs is set)
  # train.epochs: passes over the train rows instead of train.steps (0: train.steps decides);
  # epochs, batch_size and lr also take "auto": chosen from the data size and the method, by
  # the rule in ftjax/data/auto.py, printed and written to WORKDIR/auto.json. Typed `object`
  # so a flag can say "auto" or 3. epochs "auto" with an eval split: train until the eval
  # (eval.primary) stops improving, within a ceiling of 2 x the fixed rule's epochs (at most
  # 25), keeping the best state; it lowers train.eval_every to half an epoch and sets
  # train.patience 2 when 0.
  c.train.epochs = _number_or_auto(0)
  c.train.batch_size = _number_or_auto(8)  # sequences per optimizer step (all devices and micro-batches)
  c.train.grad_accum = 1  # micro-batches per step: batch_size / grad_accum sequences at a time
  # Peak learning rate (AdamW). "auto": measured before training by the learning-rate probe
  # (ftjax/lr_probe.py: 5 rates over two orders of magnitude for the method, a few steps each
  # from the same start, scored on held-out train rows; its steps are at most 20% of the run's,
  # else it is skipped, needing >= 100 steps), falling back to the method's usual rate.
  c.train.lr = _number_or_auto(2e-4)
  c.train.schedule = "cosine"  # decay after the linear warmup
  c.train.warmup_steps = 10  # linear warmup from 0 to train.lr
  # AdamW decoupled weight decay, on matrices only (LoRA A/B, bottleneck and prompt/prefix
  # tables, base kernels): never on vectors (biases, norm scales, IA3 scales, DoRA magnitudes).
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9  # AdamW beta1
  c.train.b2 = 0.999  # AdamW beta2
  c.train.eps = 1e-8  # AdamW epsilon
  c.train.max_grad_norm = 1.0  # clip the global gradient norm to this (0: no clipping)
  c.train.seed = 0  # adapter init, dropout and the data order
  c.train.log_every = 10  # steps between metric lines; 0: only at the end
  # A step whose loss or gradient is NaN/inf never updates the state; "stop" ends the run
  # naming the step (the last checkpoint stays the latest), "skip" logs it and goes on.
  c.train.nonfinite = "stop"
  c.train.eval_every = 50  # steps between periodic evals; 0: only at the end
  c.train.eval_batches = 0  # batches of the eval loss; 0: the whole eval split
  # Early stopping: stop after this many periodic evals without improvement of eval.primary
  # (0: never). With keep_best, the best eval's state is checkpointed (WORKDIR/best) and the
  # exports and final evaluation come from it.
  c.train.patience = 0
  c.train.keep_best = True  # with train.eval_every: keep the best eval's state (above)
  c.train.checkpoint_every = 0  # steps; 0: by time only (below) and at the end
  # Also checkpoint when this many minutes passed since the last save (0: off). SIGTERM / SIGINT
  # always checkpoint the finished step before exiting (ftjax/preemption.py).
  c.train.checkpoint_every_minutes = 30.0
  c.train.keep_checkpoints = 2  # the newest checkpoints kept in WORKDIR
  # Positions of each row the vocab head + loss run on at a time (f32 logits never whole):
  # 0 = auto, on only where a micro-batch's logits would pass 512 MiB per device; -1 = never.
  c.train.vocab_chunk = 0

  # Device mesh axes (ftjax/parallel/sharding.py): the batch is split over data and fsdp, the
  # params over fsdp and tensor; one size may be -1, all the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel replicas
  c.mesh.fsdp = 1  # params and optimizer state sharded over this axis too (ZeRO-3 / FSDP)
  c.mesh.tensor = 1  # tensor (model) parallelism inside each layer

  # Several processes (hosts) on JAX's own runtime (ftjax/parallel/distributed.py). "auto" joins
  # them when a coordinator is set here or a launcher is found (SLURM, Open MPI, a multi-host TPU
  # slice, JAX_COORDINATOR_ADDRESS); "on" always calls jax.distributed.initialize() (JAX detects
  # the rest); "off" never.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # auto | on | off (above)
  c.distributed.coordinator = ""  # host:port of process 0, e.g. "10.0.0.1:1234"
  c.distributed.num_processes = 0  # with a coordinator; 0: found by jax.distributed
  c.distributed.process_id = -1  # this process, with a coordinator; -1: found by jax.distributed

  # Evaluation (ftjax/evaluation): metrics fixed before training and written into config.json;
  # with eval.generate, greedy answers on the eval split from the base model with prompting
  # (zero-shot, k-shot, your template) and from the fine-tuned model, a bootstrap CI of each
  # difference and the verdict; forgetting on a general text; report.md / report.json / PNGs.
  c.eval = ml_collections.ConfigDict()
  c.eval.generate = False  # baselines, fine-tuned answers, verdict and report (needs data.eval)
  # Comma-separated: loss, perplexity, token_accuracy (teacher-forced), exact_match, json_valid,
  # field_accuracy, label_accuracy, macro_f1, rouge_l, token_f1 (generated), or
  # "pkg.module:function" (prediction, reference) -> float. A custom metric imports and runs that
  # module's code, as a Python config file does: use only configs you trust. Functions of system
  # modules (os, sys, subprocess, shutil, builtins...) and non-functions are refused.
  c.eval.metrics = "exact_match"
  # Decides early stopping and the verdict. "": the first of eval.metrics this run computes
  # (generation metrics only with eval.generate), else loss; a metric passed over is logged.
  c.eval.primary = ""
  c.eval.normalize = "strip"  # exact_match: any of strip, lower, whitespace, punctuation
  c.eval.fields = ""  # field_accuracy: keys compared ("": every key of the reference object)
  c.eval.zero_shot = True  # baseline: the base model with the bare prompt
  c.eval.few_shot = 3  # baseline: k solved examples from train before the prompt (0: none)
  c.eval.few_shot_pool = ""  # "": data.train; never the eval set (overlap is refused)
  c.eval.prompt_template = ""  # baseline: your prompt, "{input}" standing for the user turn
  c.eval.max_examples = 100  # eval examples answered by each model
  c.eval.max_new_tokens = 64  # answer length limit (greedy decoding)
  # Prompts decoded together; 0: all of them, in the fewest batches memory allows (a batch costs
  # a compile and a decode loop as long as its longest answer; ftjax/generate.py rows_per_batch).
  c.eval.batch_size = 0
  c.eval.periodic_examples = 32  # examples generated at each train.eval_every for the primary metric
  c.eval.bootstrap = 1000  # paired bootstrap resamples for the 95% CIs
  c.eval.forgetting = True  # general-text perplexity + general prompts, base vs fine-tuned
  c.eval.forgetting_text = ""  # a .txt file; "": the built-in public-domain sample
  c.eval.forgetting_tokens = 4096  # tokens of the general text the perplexity is measured on
  c.eval.forgetting_threshold = 0.1  # flag a relative perplexity increase above this
  c.eval.report = True  # report.md / report.json / PNGs in the workdir at the end
  # lm-evaluation-harness tasks scored after training on the base and the fine-tuned model (the
  # report's forgetting section; needs pip install 'ftjax[lm_eval]'), comma-separated: a task
  # name lm_eval knows (its dataset comes from the Hugging Face Hub or its cache), or the path of
  # a task YAML file or a folder of them (a YAML over local data files runs offline: see
  # ftjax/evaluation/harness.py). Checked before training. "": off.
  c.eval.lm_eval_tasks = ""
  c.eval.lm_eval_limit = 0  # examples per lm_eval task (0: all of them)

  # The cost plan (ftjax/cost_plan.py, the probe in ftjax/cost.py) of `python -m ftjax.data check`; default prices and their
  # dates in docs/data.md ("What a run will cost").
  c.cost = ml_collections.ConfigDict()
  c.cost.probe_steps = 3  # train steps timed after the compile and a warm-up; 0: no probe (no model load)
  c.cost.mfu = 0.35  # assumed model FLOPs utilisation on the named accelerators
  c.cost.api_usd_per_million_tokens = 25.0  # hosted fine-tuning of a GPT-4o-class model
  # On-demand price per accelerator (per chip for TPUs) and hour, for the cost plan.
  c.cost.usd_per_hour = ml_collections.ConfigDict(dict(A100=2.0, H100=3.0, L4=0.7, v5e=1.2))

  # Where metrics go besides WORKDIR/metrics.jsonl. Each tracker gets the resolved config as
  # run parameters, every logged metric, and at the end the report files as artifacts.
  c.log = ml_collections.ConfigDict()
  # Comma-separated: tensorboard (WORKDIR/tensorboard), wandb, mlflow; the last two need
  # `pip install ftjax[trackers]`. Offline: WANDB_MODE=offline; MLflow writes the file store
  # WORKDIR/mlruns unless MLFLOW_TRACKING_URI is set.
  c.log.trackers = "tensorboard"
  c.log.project = "ftjax"  # W&B project / MLflow experiment name
  c.log.run_name = ""  # W&B / MLflow run name; "": the workdir's folder name

  c.export = ml_collections.ConfigDict()
  c.export.merged = False  # also write the merged HF model at the end of training
  c.export.adapter = True  # write the adapter alone (HF PEFT format) to WORKDIR/adapter at the end

  # Preference tuning (docs/methods.md): each objective reads its own block, with TRL's names and
  # defaults; a config that changes another objective's block is refused, naming the keys.
  # Data: {"prompt", "chosen", "rejected"} pairs (strings, message lists, or whole conversations
  # sharing the prompt), KTO {"prompt", "completion", "label"}; see ftjax/data/preference.py.
  c.dpo = ml_collections.ConfigDict()  # objective = "dpo" (TRL DPOTrainer)
  c.dpo.beta = 0.1  # the reward of a reply is beta * (policy - reference) log-probability
  c.dpo.loss_type = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust
  c.dpo.label_smoothing = 0.0  # loss_type robust: the assumed share of flipped pairs, in [0, 0.5)
  # > 0: adds rpo_alpha * the chosen replies' NLL per token (RPO; TRL's loss_type
  # ["sigmoid", "sft"] with loss_weights [1, rpo_alpha]); 0: off.
  c.dpo.rpo_alpha = 0.0
  # Reference log-probs computed once before training instead of in every step. Full
  # fine-tuning always does (the reference is the starting model, which training changes);
  # under PEFT the reference is the model with its adapters disabled, no copy either way.
  c.dpo.precompute_ref_logps = False

  c.orpo = ml_collections.ConfigDict()  # objective = "orpo" (TRL ORPOTrainer): no reference model
  c.orpo.beta = 0.1  # weight of the odds-ratio term beside the chosen replies' NLL (lambda)

  c.simpo = ml_collections.ConfigDict()  # objective = "simpo" (TRL CPOTrainer, loss_type simpo)
  c.simpo.beta = 0.1  # scale of the length-normalised log-prob margin (the paper uses 2.0-2.5)
  c.simpo.gamma = 0.5  # target reward margin (TRL's simpo_gamma)
  c.simpo.label_smoothing = 0.0  # conservative loss: the assumed share of flipped pairs
  # + cpo_alpha * the chosen replies' NLL per token. 0: SimPO proper (TRL's default 1.0 is
  # CPO-SimPO; TRL's docs set 0 for SimPO).
  c.simpo.cpo_alpha = 0.0

  c.kto = ml_collections.ConfigDict()  # objective = "kto" (TRL KTOTrainer): unpaired, labelled data
  c.kto.beta = 0.1  # reward scale, as dpo.beta
  c.kto.desirable_weight = 1.0  # loss weight of desirable (label true) examples
  c.kto.undesirable_weight = 1.0  # loss weight of undesirable (label false) examples
  c.kto.precompute_ref_logps = False  # as dpo.precompute_ref_logps

  # GRPO (docs/methods.md): RL from verifiable rewards, TRL GRPOTrainer's names and defaults.
  # Data: {"prompt": str | messages, ...other columns} (the columns go to the reward functions).
  # train.batch_size counts completions: batch_size / num_generations prompts per step.
  c.grpo = ml_collections.ConfigDict()  # objective = "grpo"
  c.grpo.num_generations = 8  # completions sampled per prompt (G); divides train.batch_size
  # Tokens sampled per completion at most (TRL's max_completion_length); a prompt gets
  # data.seq_len - max_new_tokens tokens.
  c.grpo.max_new_tokens = 256
  c.grpo.temperature = 1.0  # sampling temperature of the rollouts (the loss's logits use it too)
  c.grpo.top_p = 1.0  # nucleus sampling mass of the rollouts (1: all tokens)
  c.grpo.top_k = 0  # sample among the k most likely tokens (0: all)
  # grpo (mean per completion) | bnpo (mean per token) | dapo (per token over the window) |
  # dr_grpo (per completion x max_new_tokens: no length bias)
  c.grpo.loss_type = "dapo"
  c.grpo.epsilon = 0.2  # clip the probability ratio below at 1 - epsilon
  c.grpo.epsilon_high = 0.0  # ... and above at 1 + epsilon_high (0: the same as epsilon)
  # KL-to-reference weight (k3 estimator); the reference is the model with its adapters
  # disabled (under method=full not available yet: keep 0)
  c.grpo.beta = 0.0
  c.grpo.num_iterations = 1  # updates per batch of rollouts (> 1: the sampling log-probs are kept)
  c.grpo.scale_rewards = "group"  # advantage divided by the group's std | batch | none (Dr. GRPO)
  # Completions cut at max_new_tokens without a stop token train nothing (DAPO's overlong filter)
  c.grpo.mask_truncated_completions = False
  # Comma-separated reward functions: built in exact_answer, answer_format, json_valid,
  # length_penalty, or "pkg.module:fn" with TRL's signature fn(prompts, completions, **columns)
  # -> list[float | None]
  c.grpo.reward_funcs = ""
  c.grpo.reward_weights = ""  # comma-separated weights, one per reward function ("": all 1)

  c.lock()
  return c


def _trackers_ok(spec) -> bool:
  return all(n.strip() in TRACKERS for n in str(spec).split(",") if n.strip())


def _number_or_auto(value):
  return ml_collections.FieldReference(value, field_type=object)




def unresolved(c: ml_collections.ConfigDict) -> list[str]:
  """The train.* keys still "auto" (ftjax.data.auto.resolve fills them from the data)."""
  return [f"train.{k}" for k in AUTO_KEYS if c.train[k] == "auto"]


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
  check(not c.model.adapter or c.model.adapter_merge or c.method not in ("full", ""),
        "model.adapter continues a PEFT adapter, and method='full' trains none: set "
        "model.adapter_merge=True to fold it into the base weights first")
  check(not (c.model.adapter and c.model.adapter_merge and c.method.startswith("qlora")),
        "model.adapter_merge=True folds the adapter into the base weights, which method='qlora' "
        "keeps in 4 bits: merge it into a float export first (python -m ftjax.export)")
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
  check(c.data.generate in GENERATED, f"data.generate={c.data.generate!r}; known: "
        f"{', '.join(g for g in GENERATED if g)}")
  check(c.data.seq_len >= 8, f"data.seq_len={c.data.seq_len}; must be >= 8")
  check(c.data.length_policy in LENGTH_POLICIES,
        f"data.length_policy={c.data.length_policy!r}; expected one of {LENGTH_POLICIES}")
  check(c.data.check.on_error in ON_ERROR_POLICIES,
        f"data.check.on_error={c.data.check.on_error!r}; expected one of {ON_ERROR_POLICIES}")
  check(0.0 < c.data.check.near_dup <= 1.0, f"data.check.near_dup={c.data.check.near_dup}; must be in (0, 1]")
  fields(c.data.fields)  # raises on a malformed mapping
  check(c.data.chat_template in ("auto", "chatml", "plain") or c.data.chat_template.endswith(".jinja"),
        f"data.chat_template={c.data.chat_template!r}; expected auto, chatml, plain or a .jinja file")
  check(0.0 <= c.data.eval_fraction < 1.0, f"data.eval_fraction={c.data.eval_fraction}; must be in [0, 1)")
  try:
    weights = [float(w) for w in c.data.mix.split(",")] if c.data.mix else []
  except ValueError:
    weights = [-1.0]
  check(all(w >= 0 for w in weights) and (not weights or sum(weights) > 0),
        f"data.mix={c.data.mix!r}; expected one non-negative weight per train source, e.g. '3,1'")
  check(c.cost.probe_steps >= 0, f"cost.probe_steps={c.cost.probe_steps}; must be >= 0 (0: no probe)")
  check(0.0 < c.cost.mfu <= 1.0, f"cost.mfu={c.cost.mfu}; must be in (0, 1]")
  check(c.train.steps > 0, f"train.steps={c.train.steps}; must be > 0")
  check(c.train.grad_accum > 0, f"train.grad_accum={c.train.grad_accum}; must be > 0")
  for key, kind in (("epochs", (int, float)), ("batch_size", int), ("lr", (int, float))):
    value = c.train[key]
    check(value == "auto" or isinstance(value, kind) and not isinstance(value, bool)
          and (value > 0 or key == "epochs" and value == 0),
          f"train.{key}={value!r}; expected 'auto' or a number > 0"
          + (" (0: train.steps decides)" if key == "epochs" else ""))
  check(c.train.batch_size == "auto" or c.train.batch_size % c.train.grad_accum == 0,
        f"train.batch_size={c.train.batch_size} is not divisible by train.grad_accum={c.train.grad_accum}")
  check(c.train.vocab_chunk >= -1, f"train.vocab_chunk={c.train.vocab_chunk}; expected -1 (never), "
        "0 (auto) or a chunk length")
  check(c.train.schedule in SCHEDULES, f"train.schedule={c.train.schedule!r}; expected one of {SCHEDULES}")
  check(bool(c.train.epochs) or 0 <= c.train.warmup_steps <= c.train.steps,
        f"train.warmup_steps={c.train.warmup_steps} must be within [0, train.steps={c.train.steps}]")
  check(_trackers_ok(c.log.trackers), f"log.trackers={c.log.trackers!r}; expected a comma-separated "
        "list of tensorboard, wandb, mlflow")
  check(c.train.log_every >= 0, f"train.log_every={c.train.log_every}; must be >= 0 (0: only at the end)")
  check(c.train.nonfinite in NONFINITE_POLICIES,
        f"train.nonfinite={c.train.nonfinite!r}; expected one of {NONFINITE_POLICIES}")
  check(c.data.shards >= 0, f"data.shards={c.data.shards}; must be >= 0 (0: one per process)")
  check(c.train.checkpoint_every >= 0 and c.train.checkpoint_every_minutes >= 0,
        f"train.checkpoint_every={c.train.checkpoint_every}, train.checkpoint_every_minutes="
        f"{c.train.checkpoint_every_minutes}; must be >= 0 (0: off)")
  # 0 would let orbax delete every checkpoint, the final one too: nothing to export or resume.
  check(isinstance(c.train.keep_checkpoints, int) and c.train.keep_checkpoints >= 1,
        f"train.keep_checkpoints={c.train.keep_checkpoints!r}; must be an integer >= 1")
  check(c.distributed.initialize in ("auto", "on", "off"),
        f"distributed.initialize={c.distributed.initialize!r}; expected auto, on or off")
  _validate_eval(c, check)


def _validate_eval(c: ml_collections.ConfigDict, check) -> None:
  """validate()'s checks of eval.* and early stopping."""
  eval_metrics.validate(c.eval)
  harness.validate(c.eval)  # the lm_eval tasks: installed, found, parsed
  check(c.train.patience >= 0, f"train.patience={c.train.patience}; must be >= 0 (0: no early stopping)")
  check(not c.train.patience or c.train.eval_every > 0,
        "train.patience (early stopping) needs train.eval_every > 0")
  check(c.eval.few_shot >= 0 and c.eval.max_examples > 0 and c.eval.bootstrap > 0
        and c.eval.periodic_examples > 0 and c.eval.forgetting_threshold >= 0,
        "eval.few_shot and eval.forgetting_threshold must be >= 0; eval.max_examples, "
        "eval.periodic_examples and eval.bootstrap > 0")
  check(not c.eval.generate or bool(c.data.eval) or bool(c.data.generate),
        "eval.generate needs data.eval")


def quant_type(c: ml_collections.ConfigDict) -> str:
  """The base's 4-bit type: quant.type, or nf4 for method qlora."""
  return c.quant.type or ("nf4" if "qlora" in methods(c) else "")


def methods(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """"lora+prompt" -> ("lora", "prompt")."""
  return tuple(m.strip() for m in c.method.split("+"))


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


if __name__ == "__main__":  # `python -m ftjax.config --reference`: docs/configuration.md
  # The reference is another program (ftjax.config_reference, which reads this module): run it
  # as `python -m ftjax.config_reference` would be, rather than importing it into the schema.
  import runpy
  runpy.run_module("ftjax.config_reference", run_name="__main__", alter_sys=True)
