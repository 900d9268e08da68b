"""torchvision-style ResNet ("v1.5") to stride 16, the SCorrSAN feature extractor (paper Sec. 3.1).

Reference: torchvision `resnet101` as used by the released code. The stride 2 of a bottleneck is on
its 3x3 conv; a projection shortcut is a 1x1 conv with the same stride plus BN. All convs are
bias-free with *symmetric* explicit padding (XLA's `SAME` pads asymmetrically for stride 2 and
gives different numbers). BatchNorm eps = 1e-5, momentum 0.1 (PyTorch convention: running =
0.9 * running + 0.1 * batch, running variance unbiased).

The feature SCorrSAN uses is the output of the last block of layer3 *before its final ReLU*
(1024 channels for the bottleneck ResNets, stride 16); layer4 is not built unless asked for.

Flax names mirror the PyTorch state dict so weight import is a name table
(`sccorr_jax.convert`): `conv1, bn1, layer{s}_{i}/{conv1,bn1,conv2,bn2,conv3,bn3,
downsample_conv,downsample_bn}`.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sccorr_jax.models.batchnorm import BatchNorm, relu_activation

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BOTTLENECK_DEPTHS = (50, 101, 152)

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _gather_rows(x):
  if jax.default_backend() != "cpu":
    return x  # The fusion problem below is XLA:CPU's; other backends are left to their fuser.
  flat = x.reshape(-1, x.shape[-1])
  rows = jnp.arange(flat.shape[0])
  return jnp.take(
      flat, rows, axis=0, mode="clip", indices_are_sorted=True, unique_indices=True
  ).reshape(x.shape)


@jax.custom_vjp
def materialize(x):
  """`x`, computed once into memory (and its gradient likewise): the identity, as a gather.

  A ResNet's residual stream is a chain of element-wise ops (BN, add, ReLU) whose every link
  also feeds a convolution. XLA:CPU duplicates cheap element-wise producers into each consumer,
  so without a cut each block's add recomputes the whole chain back to the stage's first block
  (quadratic in depth: the fusion of layer3's last block had 120 operands, in both the forward
  and the backward), and so does every consumer of the final feature. A gather is not
  duplicated, so the stream is written once per block and read from memory. It costs nothing
  beyond that write: the convolution needs the stream in memory anyway. (An optimisation
  barrier would be the obvious tool, but XLA:CPU removes barriers before fusion.) On other
  default backends it is the plain identity.
  """
  return _gather_rows(x)


def _materialize_fwd(x):
  return _gather_rows(x), None


def _materialize_bwd(_, g):
  return (_gather_rows(g),)


materialize.defvjp(_materialize_fwd, _materialize_bwd)


class Conv1x1(nn.Module):
  """Bias-free 1x1 convolution as a matrix product (same `kernel` [1, 1, cin, cout] as nn.Conv).

  XLA:CPU runs a 2-D dot's forward and backward faster than the equivalent convolution; a stride is a subsampling first, as PyTorch's 1x1/stride-2 conv
  with zero padding reads pixels 0, 2, 4, ...
  """

  features: int
  stride: int = 1
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    if self.stride > 1:
      x = x[:, :: self.stride, :: self.stride, :]
    dtype = self.dtype or jnp.result_type(x, kernel)
    return matmul_channels(x.astype(dtype), kernel[0, 0].astype(dtype))


def matmul_channels(x, kernel):
  """`[..., cin] @ [cin, cout]` as one 2-D matrix product.

  Flattening the leading dims first matters on XLA:CPU: the weight gradient of
  `einsum('bhwc,cd->bhwd')` contracts three dims and misses the fast GEMM path (1.1-3x slower
  forward+backward than the 2-D product, measured on ResNet-101's 1x1 layers).
  """
  lead = x.shape[:-1]
  return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(lead + (kernel.shape[-1],))


def _pool_taps(x):
  """The 9 strided views `x_pad[:, i::2, j::2]` of a 3x3/stride-2/pad-1 max pool, row-major."""
  _, h, w, _ = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [
      xp[:, i : i + 2 * (ho - 1) + 1 : 2, j : j + 2 * (wo - 1) + 1 : 2, :]
      for i in range(3)
      for j in range(3)
  ]


def _pool_argmax(x):
  """Max and index (int8, 0..8) of the first maximal tap of each window (PyTorch's choice)."""
  taps = _pool_taps(x)
  best, idx = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for k in range(1, 9):
    upd = taps[k] > best
    best = jnp.where(upd, taps[k], best)
    idx = jnp.where(upd, jnp.int8(k), idx)
  return best, idx


def _shift_next(a, axis):
  """`a[k + 1]` along `axis`, zero past the end."""
  index = [slice(None)] * a.ndim
  index[axis] = slice(1, None)
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, 1)
  return jnp.pad(a[tuple(index)], pad)


@jax.custom_vjp
def _max_pool_even(x):
  return _pool_argmax(x)[0]


def _max_pool_even_fwd(x):
  y, idx = _pool_argmax(x)
  return y, (idx, x.shape)


def _max_pool_even_bwd(res, g):
  idx, (b, h, w, c) = res
  ho = h // 2
  zero = jnp.zeros((), g.dtype)

  # Input row 2a receives from tap row 1 of output row a; row 2a+1 from tap row 2 of output
  # row a and tap row 0 of output row a+1 (same for columns): four interleaved phases.
  def part(i, j):
    a = jnp.where(idx == 3 * i + j, g, zero)
    if i == 0:
      a = _shift_next(a, 1)
    if j == 0:
      a = _shift_next(a, 2)
    return a

  taps_of = {0: (1,), 1: (0, 2)}
  phase = {
      (pr, pc): sum(part(i, j) for i in taps_of[pr] for j in taps_of[pc])
      for pr in (0, 1)
      for pc in (0, 1)
  }
  even = jnp.stack([phase[0, 0], phase[0, 1]], axis=3).reshape(b, ho, w, c)
  odd = jnp.stack([phase[1, 0], phase[1, 1]], axis=3).reshape(b, ho, w, c)
  return (jnp.stack([even, odd], axis=2).reshape(b, h, w, c),)


_max_pool_even.defvjp(_max_pool_even_fwd, _max_pool_even_bwd)


def max_pool_3x3_s2(x):
  """torchvision's stem max pool (3x3, stride 2, padding 1): `[b, h, w, c]` -> `[b, h/2, w/2, c]`.

  Same values and gradient as `lax.reduce_window` (the gradient goes to the first maximal
  element of each window in row-major order, as PyTorch's). For even sizes the forward is a
  maximum over nine strided views that records the winning tap, and the backward routes the
  gradient with four interleaved phases: XLA:CPU's `select_and_scatter` (reduce_window's
  gradient) is 2.5-4x slower, the reduce_window forward ~4x.
  """
  _, h, w, _ = x.shape
  if h % 2 == 0 and w % 2 == 0:
    return _max_pool_even(x)
  # A Python scalar init value: with an array init, reduce_window does not recognise the max
  # monoid and cannot be differentiated.
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  )


