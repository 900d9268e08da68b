"""DINOv2 vision transformer (Oquab et al. 2023), NHWC, as the official code computes it.

A feature extractor for SCorrSAN (issue 12): the patch tokens of one or several blocks replace
the ResNet's layer3 feature. The specification is `../shared/fixtures/dinov2/README.md`, recorded
from `facebookresearch/dinov2` (`dinov2/models/vision_transformer.py`, `dinov2/layers/*`,
`dinov2/hub/backbones.py`); where other ports (timm, Hugging Face) differ, the official code wins:

* patch embedding: a 14x14 stride-14 convolution with bias, no norm after it;
* sequence `[cls, registers, patches]`: the positional embedding is added to `[cls, patches]`
  *before* the registers are inserted (registers have no position);
* pre-norm blocks `x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))` with LayerScale on both
  branches, LayerNorm eps 1e-6 everywhere, exact-erf GELU, attention scale `head_dim ** -0.5`,
  qkv columns split as `(3, heads, head_dim)`;
* SwiGLU feed-forward for ViT-g: hidden `(int(int(C * mlp_ratio) * 2 / 3) + 7) // 8 * 8`, the first
  half of `w12` gated by SiLU;
* positional embedding resized with torch's bicubic kernels (`interpolate_pos_embed`): the
  default models sample with step `M / (n + 0.1)` and the a = -0.75 cubic with replicated
  borders, the `_reg` models with the antialiased a = -0.5 filter and no offset. Nothing in
  `jax.image` reproduces the first, so both are written here as resampling matrices.

One difference from the reference, on purpose: it casts the positional embedding to float32
for the resize even in a float64 model; here the resize runs in the embedding's dtype (the
fixtures' float64 keys are computed the same way; the reference as written is within 6.2e-6).

Flax names mirror the torch state dict so that weight import is a name table
(`sccorr_jax.convert.from_dinov2_state_dict`): `cls_token [1, 1, C]`, `pos_embed [1, 1 + M*M, C]`,
`register_tokens [1, R, C]`, `patch_embed/{kernel [p, p, 3, C], bias}`,
`blocks_{i}/{norm1, attn/{qkv, proj}, ls1/gamma, norm2, mlp/{fc1, fc2 | w12, w3}, ls2/gamma}`,
`norm/{scale, bias}`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPS = 1e-6
PATCH_SIZE = 14


def _hub(embed_dim, depth, num_heads, ffn='mlp', reg=False):
  # The `_reg` backbones: 4 register tokens, antialiased position interpolation without offset.
  registers, offset, antialias = (4, 0.0, True) if reg else (0, 0.1, False)
  return dict(
      embed_dim=embed_dim,
      depth=depth,
      num_heads=num_heads,
      patch_size=14,
      mlp_ratio=4.0,
      num_register_tokens=registers,
      ffn=ffn,
      img_size=518,
      interpolate_offset=offset,
      interpolate_antialias=antialias,
  )


# name -> `DINOv2` constructor kwargs, as `dinov2/hub/backbones.py` builds `dinov2_<name>`.
PRESETS: Dict[str, Dict[str, Any]] = {
    'vits14': _hub(384, 12, 6),
    'vitb14': _hub(768, 12, 12),
    'vitl14': _hub(1024, 24, 16),
    'vitg14': _hub(1536, 40, 24, ffn='swiglu'),
    'vits14_reg': _hub(384, 12, 6, reg=True),
    'vitb14_reg': _hub(768, 12, 12, reg=True),
    'vitl14_reg': _hub(1024, 24, 16, reg=True),
    'vitg14_reg': _hub(1536, 40, 24, ffn='swiglu', reg=True),
}

# The official checkpoint file of each preset (https://dl.fbaipublicfiles.com/dinov2/...).
CHECKPOINT_FILES = {
    name: f"dinov2_{name.replace('_reg', '')}/dinov2_{name.replace('_reg', '_reg4')}_pretrain.pth"
    for name in PRESETS
}


# ------------------------------------------------------------------------------------------------
# Positional-embedding interpolation (torch `F.interpolate(mode='bicubic')`, exact).


def _cubic(d: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at distance `d` (0 outside |d| < 2)."""
  d = np.abs(d)
  near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
  far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
  return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
  """torch `upsample_bicubic2d` (align_corners=False) along one axis, as a matrix.

  Args:
    n_in: input length.
    n_out: output length.
    scale: source step per output sample (torch's `1 / scale_factor`, or `n_in / n_out`).

  Returns:
    [n_out, n_in] float64: `out = matrix @ in`. Source coordinate `(i + 0.5) * scale - 0.5`
    (unclamped), taps `floor(x) - 1 .. floor(x) + 2` clamped to the border, a = -0.75.
  """
  x = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  i0 = np.floor(x)
  t = x - i0
  m = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  for k, d in zip(range(-1, 3), (t + 1.0, t, 1.0 - t, 2.0 - t)):
    cols = np.clip(i0.astype(np.int64) + k, 0, n_in - 1)
    np.add.at(m, (rows, cols), _cubic(d, -0.75))
  return m


