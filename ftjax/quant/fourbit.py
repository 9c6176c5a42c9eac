"""4-bit blockwise quantisation (NF4 and FP4) in bitsandbytes' exact layout, in JAX.

  q = quantize_4bit(x, block_size=64, quant_type="nf4", double_quant=True)
  x_hat = dequantize_4bit(q)

The layout (bitsandbytes `functional.quantize_4bit`, checked byte for byte in the tests):
- x is flattened row-major into blocks of `block_size`; the last block may be shorter.
- Each block keeps its absmax (f32). Each value becomes x / absmax, clipped to [-1, 1], and then the
  index of the nearest code-book value (ties to the lower one, like torch.bucketize on the
  midpoints).
- Two indices share a byte, the first one in the high nibble, padded with the index of 0.0.
- Double quantisation stores the absmax values minus their mean (`offset`) as 8-bit codes of
  bitsandbytes' signed dynamic map, in blocks of 256, each with its f32 absmax (`absmax_scale`).
  That cuts the constant overhead from 32/64 = 0.5 to ~8.5/64 = 0.13 bits per parameter.

The 4-bit codes, the absmax and the 8-bit absmax codes are bitsandbytes' bytes (its CPU kernel
codes a value in [-1, 1] through a 65,536-entry table: grid point k = floor((x + 1) / 2 * 65535
+ 0.5) of linspace(-1, 1, 65536), then the dynamic code nearest to that grid point; ftjax does
the same, which in ~0.1% of blocks is one code away from the code nearest to x itself). One thing
can differ, measured in tests/test_quant.py: `offset`, the mean of the absmax values, can be 1
ulp apart, because torch's float32 sum runs in an order that depends on the CPU's vector width
and thread count (bitsandbytes on two machines can differ the same way); the 8-bit codes of
(absmax - offset) then differ only where that ulp moves a value across a table point.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from ftjax.errors import FtjaxError

# bitsandbytes get_4bit_type("nf4"): quantiles of N(0, 1), index 0..15.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# bitsandbytes get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order,
# divided by its largest value (12).
FP4_CODE = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                      -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], np.float32) / 12.0)

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
DOUBLE_QUANT_BLOCK = 256


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n) in f32, bit for bit: an f32 step, f64 arithmetic from both
  ends, each half from its own end."""
  s, e = np.float32(start), np.float32(end)
  step = np.float64(np.float32((e - s) / np.float32(n - 1)))
  i = np.arange(n)
  return np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i)).astype(np.float32)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """bitsandbytes `create_dynamic_map(signed=True)`: the 256 values of double quantisation."""
  data = []
  non_sign_bits = total_bits - 1
  additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
  for i in range(max_exponent_bits):
    items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
    bounds = _torch_linspace(0.1, 1, items)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))  # torch multiplies in f32
    data += (scale * means).tolist() + (-scale * means).tolist()
  if additional > 0:
    bounds = _torch_linspace(0.1, 1, additional + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
    data += (scale * means).tolist() + (-scale * means).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (256 - len(data))
  return np.sort(np.asarray(data, np.float32))


DYNAMIC_CODE = dynamic_code()


@dataclasses.dataclass
class Quant4bit:
  """A 4-bit quantised tensor (a pytree: arrays are leaves, the rest is static).

  codes: uint8 [ceil(n / 2)] two indices per byte; absmax: f32 [blocks], or with double
  quantisation uint8 [blocks] plus absmax_scale f32 [ceil(blocks / 256)] and offset f32 [].
  """
  codes: jax.Array
  absmax: jax.Array
  absmax_scale: jax.Array | None
  offset: jax.Array | None
  shape: tuple[int, ...]
  block_size: int
  quant_type: str
  dtype: str  # of the original tensor

  @property
  def double_quant(self) -> bool:
    return self.absmax_scale is not None

  def bits_per_param(self) -> float:
    n = math.prod(self.shape)
    nbytes = sum(np.dtype(a.dtype).itemsize * a.size
                 for a in (self.codes, self.absmax, self.absmax_scale, self.offset) if a is not None)
    return 8 * nbytes / n


jax.tree_util.register_dataclass(
    Quant4bit, data_fields=["codes", "absmax", "absmax_scale", "offset"],
    meta_fields=["shape", "block_size", "quant_type", "dtype"])


def _check(block_size: int, quant_type: str) -> None:
  if block_size not in BLOCK_SIZES:
    raise FtjaxError(f"quantisation block_size={block_size}; bitsandbytes' sizes are {BLOCK_SIZES}")
  if quant_type not in CODES:
    raise FtjaxError(f"quant_type={quant_type!r}; expected one of {tuple(CODES)}")


def _blockwise_absmax_scale(flat, block_size: int):
  """(absmax per block, x / absmax clipped to [-1, 1]) as bitsandbytes computes them: the full
  blocks multiply by the reciprocal, the short last block divides."""
  n = flat.shape[0]
  full = n - n % block_size
  body = flat[:full].reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(body), axis=-1)
  scaled = jnp.clip(body * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1).reshape(-1)
  if full < n:
    am = jnp.maximum(jnp.max(jnp.abs(flat[full:])), 1e-38)
    absmax = jnp.concatenate([absmax, am[None]])
    scaled = jnp.concatenate([scaled, jnp.clip(flat[full:] / am, -1, 1)])
  return absmax, scaled