def _conv(features, kernel, stride=1, name=None, dtype=None, param_dtype=jnp.float32):
  if kernel == 1:
    return Conv1x1(features, stride, dtype=dtype, param_dtype=param_dtype, name=name)
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=conv_init,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
  )


def _residual(block, x, y, norm):
  """`(pre_relu, post_relu)` of a block: `y` plus the (projected, if `block.downsample`) input.

  Called inside the block's compact `__call__`, so the projection's modules are the block's
  `downsample_conv` / `downsample_bn` (torchvision's `downsample.0` / `downsample.1`).
  """
  if block.downsample:
    x = _conv(
        y.shape[-1],
        1,
        block.stride,
        name="downsample_conv",
        dtype=block.dtype,
        param_dtype=block.param_dtype,
    )(x)
    x = BatchNorm(dtype=block.dtype, param_dtype=block.param_dtype, name="downsample_bn")(x, **norm)
  out = y + x
  return out, materialize(relu_activation(out))


class _ResidualBlock(nn.Module):
  """The fields and layer constructors of `Bottleneck` and `BasicBlock`."""

  features: int
  stride: int = 1
  downsample: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.nowrap
  def _layers(self, use_running_average, num_groups):
    """`conv` and `bn` in the block's dtypes, and the keyword arguments of a `bn` call."""
    conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    bn = functools.partial(BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    return conv, bn, dict(use_running_average=use_running_average, num_groups=num_groups)


class Bottleneck(_ResidualBlock):
  """1x1 -> 3x3 (stride) -> 1x1 (4x width) with BN; returns `(pre_relu, post_relu)`."""

  expansion = 4

  @nn.compact
  def __call__(self, x, use_running_average=True, num_groups=1):
    conv, bn, norm = self._layers(use_running_average, num_groups)
    y = bn(name="bn1", relu=True)(conv(self.features, 1, name="conv1")(x), **norm)
    y = bn(name="bn2", relu=True)(conv(self.features, 3, self.stride, name="conv2")(y), **norm)
    y = bn(name="bn3")(conv(self.features * 4, 1, name="conv3")(y), **norm)
    return _residual(self, x, y, norm)


class BasicBlock(_ResidualBlock):
  """3x3 (stride) -> 3x3 with BN (ResNet-18/34); returns `(pre_relu, post_relu)`."""

  expansion = 1

  @nn.compact
  def __call__(self, x, use_running_average=True, num_groups=1):
    conv, bn, norm = self._layers(use_running_average, num_groups)
    y = bn(name="bn1", relu=True)(conv(self.features, 3, self.stride, name="conv1")(x), **norm)
    y = bn(name="bn2")(conv(self.features, 3, name="conv2")(y), **norm)
    return _residual(self, x, y, norm)


class ResNet(nn.Module):
  """torchvision ResNet v1.5 trunk, up to `num_stages` stages (3 = stride 16).

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101; only the first
      `num_stages` entries are built. Tests use (1, 1, 1, 1).
    bottleneck: bottleneck blocks (ResNet-50/101/152) or basic blocks (ResNet-18/34).
    num_stages: how many of the four stages to run (3 for SCorrSAN's stride-16 feature).
    width: channels of the stem (64 in torchvision).
    dtype: compute dtype (None: promote input and parameters).
  """

  stage_sizes: Sequence[int] = STAGE_SIZES[101]
  bottleneck: bool = True
  num_stages: int = 3
  width: int = 64
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(
      self, x, train: bool = False, num_groups: int = 1
  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Runs the trunk.

    Args:
      x: [b, H, W, 3] ImageNet-normalised images (H, W multiples of 16 for a stride-16 grid).
      train: use batch statistics in BatchNorm (and update the running ones; needs
        `mutable=['batch_stats']`); False uses the running statistics.
      num_groups: the batch is this many image sets whose batch statistics are kept separate
        (2 when source and target go through in one call).

    Returns:
      `(feature, aux)`: feature `[b, H/2^(num_stages+1), W/.., c]` is the last block's output
      *before* its final ReLU; aux maps `stem`, `layer1`..`layer{num_stages}` (post-ReLU) and
      `layer{s}_{i}_pre_relu` of every block to their activations.
    """
    urav = not train
    norm = dict(use_running_average=urav, num_groups=num_groups)
    aux = {}
    x = _conv(self.width, 7, 2, name="conv1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, relu=True, name="bn1")(x, **norm)
    x = max_pool_3x3_s2(x)
    aux["stem"] = x
    block_cls = Bottleneck if self.bottleneck else BasicBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2, 3))
    pre = x
    for s, n_blocks in enumerate(self.stage_sizes[: self.num_stages]):
      features = self.width * 2**s
      for i in range(n_blocks):
        stride = 2 if (i == 0 and s > 0) else 1
        downsample = i == 0 and (stride != 1 or s == 0 and self.bottleneck)
        pre, x = block_cls(
            features,
            stride=stride,
            downsample=downsample,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"layer{s + 1}_{i}",
        )(x, urav, num_groups)
        aux[f"layer{s + 1}_{i}_pre_relu"] = pre
      aux[f"layer{s + 1}"] = x
    return pre, aux


def resnet(depth: int = 101, **kwargs) -> ResNet:
  """ResNet-`depth` trunk (18/34/50/101/152); `stage_sizes=` in kwargs overrides the depth."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"backbone depth must be one of {sorted(STAGE_SIZES)}, got {depth}")
  kwargs.setdefault("stage_sizes", STAGE_SIZES[depth])
  return ResNet(bottleneck=depth in BOTTLENECK_DEPTHS, **kwargs)


ResNet18 = functools.partial(resnet, 18)
ResNet34 = functools.partial(resnet, 34)
ResNet50 = functools.partial(resnet, 50)
ResNet101 = functools.partial(resnet, 101)
ResNet152 = functools.partial(resnet, 152)
