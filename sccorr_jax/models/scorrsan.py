"""SCorrSAN: images -> dense flow (paper Sec. 3.1-3.2, Fig. 2). Composition only.

`ResNet (layer3, pre-ReLU, stride 16) -> spatial context encoder -> L2 norm + 4D correlation ->
mutual-NN filter -> align-corners 4x upsampling -> soft-argmax (beta 0.02, trainable coordinate
vectors) -> flow`.

Differences from the reference's code, none of which change the numbers: source and target go
through the backbone in one batched call (BatchNorm statistics stay separate per image set in
training mode, as the reference's two calls); layer4 is not computed; the upsampling and the
soft-argmax are fused (optionally chunked over target rows); the reference's float32 cast in the
flow conversion is not applied.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sccorr_jax.models import backbone as backbone_lib
from sccorr_jax.models import context
from sccorr_jax.models import correlation
from sccorr_jax.models import flow as flow_lib


class SCorrSAN(nn.Module):
  """The SCorrSAN network.

  Attributes:
    sce_kernel_size: context encoder kernel k (7 for SPair-71k, 13 for PF-PASCAL).
    sce_features: context encoder output channels (2048 for SPair-71k, 1024 for PF-PASCAL).
    feature_size: side S of the output flow grid (64: the 16x16 correlation upsampled 4x).
      `None` keeps the correlation's own grid (no upsampling; the paper's stride-16 ablation).
    backbone_depth: ResNet depth (18/34/50/101/152).
    stage_sizes: overrides the depth's blocks per stage (tests use (1, 1, 1, 1)).
    backbone_width: stem channels (64; tests may shrink it).
    backbone_stages: ResNet stages run (3: layer3, stride 16, the reference; 2: layer2, stride 8,
      used by the small CPU demo).
    use_context: the spatial context encoder on/off (paper Table 4 ablation); off correlates the
      raw backbone features.
    use_mutual_nn: the mutual-NN filter on/off.
    beta: soft-argmax temperature.
    kernel_soft_argmax_sigma: SFNet's kernel soft-argmax width (None = off, as the reference).
    dtype: compute dtype (None: promote inputs and parameters, so float64 weights and images give
      a float64 forward). The correlation, softmax and flow are computed in at least float32.
    target_chunks: chunks of target rows for the fused upsampling + soft-argmax (memory knob).
    remat_backbone: rematerialise backbone blocks in the backward pass (memory knob).
  """
  sce_kernel_size: int = 7
  sce_features: int = 2048
  feature_size: Optional[int] = 64
  backbone_depth: int = 101
  stage_sizes: Optional[Sequence[int]] = None
  backbone_width: int = 64
  backbone_stages: int = 3
  use_context: bool = True
  use_mutual_nn: bool = True
  beta: float = flow_lib.SOFTMAX_BETA
  kernel_soft_argmax_sigma: Optional[float] = None
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  target_chunks: int = 1
  remat_backbone: bool = False

  def setup(self):
    kwargs = {} if self.stage_sizes is None else {"stage_sizes": tuple(self.stage_sizes)}
    self.backbone = backbone_lib.resnet(self.backbone_depth, num_stages=self.backbone_stages,
                                        width=self.backbone_width, dtype=self.dtype,
                                        param_dtype=self.param_dtype,
                                        remat=self.remat_backbone, **kwargs)
    if self.use_context:
      self.sce = context.SpatialContextEncoder(self.sce_kernel_size, self.sce_features,
                                               dtype=self.dtype, param_dtype=self.param_dtype)
    if self.feature_size is not None:
      self.x_normal = self.param("x_normal", _linspace_init, (self.feature_size,), jnp.float32)
      self.y_normal = self.param("y_normal", _linspace_init, (self.feature_size,), jnp.float32)

  def __call__(self, src_img, trg_img, train: bool = False, return_aux: bool = False):
    """Predicts the flow from every target cell to its source match.

    Args:
      src_img: [b, H, W, 3] source images, ImageNet-normalised (H, W multiples of 16).
      trg_img: [b, H, W, 3] target images, same size.
      train: BatchNorm uses batch statistics (separately for the source and the target batch)
        and updates the running ones; apply with `mutable=['batch_stats']`.
      return_aux: also return intermediate tensors.

    Returns:
      flow [b, S, S, 2], (x, y) displacement target -> source in cells of the S grid
      (S = feature_size), or `(flow, aux)` with aux keys `src_feat`, `trg_feat` ([b, H/16, W/16,
      c] backbone), `src_ctx`, `trg_ctx` (context encoder), `corr` (filtered
      [b, hs, ws, ht, wt]) and `src_backbone`, `trg_backbone` (the backbone's aux dicts).
    """
    if src_img.shape != trg_img.shape:
      raise ValueError(f"source and target batches must have one shape, got {src_img.shape} "
                       f"and {trg_img.shape}")
    b = src_img.shape[0]
    feats, bb_aux = self.backbone(jnp.concatenate([src_img, trg_img], axis=0), train=train,
                                  num_groups=2)
    src_feat, trg_feat = feats[:b], feats[b:]
    flow, aux = self.head(src_feat, trg_feat, return_aux=True)
    if not return_aux:
      return flow
    aux.update(src_feat=src_feat, trg_feat=trg_feat,
               src_backbone={k: v[:b] for k, v in bb_aux.items()},
               trg_backbone={k: v[b:] for k, v in bb_aux.items()})
    return flow, aux

  def head(self, src_feat, trg_feat, return_aux: bool = False):
    """Everything after the backbone: features -> flow.

    Args:
      src_feat: [b, hs, ws, c] source backbone features.
      trg_feat: [b, ht, wt, c] target backbone features.
      return_aux: also return `src_ctx`, `trg_ctx`, `corr`.

    Returns:
      flow [b, S, S, 2] (S = feature_size, or ht x wt when feature_size is None).
    """
    if self.use_context:
      b = src_feat.shape[0]
      if src_feat.shape == trg_feat.shape:
        ctx = self.sce(jnp.concatenate([src_feat, trg_feat], axis=0))
        src_ctx, trg_ctx = ctx[:b], ctx[b:]
      else:
        src_ctx, trg_ctx = self.sce(src_feat), self.sce(trg_feat)
    else:
      src_ctx, trg_ctx = src_feat, trg_feat
    # Correlation and soft-argmax in at least float32: beta = 0.02 is a very sharp softmax.
    dtype = jnp.promote_types(src_ctx.dtype, jnp.float32)
    corr = correlation.correlate(src_ctx.astype(dtype), trg_ctx.astype(dtype))
    if self.use_mutual_nn:
      corr = correlation.mutual_nn_filter(corr)
    if self.feature_size is None:
      _, hs, ws, _, _ = corr.shape
      x_coords = jnp.linspace(-1.0, 1.0, ws, dtype=dtype)
      y_coords = jnp.linspace(-1.0, 1.0, hs, dtype=dtype)
      flow = flow_lib.soft_argmax_flow(corr, x_coords, y_coords, self.beta,
                                       self.kernel_soft_argmax_sigma)
    else:
      flow = flow_lib.upsampled_soft_argmax_flow(
          corr, self.feature_size, self.x_normal, self.y_normal, self.beta,
          self.kernel_soft_argmax_sigma, self.target_chunks)
    if return_aux:
      return flow, dict(src_ctx=src_ctx, trg_ctx=trg_ctx, corr=corr)
    return flow


def _linspace_init(key, shape, dtype=jnp.float32):
  """The reference's coordinate vectors: `linspace(-1, 1, n)` as float32 (trainable)."""
  del key
  return jnp.linspace(-1.0, 1.0, shape[0], dtype=jnp.float32).astype(dtype)