TABLE_SIZE = 65536  # bitsandbytes' CPU kernel codes 8-bit values through a table this long


@functools.lru_cache(maxsize=1)
def _dynamic_table() -> np.ndarray:
  """uint8 [65536]: the dynamic code nearest to each point of linspace(-1, 1, 65536) (ties to the
  lower code), computed in f32 as bitsandbytes builds its table."""
  grid = np.linspace(-1, 1, TABLE_SIZE).astype(np.float32)
  code = DYNAMIC_CODE.astype(np.float32)
  return np.concatenate([np.argmin(np.abs(chunk[:, None] - code[None, :]), axis=-1)
                         for chunk in np.split(grid, 16)]).astype(np.uint8)


def _code_8bit(scaled):
  """The dynamic-map code of values in [-1, 1], through bitsandbytes' table."""
  t = (scaled + 1.0) / 2.0 * np.float32(TABLE_SIZE - 1)
  # The barrier keeps XLA from fusing the product and the + 0.5 into one FMA, whose single
  # rounding would move points sitting on a table boundary.
  k = jnp.floor(jax.lax.optimization_barrier(t) + 0.5).astype(jnp.int32)
  return jnp.asarray(_dynamic_table())[jnp.clip(k, 0, TABLE_SIZE - 1)]


def _quantize_absmax(absmax):
  """Double quantisation: (uint8 codes, f32 scale per 256 blocks, f32 offset)."""
  offset = jnp.mean(absmax)
  values = absmax - offset
  n = values.shape[0]
  full = n - n % DOUBLE_QUANT_BLOCK
  # bitsandbytes' 8-bit kernel divides by the block's absmax (its 4-bit one multiplies by the
  # reciprocal; _blockwise_absmax_scale follows that one).
  blocks = [values[:full].reshape(-1, DOUBLE_QUANT_BLOCK)] if full else []
  if full < n:
    blocks.append(values[full:][None, :])
  scale = jnp.concatenate([jnp.max(jnp.abs(b), axis=-1) for b in blocks])
  scaled = jnp.concatenate([(b / jnp.maximum(jnp.max(jnp.abs(b), axis=-1, keepdims=True), 1e-38)
                             ).reshape(-1) for b in blocks])
  return _code_8bit(scaled), scale, offset


def quantize_4bit(x, block_size: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> Quant4bit:
  """bitsandbytes' `quantize_4bit(x, blocksize, quant_type, compress_statistics)`, in JAX."""
  _check(block_size, quant_type)
  x = jnp.asarray(x)
  codes, absmax, scale, offset = _quantize_4bit_arrays(x, block_size, quant_type, double_quant)
  return Quant4bit(codes, absmax, scale, offset, tuple(x.shape), block_size, quant_type,
                   jnp.dtype(x.dtype).name)


# One compiled program per (shape, settings): op by op, a tensor's quantisation compiled ~40
# small programs (a QLoRA load quantises every kernel shape of the model; the tests ~300).
@functools.partial(jax.jit, static_argnames=("block_size", "quant_type", "double_quant"))
def _quantize_4bit_arrays(x, block_size: int, quant_type: str, double_quant: bool):
  flat = x.reshape(-1).astype(jnp.float32)
  absmax, scaled = _blockwise_absmax_scale(flat, block_size)
  if scaled.shape[0] % 2:
    scaled = jnp.pad(scaled, (0, 1))
  code = CODES[quant_type]
  order = np.argsort(code, kind="stable")
  midpoints = (code[order[:-1]] + code[order[1:]]) / np.float32(2.0)
  index = jnp.searchsorted(jnp.asarray(midpoints), scaled, side="left")
  if quant_type != "nf4":  # FP4's code book is in bit-pattern order, not sorted
    index = jnp.asarray(order)[index]
  index = index.astype(jnp.uint8)
  codes = (index[0::2] << 4) | index[1::2]
  scale = offset = None
  if double_quant:
    absmax, scale, offset = _quantize_absmax(absmax)
  return codes, absmax, scale, offset


def absmax_values(q: Quant4bit):
  """The f32 absmax of every block (undoing double quantisation)."""
  if not q.double_quant:
    return q.absmax
  values = jnp.asarray(DYNAMIC_CODE)[q.absmax.astype(jnp.int32)]
  scale = jnp.repeat(q.absmax_scale, DOUBLE_QUANT_BLOCK)[: values.shape[0]]
  return values * scale + q.offset


def dequantize_4bit(q: Quant4bit, dtype=None):
  """The tensor back, in `dtype` (default: the original's), as bitsandbytes dequantises it.
  Op by op on purpose: jitted whole, its double-quantised results moved off bitsandbytes' in
  test_quant (XLA may contract absmax_values' `values * scale + offset` into one FMA)."""
  n = math.prod(q.shape)
  index = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1).reshape(-1)[:n]
  values = jnp.asarray(CODES[q.quant_type])[index.astype(jnp.int32)]
  absmax = absmax_values(q)
  scale = jnp.repeat(absmax, q.block_size)[:n]
  return (values * scale).reshape(q.shape).astype(dtype or q.dtype)
