"""GGUF export: tiny random-init models of each family, adapter folded in, written by
ftjax.models.save_gguf and read back by transformers' GGUF loader and by ftjax's."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from tiny import tiny_tokenizer
from ftjax import models, peft
from ftjax.errors import FtjaxError
from ftjax.models import save_gguf
from ftjax.peft import merged_model
from ftjax.models.gguf import load_gguf
from ftjax.models.params import param_specs
from ftjax.tree import get_path, set_path
from ftjax.tokenizer import load_tokenizer, read_gguf_metadata

Q = gguf.GGMLQuantizationType
IDS = np.array([[3, 17, 99, 4, 56, 21, 8, 120, 77, 300, 64, 30]])
TYPES = ("f32", "f16", "q8_0", "q4_0")

# Relative max-abs logit error of both readers against the model rebuilt from the gguf package's
# round trip of the same tensors (so only float summation order differs): measured <= 3e-6.
READ_BACK_TOL = 1e-4
# Against the merged float model itself, the type's own rounding (measured on these models:
# f32 0, f16 ~4e-4, q8_0 ~1e-2, q4_0 ~0.15; the MoE ones f16 5e-4, q8_0 1.2-1.6e-2, q4_0
# 0.15-0.19); bounds that a wrong tensor would blow through.
ROUNDING_TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2, "q4_0": 0.4}


def _family_config(family):
  config = {**hf_models.FAMILIES, **hf_models.MOE_FAMILIES}[family]()
  config.vocab_size = 512  # room for the tiny tokenizer's ~400 tokens, the rest [PAD] rows
  if family == "qwen3":
    # transformers' GGUF loader ignores qwen3.attention.key_length (its qwen3 table has no
    # entry) and keeps Qwen3Config's default head_dim, 128 (what real Qwen3 models use).
    config.head_dim = 128
  if family == "mistral":
    config.sliding_window = None  # a GGUF file has no sliding window: llama.cpp attends to all
  if family == "gemma2":
    # llama.cpp derives query_pre_attn_scalar from the model size (head_dim here) and GGUF has
    # no key for it: save_gguf refuses the FAMILIES value, 24 (test_gemma_query_scalar_refused)
    config.query_pre_attn_scalar = config.head_dim
  if family == "qwen3_moe":
    # llama.cpp always re-normalises the top-k router weights: save_gguf refuses the
    # MOE_FAMILIES value, False (test_qwen3_moe_without_norm_topk_prob_is_refused). And
    # transformers' GGUF reader has no mapping for qwen3moe.expert_feed_forward_length: it keeps
    # Qwen3MoeConfig's moe_intermediate_size, 768 (Qwen3-30B-A3B's), so the experts are that wide.
    config.norm_topk_prob = True
    config.moe_intermediate_size = 768
  return config


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer()


def _hf_folder(folder: str, family: str, tokenizer) -> str:
  """A random-init HF model (norms and biases randomised so they matter) + tokenizer folder;
  loading it is ~30x faster than initialising a ftjax model on the 8 test CPU devices."""
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(_family_config(family), dtype=torch.float32)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      if hf.config.model_type == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
        p.mul_(8.0)  # as hf_models.build: scores of order 1, where the soft-cap bends them
      if family in hf_models.MOE_FAMILIES and name.endswith("mlp.gate.weight"):
        p.mul_(50.0)  # as hf_models.build_moe: routers that really pick different experts
  hf.save_pretrained(folder)
  tokenizer.save(folder)
  return folder


# transformers' GGUF reader (5.x) maps none of gemma2 / gemma3 / phi3's soft-caps, window, layer
# pattern or partial rotary into the config (it keeps the configs' defaults: soft-caps 50 / 30,
# query_pre_attn_scalar 256, phi3's full rotary; measured: its logits of these f32 files are
# 0.57 / 0.65 / 0.34 relative max-abs from the HF model's), so it cannot check them: for them the
# tensors and keys are checked as the `gguf` package reads the bytes (test_new_families_as_
# the_gguf_package_reads_them) and the logits through ftjax's loader only.
# Mixtral neither: transformers' GGUF reader reads a "llama" file as LlamaForCausalLM whatever
# llama.expert_count says, drops the expert tensors and initialises dense MLPs at random
# (measured: 0.13 relative max-abs from the file's logits); its qwen3moe reader works.
HF_GGUF_READER = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
NEW_FAMILIES = ("gemma2", "gemma3", "phi3")
MOE = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "gemma", *NEW_FAMILIES, *MOE])
def exported(request, tmp_path_factory, tokenizer):
  """One family: a ftjax model with a LoRA adapter (random B, so the merge matters), its
  merged twin's logits, and the model exported as every type."""
  family = request.param
  folder = _hf_folder(str(tmp_path_factory.mktemp(f"gguf_{family}")), family, tokenizer)
  model, _ = models.load(folder)
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
  rng = np.random.RandomState(1)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, peft.LoraParam) and path[-1] == "lora_b":
      var.value = jnp.asarray(0.05 * rng.randn(*var.value.shape), var.value.dtype)
  merged = merged_model(model)
  adapted = _logits(model)
  files = {t: save_gguf(model, os.path.join(folder, f"model-{t}.gguf"), tokenizer, type=t)
           for t in TYPES}
  return dict(family=family, folder=folder, merged=merged, adapted=adapted, files=files,
              merged_logits=_logits(merged),
              tokenizer=tokenizer)


