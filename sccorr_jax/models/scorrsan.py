"""SCorrSAN: images -> dense flow (paper Sec. 3.1-3.2, Fig. 2). Composition only.

`ResNet (layer3, pre-ReLU, stride 16) -> spatial context encoder -> L2 norm + 4D correlation ->
mutual-NN filter -> align-corners 4x upsampling -> soft-argmax (beta 0.02, trainable coordinate
vectors) -> flow`.

The backbone is a choice (`backbone_type`): the paper's ResNet, or DINOv2 (issue 12), whose patch
tokens of one or more blocks (after the final LayerNorm, concatenated over channels) form an
image/14 feature grid; the head is the same. Only the blocks up to the last one used are built
and run; the last `dinov2_trained_blocks` of them are trained, and a `stop_gradient` below them
keeps the frozen part out of the backward pass (`schedules.param_groups` gives the frozen
parameters no updates).

Differences from the reference's code, none of which change the numbers: source and target go
through the backbone in one batched call (BatchNorm statistics stay separate per image set in
training mode, as the reference's two calls); layer4 is not computed; the upsampling and the
soft-argmax are fused (optionally chunked over target rows); the reference's float32 cast in the
flow conversion is not applied.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sccorr_jax.models import backbone as backbone_lib
from sccorr_jax.models import dinov2 as dinov2_lib
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
    backbone_type: 'resnet' (the paper's) or 'dinov2'.
    dinov2_preset: a `dinov2.PRESETS` name ('vits14', 'vitb14_reg', ...).
    dinov2_layers: block index or indices (0-based; negative counts from the end) whose patch
      tokens, after the final norm, are concatenated as the feature; None: the last block.
    dinov2_trained_blocks: how many of the last blocks run are trained (with the final norm);
      0 freezes the backbone; at least the number of blocks run trains everything (embeddings
      included).
    dinov2_overrides: `(name, value)` pairs replacing preset entries (tests use tiny ViTs).
    inputs: 'images', or 'features': the inputs are a frozen backbone's features (a feature
      cache, `sccorr_jax.data.cache_features`) and only the head is built and run; its
      variables are the full model's without `backbone`.
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
  backbone_type: str = "resnet"
  dinov2_preset: str = "vits14"
  dinov2_layers: Union[None, int, Sequence[int]] = None
  dinov2_trained_blocks: int = 0
  dinov2_overrides: Tuple[Tuple[str, Any], ...] = ()
  inputs: str = "images"

  def setup(self):
    if self.inputs not in ("images", "features"):
      raise ValueError(f"inputs must be 'images' or 'features', got {self.inputs!r}")
    if self.inputs == "features":  # The head alone: no backbone variables.
      pass
    elif self.backbone_type == "dinov2":
      self.backbone = dinov2_lib.DINOv2(
          **self.dinov2_kwargs(),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          remat=self.remat_backbone,
      )
    elif self.backbone_type == "resnet":
      kwargs = {} if self.stage_sizes is None else {"stage_sizes": tuple(self.stage_sizes)}
      self.backbone = backbone_lib.resnet(
          self.backbone_depth,
          num_stages=self.backbone_stages,
          width=self.backbone_width,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          remat=self.remat_backbone,
          **kwargs,
      )
    else:
      raise ValueError(f"backbone_type must be 'resnet' or 'dinov2', got {self.backbone_type!r}")
    if self.use_context:
      self.sce = context.SpatialContextEncoder(
          self.sce_kernel_size, self.sce_features, dtype=self.dtype, param_dtype=self.param_dtype
      )
    if self.feature_size is not None:
      self.x_normal = self.param("x_normal", _linspace_init, (self.feature_size,), jnp.float32)
      self.y_normal = self.param("y_normal", _linspace_init, (self.feature_size,), jnp.float32)

  def __call__(self, src_img, trg_img, train: bool = False, return_aux: bool = False):
    """Predicts the flow from every target cell to its source match.

    Args:
      src_img: [b, H, W, 3] source images, ImageNet-normalised (H, W multiples of 16; of 14
        for DINOv2).
      trg_img: [b, H, W, 3] target images, same size.
      train: BatchNorm uses batch statistics (separately for the source and the target batch)
        and updates the running ones; apply with `mutable=['batch_stats']`.
      return_aux: also return intermediate tensors.

    Returns:
      flow [b, S, S, 2], (x, y) displacement target -> source in cells of the S grid
      (S = feature_size), or `(flow, aux)` with aux keys `src_feat`, `trg_feat` ([b, H/16, W/16,
      c] backbone; [b, H/14, W/14, c] DINOv2), `src_ctx`, `trg_ctx` (context encoder), `corr`
      (filtered [b, hs, ws, ht, wt]) and `src_backbone`, `trg_backbone` (the backbone's aux
      dicts; DINOv2: `block<i>` patch tokens of each used block).
    """
    if src_img.shape != trg_img.shape:
      raise ValueError(
          f"source and target batches must have one shape, got {src_img.shape} "
          f"and {trg_img.shape}"
      )
    if self.inputs == "features":  # Cached features [b, h, w, c]: the head only.
      flow, aux = self.head(src_img, trg_img, return_aux=True)
      return (flow, dict(aux, src_feat=src_img, trg_feat=trg_img)) if return_aux else flow
    b = src_img.shape[0]
    images = jnp.concatenate([src_img, trg_img], axis=0)
    if self.backbone_type == "dinov2":
      feats, bb_aux = self._dinov2_features(images)
    else:
      feats, bb_aux = self.backbone(images, train=train, num_groups=2)
    src_feat, trg_feat = feats[:b], feats[b:]
    flow, aux = self.head(src_feat, trg_feat, return_aux=True)
    if not return_aux:
      return flow
    aux.update(
        src_feat=src_feat,
        trg_feat=trg_feat,
        src_backbone={k: v[:b] for k, v in bb_aux.items()},
        trg_backbone={k: v[b:] for k, v in bb_aux.items()},
    )
    return flow, aux

  def dinov2_kwargs(self) -> dict:
    """The DINOv2 constructor kwargs: the preset with `dinov2_overrides` applied."""
    if self.dinov2_preset not in dinov2_lib.PRESETS:
      raise ValueError(
          f"unknown DINOv2 preset {self.dinov2_preset!r}; known: "
          f"{', '.join(dinov2_lib.PRESETS)}"
      )
    return {**dinov2_lib.PRESETS[self.dinov2_preset], **dict(self.dinov2_overrides)}

  def dinov2_blocks(self) -> Tuple[int, ...]:
    """The DINOv2 blocks whose tokens form the feature: 0-based, ascending."""
    depth = int(self.dinov2_kwargs()["depth"])
    layers = self.dinov2_layers
    if layers is None:
      layers = (depth - 1,)
    elif isinstance(layers, int):
      layers = (layers,)
    return dinov2_lib.check_layers([i + depth if i < 0 else i for i in layers], depth)

  def dinov2_frozen_blocks(self) -> Optional[int]:
    """`frozen_blocks` of the DINOv2 call (None: everything trained)."""
    run = self.dinov2_blocks()[-1] + 1
    n = int(self.dinov2_trained_blocks)
    return None if n >= run else run - max(n, 0)

  def _dinov2_features(self, images):
    """[2b, H, W, 3] -> ([2b, H/14, W/14, sum of C over the used blocks], aux)."""
    layers = self.dinov2_blocks()
    out = self.backbone(images, layers, final=False, frozen_blocks=self.dinov2_frozen_blocks())
    feats = jnp.concatenate(out["intermediate"], axis=-1)
    if int(self.dinov2_trained_blocks) <= 0:  # Frozen: not even the final norm gets gradients.
      feats = jax.lax.stop_gradient(feats)
    return feats, {f"block{i}": t for i, t in zip(layers, out["intermediate"])}

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
      flow = flow_lib.soft_argmax_flow(
          corr, x_coords, y_coords, self.beta, self.kernel_soft_argmax_sigma
      )
    else:
      flow = flow_lib.upsampled_soft_argmax_flow(
          corr,
          self.feature_size,
          self.x_normal,
          self.y_normal,
          self.beta,
          self.kernel_soft_argmax_sigma,
          self.target_chunks,
      )
    if return_aux:
      return flow, dict(src_ctx=src_ctx, trg_ctx=trg_ctx, corr=corr)
    return flow

  def peak_mass(self, corr, radius: float = 2.0):
    """How peaked the soft-argmax of each flow cell is (`flow.upsampled_peak_mass`).

    Apply with `method='peak_mass'` on the model's variables; reads only the coordinate
    vectors. The pseudo-label confidence gate of `train_step` (`teacher.gate='confidence'`).

    Args:
      corr: [b, hs, ws, ht, wt] the model's filtered correlation (`aux['corr']` of a call
        with `return_aux=True`).
      radius: in source cells of the flow grid.

    Returns:
      [b, S, S] soft-argmax probability mass within `radius` of each target cell's expected
      match (S = feature_size, or the correlation's own square grid when it is None).
    """
    size = self.feature_size
    if size is None:
      _, hs, ws, _, _ = corr.shape
      if hs != ws:
        raise ValueError(f"peak_mass without upsampling needs a square grid, got {hs}x{ws}")
      coords = jnp.linspace(-1.0, 1.0, hs, dtype=corr.dtype)
      return flow_lib.upsampled_peak_mass(corr, hs, coords, coords, self.beta, radius)
    return flow_lib.upsampled_peak_mass(corr, size, self.x_normal, self.y_normal, self.beta, radius)


def _linspace_init(key, shape, dtype=jnp.float32):
  """The reference's coordinate vectors: `linspace(-1, 1, n)` as float32 (trainable)."""
  del key
  return jnp.linspace(-1.0, 1.0, shape[0], dtype=jnp.float32).astype(dtype)