def antialiased_bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
  """torch `_upsample_bicubic2d_aa` (the Pillow-style filter) along one axis, as a matrix.

  Args:
    n_in: input length.
    n_out: output length (`n_out == n_in` returns the identity: torch skips such an axis).
    scale: source step per output sample.

  Returns:
    [n_out, n_in] float64. Keys' cubic with a = -0.5, stretched by `scale` when downsampling,
    taps outside the input dropped and the weights renormalised.
  """
  if n_out == n_in:
    return np.eye(n_in)
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    c = scale * (i + 0.5)
    lo = max(int(c - support + 0.5), 0)
    hi = min(int(c + support + 0.5), n_in)
    j = np.arange(lo, hi, dtype=np.float64)
    w = _cubic((j + 0.5 - c) * inv, -0.5)
    m[i, lo:hi] = w / np.sum(w)
  return m


def pos_embed_matrices(
    native_grid: int,
    grid_hw: Tuple[int, int],
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """The two resampling matrices of the official `interpolate_pos_encoding`.

  Args:
    native_grid: M, the side of the square grid the embedding was trained on.
    grid_hw: (h, w), the patch grid of the input.
    interpolate_offset: 0.1 (default models) or 0.0 (`_reg` models): with an offset torch gets
      `scale_factor = (n + offset) / M` and samples with step `M / (n + offset)`; without one, the
      output size and step `M / n`.
    interpolate_antialias: the antialiased filter (`_reg` models).

  Returns:
    `(rows [h, M], cols [w, M])` float64, or None for the native grid (no resampling at all).
  """
  h, w = int(grid_hw[0]), int(grid_hw[1])
  m = int(native_grid)
  if h * w == m * m and h == w:
    return None
  mats = []
  for n in (h, w):
    if interpolate_offset:
      scale = 1.0 / ((n + interpolate_offset) / m)
    else:
      scale = m / n
    if interpolate_antialias:
      mats.append(antialiased_bicubic_matrix(m, n, scale))
    else:
      mats.append(bicubic_matrix(m, n, scale))
  return mats[0], mats[1]


def interpolate_pos_embed(
    pos_embed,
    grid_hw: Tuple[int, int],
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
):
  """The official `interpolate_pos_encoding`: the patch rows resized to the input's grid.

  Args:
    pos_embed: [1 + M*M, c] or [1, 1 + M*M, c]; row 0 is the class token's (never resized), rows
      1.. an M x M grid in row-major order.
    grid_hw: (h, w) patch grid of the input (image side / 14), square or not.
    interpolate_offset: see `pos_embed_matrices`.
    interpolate_antialias: see `pos_embed_matrices`.

  Returns:
    [1 + h*w, c] or [1, 1 + h*w, c] (the input's rank and dtype); the input itself when
    (h, w) == (M, M). Computed in the input's dtype (at least float32).
  """
  pos_embed = jnp.asarray(pos_embed)
  squeeze = pos_embed.ndim == 2
  pe = pos_embed if squeeze else pos_embed[0]
  n = pe.shape[0] - 1
  m = math.isqrt(n)
  if m * m != n:
    raise ValueError(f'pos_embed has {n} patch rows, not a square grid')
  mats = pos_embed_matrices(m, grid_hw, interpolate_offset, interpolate_antialias)
  if mats is None:
    return pos_embed
  dtype = jnp.promote_types(pe.dtype, jnp.float32)
  grid = pe[1:].reshape(m, m, -1).astype(dtype)
  rows, cols = (jnp.asarray(a, dtype) for a in mats)
  grid = jnp.einsum('hi,ijc->hjc', rows, grid, precision=jax.lax.Precision.HIGHEST)
  grid = jnp.einsum('wj,hjc->hwc', cols, grid, precision=jax.lax.Precision.HIGHEST)
  out = jnp.concatenate([pe[:1].astype(dtype), grid.reshape(-1, grid.shape[-1])], axis=0)
  out = out.astype(pe.dtype)
  return out if squeeze else out[None]


def swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
  """SwiGLU hidden width: two thirds of `int(C * mlp_ratio)`, rounded up to a multiple of 8."""
  h0 = int(embed_dim * mlp_ratio)
  return (int(h0 * 2 / 3) + 7) // 8 * 8


# ------------------------------------------------------------------------------------------------
# Modules.

_trunc02 = nn.initializers.truncated_normal(0.02)


class LayerScale(nn.Module):
  """Per-channel scale `gamma [c]` of a residual branch (`init_values` 1.0, as torch.hub)."""

  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return x * (gamma if self.dtype is None else gamma.astype(self.dtype))


class Attention(nn.Module):
  """Multi-head self-attention: `qkv` split `(3, heads, head_dim)`, scale `head_dim ** -0.5`."""

  num_heads: int
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    hd = c // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_trunc02)
    qkv = nn.Dense(3 * c, name='qkv', **kw)(x).reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Logits and softmax in at least float32 (a bfloat16 forward keeps bfloat16 matmul inputs).
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=acc) * (hd**-0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, c)
    return nn.Dense(c, name='proj', **kw)(out)