_forward = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)


def _logits(model) -> np.ndarray:
  """Jitted (one compile per config): eager forwards took ~2 s each on the CI machine."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(IDS)))


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _round_trip(w_hf: np.ndarray, qtype) -> np.ndarray:
  """What the gguf package's dequantisation gives back for a tensor of HF layout stored as
  `qtype` (1-D tensors and rows not filling whole blocks as save_gguf stores them)."""
  if w_hf.ndim < 2 or qtype == Q.F32:
    return w_hf
  if qtype == Q.F16 or w_hf.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
    return w_hf.astype(np.float16).astype(np.float32)
  return gguf.quants.dequantize(gguf.quants.quantize(w_hf, qtype), qtype)


def _rounded_model(merged, qtype):
  """The merged model with every tensor replaced by its round trip through `qtype`: the
  reference the exported file must reproduce. Rounding runs along HF's rows (input features),
  which llama.cpp's q/k row permutation only reorders, so it is done here without it. A MoE
  router stays F32 (as convert_hf_to_gguf keeps it); an expert kernel [e, in, out] rounds as
  the [e, out, in] GGUF tensor it is stored as."""
  cfg = merged.config
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
  out = {}
  for spec in param_specs(cfg):
    w = np.array(get_path(params, spec.path), np.float32)
    layers = [w[i] for i in range(w.shape[0])] if spec.stacked else [w]
    t = Q.F32 if cfg.is_moe and spec.path.endswith("/gate/kernel") else qtype
    rounded = [(np.swapaxes(_round_trip(np.swapaxes(x, -1, -2), t), -1, -2) if spec.transpose
                else _round_trip(x, t)) for x in layers]
    set_path(out, spec.path, np.stack(rounded) if spec.stacked else rounded[0])
  return models.from_params(cfg, out)


_NEW_FAMILY_FIELDS = (
    "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar", "sliding_window",
    "layer_types", "rope_theta", "rope_local_theta", "rope_scaling", "head_dim",
    "partial_rotary_factor", "fused_projections", "sandwich_norms", "qk_norm", "norm_offset")
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "norm_topk_prob", "intermediate_size",
               "head_dim", "qk_norm", "rope_theta", "tie_word_embeddings")


@pytest.mark.parametrize("type_name", TYPES)
def test_export_loads_in_transformers_and_ftjax(exported, type_name):
  info = exported["files"][type_name]
  qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type_name]
  stored = {t.name: t.tensor_type for t in gguf.GGUFReader(info["path"]).tensors}
  moe = exported["family"] in MOE
  assert stored["blk.0.ffn_down_exps.weight" if moe else "blk.0.ffn_down.weight"] == qtype
  assert stored["output_norm.weight"] == Q.F32
  if moe:  # the router is F32 in every type (convert_hf_to_gguf's rule)
    assert stored["blk.0.ffn_gate_inp.weight"] == Q.F32
  merged = exported["merged"]
  reference = _logits(_rounded_model(merged, qtype))
  cfg, params = load_gguf(info["path"])
  assert cfg.model_type == {"mistral": "llama", "gemma3": "gemma3_text"}.get(
      exported["family"], exported["family"])
  fields = {"gemma2": _NEW_FAMILY_FIELDS, "gemma3": _NEW_FAMILY_FIELDS, "phi3": _NEW_FAMILY_FIELDS,
            "mixtral": _MOE_FIELDS, "qwen3_moe": _MOE_FIELDS}.get(exported["family"], ())
  # every switch the family's decoder reads came back
  assert {f: getattr(cfg, f) for f in fields} == {f: getattr(merged.config, f) for f in fields}
  ours = _logits(models.from_params(cfg, params))
  assert _rel(ours, reference) < READ_BACK_TOL
  # transformers 5.x: "architecture gemma is not supported yet"; gemma2 / 3, phi3: see HF_GGUF_READER
  if exported["family"] in HF_GGUF_READER:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        exported["folder"], gguf_file=os.path.basename(info["path"]), dtype=torch.float32).eval()
    with torch.no_grad():
      theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert _rel(theirs, reference) < READ_BACK_TOL
  # The merged model is the adapted one, and the file is it up to the type's rounding.
  assert _rel(exported["merged_logits"], exported["adapted"]) < 1e-5
  assert _rel(ours, exported["adapted"]) < ROUNDING_TOL[type_name]


def test_tokenizer_template_and_stop_ids(exported):
  """The gguf reader sees the chat template, EOS and end-of-turn ids; ftjax's GGUF tokenizer
  gives the same ids as the original, padded ids are UNUSED."""
  path = exported["files"]["q8_0"]["path"]
  tok = exported["tokenizer"]
  meta = read_gguf_metadata(path)
  im_end = tok.token_to_id("<|im_end|>")
  assert meta["tokenizer.chat_template"] == tok.chat_template
  assert meta["tokenizer.ggml.eot_token_id"] == meta["tokenizer.ggml.eos_token_id"] == im_end
  assert len(meta["tokenizer.ggml.tokens"]) == 512
  assert meta["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
  assert meta["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
  text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer: 42."}],
                                 add_generation_prompt=True)
  back = load_tokenizer(path)
  assert back.encode(text) == tok.encode(text)
  assert back.chat_template == tok.chat_template and back.eos_token_id == im_end


def test_bad_type_leaves_no_file(tmp_path, exported):
  with pytest.raises(FtjaxError, match="q4_k_m.*not supported"):
    save_gguf(exported["merged"], str(tmp_path / "x.gguf"), exported["tokenizer"], type="q4_k_m")
  assert not os.listdir(tmp_path)


def test_models_save_gguf_refuses_an_adapter_without_merged_form(tmp_path, tokenizer):
  """ftjax.models.save_gguf (issue 25's name, the one export uses) folds adapters in through
  ftjax.peft without models/ importing it; an adapter with no weights to fold is refused by name
  before anything is written."""
  import ftjax.export
  assert ftjax.export.save_gguf is models.save_gguf
  model, _ = models.load(_hf_folder(str(tmp_path / "hf"), "qwen2", tokenizer))
  model = peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=2))
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(FtjaxError, match="save_gguf: the attached adapter has no merged form"):
    models.save_gguf(model, str(out / "x.gguf"), tokenizer, type="f32")
  assert not os.listdir(out)


def test_cli_writer_prints_and_writes_modelfile(tmp_path, capsys, tokenizer):
  """`python -m ftjax.export --gguf` writes through export.write_gguf: the file, an Ollama
  Modelfile with the ChatML Go template and stop token, and the run commands."""
  from ftjax.export import write_gguf
  model, _ = models.load(_hf_folder(str(tmp_path / "hf"), "qwen2", tokenizer))
  path = str(tmp_path / "gguf" / "model-q8_0.gguf")
  write_gguf(model, tokenizer, path, "q8_0")
  err = capsys.readouterr().err
  assert f"wrote GGUF {path}" in err and "q8_0" in err and "ollama create model-q8_0 -f" in err
  modelfile = open(tmp_path / "gguf" / "Modelfile").read()
  assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
  assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
  assert 'PARAMETER stop "<|im_end|>"' in modelfile
  assert sorted(os.listdir(tmp_path / "gguf")) == ["Modelfile", "model-q8_0.gguf"]


# --- SentencePiece vocabularies (Llama 2, Mistral v1 style): tokenizer.ggml.model "llama" -----

SPM_TEXTS = ["Spent 12 dollars on lunch, then 40 on groceries.", "caf\u00e9 \u00fcber na\u00efve",
             "x**2 + (ok) = 99999?", "two  spaces and\na newline", "\u6f22\u5b57 unseen: \u00a7\u00b6"]


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
  """A tiny Llama with a SentencePiece BPE tokenizer.model trained here as Llama's own is
  (byte fallback, no normalisation, spaces kept) and a tokenizer_config adding BOS."""
  import json
  import random
  spm = pytest.importorskip("sentencepiece", reason="sentencepiece builds the test's tokenizer.model")
  folder = tmp_path_factory.mktemp("gguf_spm")
  rng = random.Random(0)
  words = ("the of and to in is for on that with as at by from total dollars lunch groceries "
           "spent paid Monday Friday receipt coffee taxi rent answer question").split()
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                              + rng.choice([".", ",", "?", " 12", " 40.5"]) for _ in range(2000))
                    + "\ncaf\u00e9 \u00fcber na\u00efve (ok) x**2\n", encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      character_coverage=1.0, minloglevel=2)
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(_family_config("llama"), dtype=torch.float32)
  hf.save_pretrained(str(folder))
  model, tok = models.load(str(folder))
  path = str(folder / "model-f32.gguf")
  save_gguf(model, path, tok, type="f32")
  return folder, tok, path


def test_sentencepiece_vocab_read_back_by_gguf_and_ftjax(spm_folder):
  """gguf-py reads the pieces, token types and special ids the tokenizer.model holds, scores
  ordered as its merges; ftjax's GGUF tokenizer gives the original's ids and text."""
  from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
  folder, tok, path = spm_folder
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString((folder / "tokenizer.model").read_bytes())
  pieces = list(proto.pieces)
  meta = read_gguf_metadata(path)
  assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
  tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
  assert len(tokens) == len(types) == len(scores) == 512  # the embedding's rows
  assert tokens[:len(pieces)] == [p.piece for p in pieces]
  # sentencepiece's piece types are llama.cpp's token types (NORMAL, UNKNOWN, CONTROL, BYTE)
  assert types[:len(pieces)] == [p.type for p in pieces]
  assert set(types[len(pieces):]) == {gguf.TokenType.UNUSED}
  assert {types[i] for i in range(len(pieces))} == {1, 2, 3, 6}
  assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
          meta["tokenizer.ggml.unknown_token_id"]) == (proto.trainer_spec.bos_id,
                                                       proto.trainer_spec.eos_id, proto.trainer_spec.unk_id)
  assert meta["tokenizer.ggml.add_bos_token"] is True
  # llama.cpp joins the pair making the highest-scoring token first: the scores of the pieces
  # merges make must rank them as the .model's own scores do
  merged = [i for i, p in enumerate(pieces) if p.type == 1 and len(p.piece) > 1]
  assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: (-pieces[i].score, i))
  back = load_tokenizer(path)
  processor = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
  for text in SPM_TEXTS:
    assert back.encode(text) == tok.encode(text) == [1] + processor.encode(text), text
    assert back.decode(back.encode(text)) == text
  # transformers' GGUF tokenizer reads the same file to the same ids (it adds no BOS whatever
  # tokenizer.ggml.add_bos_token says: compared without special tokens)
  theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=os.path.basename(path))
  for text in SPM_TEXTS:
    assert theirs.encode(text, add_special_tokens=False) == processor.encode(text), text


# --- a trained run end to end: export command -> GGUF -> ftjax / transformers vs merged HF ------

def _check_script():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "check_gguf_export.py")
  spec = importlib.util.spec_from_file_location("check_gguf_export", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_trained_run_gguf_matches_merged_export(model_dir, tmp_path_factory):
  """A tiny LoRA run (lr 1e-2: the adapter moves) exported with `python -m ftjax.export` as
  merged HF and as GGUF f32 / f16 / bf16 / q8_0 (scripts/check_gguf_export.py): each GGUF
  re-imported by ftjax has the merged model's logits within its type's tolerance (the script's
  TOLERANCE, justified there), and transformers' GGUF reader decodes each file to the same
  greedy answer as ftjax's."""
  from ftjax import train as train_lib
  from tiny import quickstart_data, run_config
  script = _check_script()
  data_dir = quickstart_data(tmp_path_factory, n_train=8, n_eval=4)
  workdir = str(tmp_path_factory.mktemp("gguf_run"))
  train_lib.train(run_config(model_dir, data_dir, **{
      "train.steps": 3, "train.lr": 1e-2, "eval.forgetting": False}), workdir)
  rows = {r["type"]: r for r in script.check(workdir, ["f32", "f16", "bf16", "q8_0"],
                                              max_new_tokens=12, with_transformers=True,
                                              stop_at_eos=False)}
  for t, row in rows.items():
    assert row["ok"], (t, row["logits_rel_error"], row["tolerance"])
    assert row["answer_gguf_transformers"] == row["answer_gguf_ftjax"], t
  # f32 stores the weights themselves: the same greedy answer as the merged model
  assert rows["f32"]["answer_gguf_ftjax"] == rows["f32"]["answer_merged"]
  assert len(rows["f32"]["answer_merged"]["ids"]) == 12
  # each type really rounds: errors grow f32 < f16 < bf16, and the files shrink
  errors = [rows[t]["logits_rel_error"] for t in ("f32", "f16", "bf16")]
  assert errors == sorted(errors) and errors[0] < 1e-5 < errors[1]
  assert rows["f32"]["bytes"] > rows["f16"]["bytes"] > rows["q8_0"]["bytes"]
  print({t: r["logits_rel_error"] for t, r in rows.items()})  # measured: see the script's TOLERANCE


@pytest.mark.parametrize("k_quant", ["Q4_K", "Q5_K", "Q6_K"])
def test_gguf_package_still_has_no_k_quant_quantiser(k_quant):
  """docs/deploy.md says q4_k_m / q5_k_m are not written because the gguf package can only
  dequantise K-quants (0.19: quantise F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0,
  MXFP4). When a gguf release adds a K-quant quantiser this fails: then offer the type, checked
  as the other types are."""
  qtype = getattr(Q, k_quant)
  block = np.random.RandomState(0).randn(2, gguf.GGML_QUANT_SIZES[qtype][0]).astype(np.float32)
  with pytest.raises(NotImplementedError):
    gguf.quants.quantize(block, qtype)
  from ftjax.models.gguf_write import TYPES
  assert not any(t.startswith(k_quant.lower()) for t in TYPES)


# --- Gemma 2 / Gemma 3 / Phi-3: llama.cpp's keys and tensors, as the gguf package reads them ---

def _merged_hf_weights(merged) -> dict:
  """The merged model's weights under their HF names, in HF's [out, in] layout; a MoE
  projection as HF's per-expert weights of a layer stacked, [experts, out, in], under the
  name without the expert index (how convert_hf_to_gguf merges them before naming)."""
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
  layers = merged.config.num_layers
  out = {}
  for spec in param_specs(merged.config):
    w = np.asarray(get_path(params, spec.path), np.float32)
    names = ([spec.hf_name.replace(".experts.{j}.", ".experts.").format(i=i) for i in range(layers)]
             if spec.experts else spec.hf_names(layers))
    for i, name in enumerate(names):
      x = w[i] if spec.stacked else w
      out[name] = np.swapaxes(x, -1, -2) if spec.transpose else x
  return out


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf's LlamaModel.permute of q / k rows (spelled out apart from ftjax's)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Keys convert_hf_to_gguf's Gemma2Model / Gemma3Model / Phi3MiniModel write, with the tiny
# configs' values (tests/hf_models.FAMILIES), plus the layer pattern / local base save_gguf adds.
EXPECTED_KEYS = {
    "gemma2": {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5,
               "attention.sliding_window": 4, "attention.sliding_window_pattern": [True, False, True],
               "attention.key_length": 16},
    "gemma3": {"attention.sliding_window": 4, "attention.sliding_window_pattern": [True, True, False],
               "rope.freq_base": 50000.0, "rope.freq_base_swa": 100.0, "rope.scaling.type": "linear",
               "rope.scaling.factor": 4.0, "attention.key_length": 16},
    "phi3": {"rope.dimension_count": 8, "attention.sliding_window": 8,
             "rope.scaling.original_context_length": 256},
    # TextModel / Qwen2MoeModel.set_gguf_parameters: the experts (4, top-2; qwen3moe's width)
    "mixtral": {"expert_count": 4, "expert_used_count": 2, "feed_forward_length": 32},
    "qwen3_moe": {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 768,
                  "attention.key_length": 32},
}
GGUF_ARCH_OF = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}  # llama.cpp's names; else the family's


