"""model.attention: the fused kernels against the XLA reference, with the packing segment mask.

Only the XLA path runs natively here (CPU); the Pallas splash kernel runs in interpret mode,
which executes the kernel's own program on CPU. cuDNN needs a GPU: on CPU it is refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax.errors import FtjaxError
from ftjax.models import ops


def _packed(b=2, t=128, n=4, k=2, h=64):
  rng = np.random.RandomState(0)
  q, key, v = (jnp.asarray(rng.randn(b, t, heads, h), jnp.float32) for heads in (n, k, k))
  segments = np.ones((b, t), np.int32)
  segments[0, 50:] = 2  # two packed documents
  segments[1, 100:] = 0  # padding at the end
  return q, key, v, jnp.asarray(segments)


@pytest.mark.parametrize("window", [None, 16])
def test_splash_matches_xla_on_real_tokens(window):
  """Grouped-query heads (4 q / 2 kv), two packed segments, trailing padding, optionally a
  sliding window: every real token's output equals the XLA path within 1e-5 of the largest
  output (f32; the kernel's online softmax sums in another order)."""
  q, k, v, segments = _packed()
  index = jnp.broadcast_to(jnp.arange(q.shape[1]), segments.shape)
  mask = ops.attention_mask(index, jnp.arange(q.shape[1]), segments, segments, window)
  ref = ops.attention(q, k, v, mask, 0.125)
  out = ops.fused_attention("splash", q, k, v, segments, 0.125, window, interpret=True)
  real = np.asarray(segments) > 0
  err = np.abs(np.asarray(out) - np.asarray(ref))[real].max()
  assert err <= 1e-5 * np.abs(np.asarray(ref)).max()


def test_fused_kernels_are_refused_where_they_cannot_run():
  with pytest.raises(FtjaxError, match="needs a GPU backend; this process runs on 'cpu'"):
    ops.check_attention("cudnn", "cpu")
  with pytest.raises(FtjaxError, match="needs a TPU backend"):
    ops.check_attention("splash", "gpu")
  ops.check_attention("xla", "cpu")
  ops.check_attention("splash", "tpu")
  with pytest.raises(FtjaxError, match="not a multiple of the kernel's block of 128"):
    q, k, v, segments = _packed(t=96)
    ops.fused_attention("splash", q, k, v, segments, 0.125, interpret=True)
  c = config_lib.base_config()
  c.data.train = "x.jsonl"
  c.model.attention = "flash"
  with pytest.raises(FtjaxError, match="model.attention='flash'"):
    config_lib.validate(c)
  c.model.attention = "cudnn"
  with pytest.raises(FtjaxError, match="needs model.dtype='bfloat16'"):
    config_lib.validate(c)