class FeedForward(nn.Module):
  """`mlp`: `fc1 -> exact GELU -> fc2`; `swiglu`: `w12 -> silu(x1) * x2 -> w3` (ViT-g)."""

  hidden: int
  ffn: str = 'mlp'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_trunc02)
    if self.ffn == 'mlp':
      y = jax.nn.gelu(nn.Dense(self.hidden, name='fc1', **kw)(x), approximate=False)
      return nn.Dense(c, name='fc2', **kw)(y)
    if self.ffn == 'swiglu':
      x12 = nn.Dense(2 * self.hidden, name='w12', **kw)(x)
      y = jax.nn.silu(x12[..., : self.hidden]) * x12[..., self.hidden :]
      return nn.Dense(c, name='w3', **kw)(y)
    raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")


def _layer_norm(dtype, param_dtype, name):
  return nn.LayerNorm(
      LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
  )


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale on both residual branches."""

  num_heads: int
  mlp_ratio: float = 4.0
  ffn: str = 'mlp'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[b, n, c] tokens -> [b, n, c]."""
    c = x.shape[-1]
    hidden = int(c * self.mlp_ratio) if self.ffn == 'mlp' else swiglu_hidden(c, self.mlp_ratio)
    dt, pdt = self.dtype, self.param_dtype
    y = Attention(self.num_heads, dt, pdt, name='attn')(_layer_norm(dt, pdt, 'norm1')(x))
    x = x + LayerScale(dt, pdt, name='ls1')(y)
    y = FeedForward(hidden, self.ffn, dt, pdt, name='mlp')(_layer_norm(dt, pdt, 'norm2')(x))
    return x + LayerScale(dt, pdt, name='ls2')(y)


def check_layers(layers: Sequence[int], depth: int) -> Tuple[int, ...]:
  """Block indices, validated and ascending (the official `get_intermediate_layers` order)."""
  layers = tuple(int(i) for i in layers)
  if len(set(layers)) != len(layers):
    raise ValueError(f'duplicate block index in layers={layers}')
  bad = [i for i in layers if not 0 <= i < depth]
  if bad:
    raise ValueError(f'block indices {bad} outside [0, {depth}) (0-based, no negatives)')
  return tuple(sorted(layers))


