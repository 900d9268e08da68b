"""The network of a config: `config.model` -> `SCorrSAN` (the one place that reads those keys),
and its initial variables (`init_variables`: fresh, or a pretrained backbone)."""

from __future__ import annotations

import pathlib
from typing import Tuple

import flax
import jax
import jax.numpy as jnp

from sccorr_jax import convert
from sccorr_jax.models.scorrsan import SCorrSAN

_MODEL_KEYS = (
    'sce_kernel_size',
    'sce_features',
    'feature_size',
    'backbone_depth',
    'stage_sizes',
    'backbone_width',
    'backbone_stages',
    'use_context',
    'use_mutual_nn',
    'beta',
    'target_chunks',
    'remat_backbone',
)


def build_model(config) -> SCorrSAN:
  """The `SCorrSAN` of `config.model` (a full config or its `model` section; dict or ConfigDict).

  Keys used: `sce_kernel_size`, `sce_features`, `feature_size` (0 or None: the correlation's
  own grid, no upsampling), `backbone_depth`, `stage_sizes`,
  `backbone_width`, `backbone_stages`, `use_context`, `use_mutual_nn`, `beta`, `dtype` (a name
  such as 'bfloat16' or None), `target_chunks`, `remat_backbone`; missing keys keep the model's
  defaults. DINOv2 (issue 12): `backbone` ('resnet' or 'dinov2'), `dinov2_preset`,
  `dinov2_layers` (a block index or a tuple), `dinov2_trained_blocks`, `dinov2_overrides` (a
  mapping of DINOv2 constructor kwargs replacing the preset's; tests use tiny ViTs), `inputs`
  ('images', or 'features' for the head alone on cached features).
  """
  m = config.get('model', config) if hasattr(config, 'get') else config.model
  kwargs = {}
  for key in _MODEL_KEYS:
    if key in m:
      kwargs[key] = m[key]
  if not kwargs.get('feature_size'):  # 0 or None: no upsampling (the stride-16 loss).
    kwargs['feature_size'] = None
  if kwargs.get('stage_sizes') is not None:
    kwargs['stage_sizes'] = tuple(int(s) for s in kwargs['stage_sizes'])
  if m.get('dtype') is not None:
    kwargs['dtype'] = jnp.dtype(m['dtype'])
  backbone = m.get('backbone') or 'resnet'
  if backbone == 'dinov2':
    kwargs['backbone_type'] = 'dinov2'
    for key in ('dinov2_preset', 'dinov2_trained_blocks'):
      if m.get(key) is not None:
        kwargs[key] = m[key]
    layers = m.get('dinov2_layers')
    if layers is not None:
      kwargs['dinov2_layers'] = (
          int(layers) if isinstance(layers, int) else tuple(int(i) for i in layers)
      )
    overrides = m.get('dinov2_overrides')
    if overrides:
      kwargs['dinov2_overrides'] = tuple(sorted(dict(overrides).items()))
  if m.get('inputs', 'images') != 'images':  # 'features': the head on cached features.
    kwargs['inputs'] = m['inputs']
  if backbone not in ('resnet', 'dinov2'):
    raise ValueError(f"model.backbone must be 'resnet' or 'dinov2', got {backbone!r}")
  return SCorrSAN(**kwargs)


def input_shape(model: SCorrSAN, img_size: int) -> Tuple[int, int, int]:
  """One input of `model` for `img_size`-pixel images, without the batch axis.

  `(S, S, 3)` images, or for `inputs='features'` (the head on cached DINOv2 features) the
  frozen backbone's patch tokens `(S / 14, S / 14, embed_dim * number of blocks used)`.
  """
  s = int(img_size)
  if getattr(model, 'inputs', 'images') != 'features':
    return (s, s, 3)
  kwargs = model.dinov2_kwargs()
  grid = s // int(kwargs.get('patch_size', 14))
  return (grid, grid, int(kwargs['embed_dim']) * len(model.dinov2_blocks()))


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def pretrained_path(path) -> pathlib.Path:
  """`model.pretrained` as a file: as given, or else relative to the repository root (the
  shipped trunk, `configs/demo.py`, is named that way and loads from any directory)."""
  path = pathlib.Path(path).expanduser()
  if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
    return REPO_ROOT / path
  return path


def _load_pretrained(config, model, variables):
  """Backbone from a torchvision state dict file, head kept from `variables`."""
  path = pretrained_path(config.model.pretrained)
  state_dict = convert.read_state_dict(path)
  return convert.from_torch_state_dict(state_dict, model, init_variables=variables)


def init_variables(config, model, rng, num_models: int):
  """Initial `{'params', 'batch_stats'}` of `num_models` models (stacked if 2).

  Each model gets its own initialisation key; with `model.pretrained` every model starts from the
  same pretrained backbone and keeps its own head initialisation (the reference).
  """
  x = jnp.zeros((1, *input_shape(model, config.data.img_size)), jnp.float32)
  keys = jax.random.split(rng, num_models)
  out = []
  for k in keys:
    v = flax.core.unfreeze(jax.jit(model.init)(k, x, x))
    v.setdefault('batch_stats', {})
    if config.model.get('pretrained') and model.inputs == 'images':  # Features: no backbone.
      v = _load_pretrained(config, model, v)
      v = jax.tree.map(jnp.asarray, v)
    out.append(v)
  if num_models == 1:
    return out[0]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *out)
