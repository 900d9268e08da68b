"""BatchNorm with PyTorch semantics, per-group batch statistics and a memory-lean gradient.

`BatchNorm` (optionally fused with the following ReLU) normalises with batch statistics computed
separately for each image set of the batch (source and target in one call), or with running
statistics. Its custom gradient keeps only the layer's input for the backward pass and
recomputes the rest there, which halves the activation memory of a ResNet training step
compared with autodiff of the same expression (`plain_autodiff` switches back, for tests and
measurements). `relu` is a ReLU whose backward keeps its output rather than its input.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_PLAIN_AUTODIFF = [False]


@contextlib.contextmanager
def plain_autodiff():
  """Within this context, models *traced* use JAX autodiff of the plain BatchNorm and ReLU
  expressions instead of the memory-saving custom gradients (same values; for tests and for
  measuring what the custom gradients save)."""
  _PLAIN_AUTODIFF.append(True)
  try:
    yield
  finally:
    _PLAIN_AUTODIFF.pop()


def _bn_apply(x, mean, rstd, scale, bias, relu, out_dtype):
  """BatchNorm (+ ReLU) with given statistics: the forward expression (stats dtype math)."""
  y = (x.astype(mean.dtype) - mean) * rstd
  y = y * scale.astype(mean.dtype) + bias.astype(mean.dtype)
  return (jnp.maximum(y, 0) if relu else y).astype(out_dtype)


def _bn_batch_stats(x, stat_dtype, epsilon):
  """Per-group `(mean, biased var, 1 / sqrt(var + eps))` of `x: [g, b, ..., c]` (keepdims)."""
  axes = tuple(range(1, x.ndim - 1))
  xs = x.astype(stat_dtype)
  mean = jnp.mean(xs, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xs - mean), axis=axes, keepdims=True)
  return mean, var, jax.lax.rsqrt(var + epsilon)


def _bn_grad_parts(x, gy, mean, rstd, scale, bias, relu, axes):
  """`(g, a, sum g, sum g * x_hat)` of the BatchNorm backward, over `axes` (keepdims).

  Written in terms of the layer input `x` and per-channel coefficients only (`a = rstd * scale`,
  the ReLU test as `x * a + b > 0`, `sum g * x_hat = rstd * (sum g * x - mean * sum g)`): an
  expression of the backward that repeats the forward's, such as `x - mean`, would be merged
  with it by XLA (CSE; XLA:CPU also drops optimisation barriers) and kept alive from the
  forward, which is the memory this custom gradient exists to save.
  """
  xs = x.astype(mean.dtype)
  a = rstd * scale.astype(mean.dtype)
  g = gy.astype(mean.dtype)
  if relu:
    b = bias.astype(mean.dtype) - mean * a
    g = jnp.where(xs * a + b > 0, g, jnp.zeros((), g.dtype))
  s1 = jnp.sum(g, axis=axes, keepdims=True)
  s_gxhat = rstd * (jnp.sum(g * xs, axis=axes, keepdims=True) - mean * s1)
  return g, a, s1, s_gxhat


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_batch(x, scale, bias, epsilon, relu, out_dtype):
  """BatchNorm (+ ReLU) with batch statistics per group `x[i]` of `x: [g, b, ..., c]`.

  A custom gradient that keeps only `x` (and per-channel numbers) for the backward pass and
  recomputes what it needs there; autodiff of the same expression keeps the centred input, the
  normalised input and the ReLU mask as well (about twice a ResNet's activation memory).
  """
  mean, _, rstd = _bn_batch_stats(x, jnp.promote_types(out_dtype, jnp.float32), epsilon)
  return _bn_apply(x, mean, rstd, scale, bias, relu, out_dtype)


def _bn_batch_fwd(x, scale, bias, epsilon, relu, out_dtype):
  mean, _, rstd = _bn_batch_stats(x, jnp.promote_types(out_dtype, jnp.float32), epsilon)
  return _bn_apply(x, mean, rstd, scale, bias, relu, out_dtype), (x, mean, rstd, scale, bias)


def _bn_batch_bwd(epsilon, relu, out_dtype, res, gy):
  del epsilon, out_dtype
  x, mean, rstd, scale, bias = res
  axes = tuple(range(1, x.ndim - 1))
  g, a, s1, s_gxhat = _bn_grad_parts(x, gy, mean, rstd, scale, bias, relu, axes)
  n = x[0].size // x.shape[-1]
  # dx = rstd * (gh - mean(gh) - x_hat * mean(gh * x_hat)), gh = g * scale, per group; as
  # g * a + x * (-k) + (mean * k - a * mean(g)) with k = a * rstd * mean(g * x_hat).
  k = a * rstd * s_gxhat / n
  dx = g * a - x.astype(mean.dtype) * k + (mean * k - a * s1 / n)
  sum_c = lambda t: jnp.sum(t, axis=(0,) + axes)
  return dx.astype(x.dtype), sum_c(s_gxhat).astype(scale.dtype), sum_c(s1).astype(bias.dtype)


_bn_batch.defvjp(_bn_batch_fwd, _bn_batch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bn_fixed(x, scale, bias, mean, var, epsilon, relu, out_dtype):
  """BatchNorm (+ ReLU) with given (running) statistics; keeps only `x` for the backward."""
  return _bn_apply(x, mean, jax.lax.rsqrt(var + epsilon), scale, bias, relu, out_dtype)


def _bn_fixed_fwd(x, scale, bias, mean, var, epsilon, relu, out_dtype):
  return (
      _bn_fixed(x, scale, bias, mean, var, epsilon, relu, out_dtype),
      (x, scale, bias, mean, var),
  )


def _bn_fixed_bwd(epsilon, relu, out_dtype, res, gy):
  del out_dtype
  x, scale, bias, mean, var = res
  rstd = jax.lax.rsqrt(var + epsilon)
  axes = tuple(range(x.ndim - 1))
  g, a, s1, s_gxhat = _bn_grad_parts(x, gy, mean, rstd, scale, bias, relu, axes)
  s1, s_gxhat = s1.reshape(-1), s_gxhat.reshape(-1)
  dmean = -a * s1
  dvar = -0.5 * rstd * rstd * scale.astype(mean.dtype) * s_gxhat
  return (
      (g * a).astype(x.dtype),
      s_gxhat.astype(scale.dtype),
      s1.astype(bias.dtype),
      dmean.astype(mean.dtype),
      dvar.astype(var.dtype),
  )


_bn_fixed.defvjp(_bn_fixed_fwd, _bn_fixed_bwd)


@jax.custom_vjp
def relu(x):
  """ReLU whose backward keeps its *output* (`y > 0` is the mask), not its input.

  The output is what the next convolution keeps anyway, so the residual sum before a block's
  final ReLU is not kept for the backward (`nn.relu` keeps a mask of its input).
  """
  return jnp.maximum(x, 0)


def _relu_fwd(x):
  y = jnp.maximum(x, 0)
  return y, y


def _relu_bwd(y, g):
  return (jnp.where(y > 0, g, jnp.zeros((), g.dtype)),)


relu.defvjp(_relu_fwd, _relu_bwd)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics and independent statistics for groups of the batch.

  With `num_groups=G` the batch `[G * b, ...]` is G image sets (source and target) whose batch
  statistics are computed separately, as if each set went through the network in its own call;
  running statistics are then updated once per set, in order (what the reference does when it
  calls the backbone on the source and then the target batch).

  The normalisation (with the following ReLU when `relu=True`) has a custom gradient that keeps
  only the layer's input for the backward pass (recomputing the normalisation there), which
  halves the activation memory of a ResNet's training step; the values and gradients are those
  of the plain expression (tested against its autodiff).

  Attributes:
    momentum: PyTorch momentum (weight of the new batch statistic).
    epsilon: added to the variance.
    dtype: compute dtype of the output (None: promote input and parameters).
    relu: apply a ReLU to the output (fused, for the backward's memory).
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  relu: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool = True, num_groups: int = 1):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.param_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.param_dtype))
    dtype = jnp.dtype(self.dtype or jnp.result_type(x, scale))
    # Statistics in at least float32 (bfloat16 compute keeps float32 statistics).
    stat_dtype = jnp.promote_types(dtype, jnp.float32)
    if _PLAIN_AUTODIFF[-1]:
      return self._plain(
          x, scale, bias, ra_mean, ra_var, use_running_average, num_groups, dtype, stat_dtype
      )
    if use_running_average:
      return _bn_fixed(
          x,
          scale,
          bias,
          ra_mean.value.astype(stat_dtype),
          ra_var.value.astype(stat_dtype),
          self.epsilon,
          self.relu,
          dtype,
      )
    g = num_groups
    xg = x.reshape((g, x.shape[0] // g) + x.shape[1:])
    y = _bn_batch(xg, scale, bias, self.epsilon, self.relu, dtype)
    if not self.is_initializing():
      mean, var, _ = _bn_batch_stats(jax.lax.stop_gradient(xg), stat_dtype, self.epsilon)
      self._update_running(ra_mean, ra_var, mean, var, xg.size // (g * c))
    return y.reshape(x.shape)

  def _plain(
      self, x, scale, bias, ra_mean, ra_var, use_running_average, num_groups, dtype, stat_dtype
  ):
    """The same BatchNorm (+ ReLU) left to autodiff (see `plain_autodiff`)."""
    if use_running_average:
      mean = ra_mean.value.astype(stat_dtype)
      var = ra_var.value.astype(stat_dtype)
      y = (x.astype(stat_dtype) - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      g = num_groups
      xg = x.astype(stat_dtype).reshape((g, x.shape[0] // g) + x.shape[1:])
      mean, var, rstd = _bn_batch_stats(xg, stat_dtype, self.epsilon)
      y = ((xg - mean) * rstd).reshape(x.shape)
      if not self.is_initializing():
        self._update_running(ra_mean, ra_var, mean, var, xg.size // (g * x.shape[-1]))
    y = (y * scale.astype(stat_dtype) + bias.astype(stat_dtype)).astype(dtype)
    return nn.relu(y) if self.relu else y

  def _update_running(self, ra_mean, ra_var, mean, var, n):
    """PyTorch's running-statistics update, once per group in order (unbiased variance)."""
    c = ra_mean.value.shape[0]
    unbias = n / max(n - 1, 1)
    m, v = ra_mean.value, ra_var.value
    for i in range(mean.shape[0]):
      m = (1 - self.momentum) * m + self.momentum * mean[i].reshape(c).astype(m.dtype)
      v = (1 - self.momentum) * v + self.momentum * (var[i].reshape(c) * unbias).astype(v.dtype)
    ra_mean.value, ra_var.value = m, v


def relu_activation(x):
  """`relu`, or `nn.relu` inside `plain_autodiff`."""
  return nn.relu(x) if _PLAIN_AUTODIFF[-1] else relu(x)