class DINOv2(nn.Module):
  """The DINOv2 ViT (`DinoVisionTransformer` of torch.hub: `block_chunks=0`, `init_values=1`).

  Attributes:
    embed_dim: C.
    depth: number of blocks.
    num_heads: attention heads (C / heads = 64 in every release).
    patch_size: 14.
    mlp_ratio: feed-forward width / C.
    num_register_tokens: R (0, or 4 for the `_reg` models).
    ffn: 'mlp' (GELU) or 'swiglu' (ViT-g).
    img_size: training image side; the positional embedding covers an (img_size / patch_size)^2
      grid (37 x 37 for 518).
    interpolate_offset: positional-embedding resize offset (0.1; 0.0 for `_reg`).
    interpolate_antialias: antialiased resize (`_reg`).
    dtype: compute dtype; None follows inputs and parameters (float64 in, float64 forward).
      Attention logits and softmax run in at least float32.
    param_dtype: parameter dtype at initialisation.
    remat: rematerialise each block in the backward pass (memory knob for fine-tuning).
  """

  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int = PATCH_SIZE
  mlp_ratio: float = 4.0
  num_register_tokens: int = 0
  ffn: str = 'mlp'
  img_size: int = 518
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  remat: bool = False

  @property
  def native_grid(self) -> int:
    return self.img_size // self.patch_size

  @nn.compact
  def __call__(
      self,
      images,
      layers: Optional[Sequence[int]] = None,
      *,
      final: bool = True,
      frozen_blocks: Optional[int] = None,
  ):
    """Tokens of `images` after the final LayerNorm.

    Args:
      images: [b, H, W, 3] float, ImageNet-normalised; H and W multiples of `patch_size`.
      layers: 0-based block indices whose outputs (after the block's FFN residual) are also
        returned, passed through the final norm; any order, returned ascending.
      final: False runs only blocks `0 .. max(layers)` and returns only the intermediate
        outputs (a feature extractor; later blocks get no parameters).
      frozen_blocks: None: gradients reach every parameter. k >= 0: `stop_gradient` on the
        tokens after the first k blocks (k = 0: after the patch embedding, class token,
        positional embedding and registers), so nothing before gets a gradient or is kept for
        the backward pass.

    Returns:
      dict: `cls_token` [b, C], `register_tokens` [b, R, C], `patch_tokens` [b, h, w, C]
      (h, w = H / p, W / p; omitted when `final` is False) and, with `layers`, `intermediate`
      (tuple of [b, h, w, C]) and `intermediate_cls` (tuple of [b, C]).
    """
    b, height, width, _ = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'image sides {height}x{width} must be multiples of the patch size {p}')
    h, w = height // p, width // p
    c, r, m = self.embed_dim, self.num_register_tokens, self.native_grid
    dt, pdt = self.dtype, self.param_dtype
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, c), pdt)
    pos_embed = self.param('pos_embed', _trunc02, (1, 1 + m * m, c), pdt)
    if r:
      registers = self.param('register_tokens', nn.initializers.normal(1e-6), (1, r, c), pdt)
    x = nn.Conv(
        c, (p, p), strides=(p, p), padding='VALID', dtype=dt, param_dtype=pdt, name='patch_embed'
    )(images)
    x = x.reshape(b, h * w, c)
    cast = (lambda a: a) if dt is None else (lambda a: a.astype(dt))
    x = jnp.concatenate([jnp.broadcast_to(cast(cls_token), (b, 1, c)).astype(x.dtype), x], 1)
    pos = interpolate_pos_embed(
        pos_embed, (h, w), self.interpolate_offset, self.interpolate_antialias
    )
    x = x + cast(pos)
    if r:
      x = jnp.concatenate(
          [x[:, :1], jnp.broadcast_to(cast(registers), (b, r, c)).astype(x.dtype), x[:, 1:]], axis=1
      )
    layers = () if layers is None else check_layers(layers, self.depth)
    if not final and not layers:
      raise ValueError('final=False needs layers')
    last = self.depth if final else layers[-1] + 1
    block = nn.remat(Block) if self.remat else Block
    norm = _layer_norm(dt, pdt, 'norm')

    def outputs(tokens):
      tokens = norm(tokens)
      return tokens[:, 0], tokens[:, 1 : 1 + r], tokens[:, 1 + r :].reshape(b, h, w, c)

    frozen = -1 if frozen_blocks is None else int(frozen_blocks)
    inter, inter_cls = [], []
    for i in range(last):
      if i == frozen:
        x = jax.lax.stop_gradient(x)
      x = block(self.num_heads, self.mlp_ratio, self.ffn, dt, pdt, name=f'blocks_{i}')(x)
      if i in layers:
        # The output of a frozen block takes no gradient into the blocks before it either.
        cls_i, _, patches_i = outputs(jax.lax.stop_gradient(x) if i < frozen else x)
        inter.append(patches_i)
        inter_cls.append(cls_i)
    if frozen >= last:
      x = jax.lax.stop_gradient(x)
    out = {}
    if final:
      cls_f, reg_f, patches_f = outputs(x)
      out.update(cls_token=cls_f, register_tokens=reg_f, patch_tokens=patches_f)
    if layers:
      out.update(intermediate=tuple(inter), intermediate_cls=tuple(inter_cls))
    return out


def is_trained(path: Tuple[str, ...], blocks_run: int, trained_blocks: int) -> bool:
  """Whether a DINOv2 parameter is trained when the last `trained_blocks` blocks are.

  The partition that matches `DINOv2.__call__(..., frozen_blocks=blocks_run - trained_blocks)`
  (`SCorrSAN` with `dinov2_trained_blocks`): blocks `blocks_run - trained_blocks ..` and the final
  `norm` are trained; the patch embedding, tokens and positional embedding only when every block
  run is.

  Args:
    path: the parameter's path inside the DINOv2 module, e.g. `('blocks_3', 'attn', 'qkv',
      'kernel')`.
    blocks_run: blocks the model runs (the last used block + 1).
    trained_blocks: 0 = frozen.
  """
  if trained_blocks <= 0:
    return False
  if trained_blocks >= blocks_run or path[0] == 'norm':
    return True
  if path[0].startswith('blocks_'):
    return int(path[0][len('blocks_') :]) >= blocks_run - trained_blocks
  return False


def from_preset(name: str, **overrides) -> DINOv2:
  """`DINOv2(**PRESETS[name], **overrides)`, naming the presets on a typo."""
  if name not in PRESETS:
    raise ValueError(f'unknown DINOv2 preset {name!r}; known: {", ".join(PRESETS)}')
  return DINOv2(**{**PRESETS[name], **overrides})