@pytest.mark.parametrize("exported", NEW_FAMILIES + MOE, indirect=True)
def test_new_families_as_the_gguf_package_reads_them(exported):
  """gemma2 / gemma3 / phi3 / mixtral (which transformers' GGUF reader cannot check, see
  HF_GGUF_READER) and qwen3_moe: the `gguf` package's reader finds llama.cpp's architecture,
  keys and tensor names (gguf-py's own table for the architecture), and every tensor's bytes are
  the merged model's weight in HF's layout, gemma's norms as 1 + w, phi3's qkv / gate_up fused
  as convert_hf_to_gguf keeps them, Mixtral's q / k rows permuted as llama's, each MoE
  projection HF's per-expert weights stacked [experts, out, in]."""
  family = exported["family"]
  arch = GGUF_ARCH_OF.get(family, family)
  meta = read_gguf_metadata(exported["files"]["f32"]["path"])
  assert meta["general.architecture"] == arch
  for key, value in EXPECTED_KEYS[family].items():
    assert meta.get(f"{arch}.{key}") == pytest.approx(value), key
  if family == "gemma3":  # Gemma 3 has no attention soft-cap; this config no final one either
    assert f"{arch}.attn_logit_softcapping" not in meta and f"{arch}.final_logit_softcapping" not in meta
  reader = gguf.GGUFReader(exported["files"]["f32"]["path"])
  arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  layers = exported["merged"].config.num_layers
  allowed = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch_id]
             for i in range(layers)}
  names = gguf.get_tensor_name_map(arch_id, layers)
  weights = _merged_hf_weights(exported["merged"])
  stored = {t.name: np.asarray(t.data) for t in reader.tensors}
  assert len(stored) == len(weights)
  for hf_name, w in weights.items():
    base, suffix = hf_name.rsplit(".", 1)
    name = f"{names.get_name(base)}.{suffix}"
    assert name.rsplit(".", 1)[0] in allowed, name
    expected = w + 1 if family in ("gemma2", "gemma3") and name.endswith("norm.weight") else w
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      cfg = exported["merged"].config
      expected = _llama_permute(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
    np.testing.assert_array_equal(stored[name], expected, err_msg=name)
  if family == "phi3":
    assert "blk.0.attn_qkv.weight" in stored and "blk.0.attn_q.weight" not in stored
    assert stored["blk.0.ffn_up.weight"].shape == (2 * 96, 64)  # [gate | up] rows, as HF's
  elif family in MOE:
    width = meta.get(f"{arch}.expert_feed_forward_length") or meta[f"{arch}.feed_forward_length"]
    assert stored["blk.1.ffn_gate_exps.weight"].shape == (4, width, 64)  # ggml {d, ff, experts}
    assert stored["blk.1.ffn_down_exps.weight"].shape == (4, 64, width)
    assert stored["blk.1.ffn_gate_inp.weight"].shape == (4, 64)  # the router, [experts, d]
    assert "blk.0.ffn_gate.weight" not in stored  # no dense MLP
  else:
    assert "blk.2.post_ffw_norm.weight" in stored and "output.weight" not in stored  # tied head


@pytest.mark.parametrize("exported", ["gemma2"], indirect=True)
def test_gemma_query_scalar_llama_cpp_cannot_derive_is_refused(exported, tmp_path):
  """llama.cpp derives Gemma 2 / 3's query_pre_attn_scalar from the model size; a file of a
  model with another one would run with other logits there, so none is written."""
  merged = exported["merged"]
  params = nnx.to_pure_dict(nnx.state(merged, nnx.Param))
  model = models.from_params(merged.config.replace(query_pre_attn_scalar=24.0), params)
  with pytest.raises(FtjaxError, match="query_pre_attn_scalar=24, but llama.cpp derives 16"):
    save_gguf(model, str(tmp_path / "x.gguf"), exported["tokenizer"], type="f32")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("exported", ["qwen3_moe"], indirect=True)
def test_qwen3_moe_without_norm_topk_prob_is_refused(exported, tmp_path):
  """llama.cpp re-normalises the chosen experts' router weights for every qwen3moe file (its
  build_moe_ffn's norm_w is hard-wired, no GGUF key), so a Qwen3-MoE that does not
  (norm_topk_prob=False, Qwen3MoeConfig's default) would run with other logits: refused, by key,
  before anything is written."""
  merged = exported["merged"]
  model = models.from_params(merged.config.replace(norm_topk_prob=False),
                             nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
  with pytest.raises(FtjaxError, match="qwen3_moe has norm_topk_prob=False, but llama.cpp always "
                                       "re-normalises"):
    save_gguf(model, str(tmp_path / "x.gguf"), exported["tokenizer"], type="f32")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("exported", ["phi3"], indirect=True)
def test_phi3_longrope_factors_round_trip(exported, tmp_path):
  """Phi-3's longrope (128k models): the long / short factors as llama.cpp's rope_factors_long /
  _short tensors and the attention factor key; ftjax reads the same scaling back, and the
  logits of a sequence past the original context (long factors in use) are the model's."""
  merged = exported["merged"]
  scaling = {"rope_type": "longrope", "long_factor": (1.0, 1.5, 2.0, 4.0),
             "short_factor": (1.0, 1.0, 1.25, 1.5), "original_max_position_embeddings": 8}
  cfg = merged.config.replace(rope_scaling=tuple(sorted(scaling.items())))
  model = models.from_params(cfg, nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
  path = str(tmp_path / "longrope.gguf")
  save_gguf(model, path, exported["tokenizer"], type="f32")
  meta = read_gguf_metadata(path)
  assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(256 / 8) / np.log(8)))
  stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
  np.testing.assert_array_equal(stored["rope_factors_long.weight"], scaling["long_factor"])
  np.testing.assert_array_equal(stored["rope_factors_short.weight"], scaling["short_factor"])
  back, params = load_gguf(path)
  assert dict(back.rope_scaling) == scaling
  assert IDS.shape[1] > 8  # past the original context: the long factors and the attention factor
  assert _rel(_logits(models.from_params(back, params)), _logits(model)) < READ_BACK_TOL
