"""PyTorch state dicts -> Flax variables of `sccorr_jax.models.SCorrSAN`.

Two kinds of state dict are understood, told apart by their keys:

* torchvision ResNet ImageNet weights (`conv1.weight`, `layer3.22.bn3.running_var`, ...): the
  backbone is filled from them; the head (context encoder, coordinate vectors) keeps the values of
  `init_variables` (a fresh initialisation if not given), as the reference does when it starts
  training from ImageNet weights.
* full reference SCorrSAN checkpoints (`feature_extraction.backbone.*`, `SCEs.0.conv.*`,
  `x_normal`, `y_normal`): every variable comes from the state dict.

The name table, Flax path <- PyTorch name (conv kernels OIHW -> HWIO; the context encoder's 1x1
conv `[O, I, 1, 1]` -> Dense kernel `[I, O]`):

    backbone/conv1/kernel                     conv1.weight
    backbone/bn1/{scale,bias}                 bn1.{weight,bias}
    batch_stats backbone/bn1/{mean,var}       bn1.running_{mean,var}
    backbone/layer{s}_{i}/conv{j}             layer{s}.{i}.conv{j}.weight
    backbone/layer{s}_{i}/bn{j}               layer{s}.{i}.bn{j}.*
    backbone/layer{s}_{i}/downsample_conv     layer{s}.{i}.downsample.0.weight
    backbone/layer{s}_{i}/downsample_bn       layer{s}.{i}.downsample.1.*
    sce/conv/{kernel,bias}                    SCEs.0.conv.{weight,bias}
    x_normal, y_normal                        x_normal, y_normal

Official DINOv2 torch-hub checkpoints (`pos_embed`, `blocks.<i>.attn.qkv.weight`, ...) map onto
`sccorr_jax.models.dinov2.DINOv2` with `from_dinov2_state_dict` (name table in its section
below); `from_torch_state_dict` routes them there for a SCorrSAN with the DINOv2 backbone.

Keys the port does not use are ignored, exactly: `layer4.*`, `fc.*`, `*.num_batches_tracked`
(with or without the `feature_extraction.backbone.` prefix). Anything else unexpected, anything
missing, or a shape mismatch raises `ConversionError` listing every problem.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

BACKBONE_PREFIX = "feature_extraction.backbone."
_IGNORED = re.compile(r"^(feature_extraction\.backbone\.)?(layer4\.|fc\.)|\.num_batches_tracked$")


class ConversionError(ValueError):
  """A state dict does not fit the model; the message lists every problem."""


def _torch_name(path: Tuple[str, ...], collection: str) -> Tuple[str, str]:
  """Flax `(collection, path)` -> (PyTorch name without prefix, kind of transform)."""
  leaf = path[-1]
  if path[0] in ("x_normal", "y_normal"):
    return path[0], "copy"
  if path[0] == "sce":
    return f"SCEs.0.conv.{'weight' if leaf == 'kernel' else 'bias'}", (
        "dense" if leaf == "kernel" else "copy"
    )
  assert path[0] == "backbone", path
  parts = []
  for p in path[1:-1]:
    m = re.fullmatch(r"layer(\d+)_(\d+)", p)
    if m:
      parts += [f"layer{m.group(1)}", m.group(2)]
    elif p == "downsample_conv":
      parts += ["downsample", "0"]
    elif p == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(p)
  module = ".".join(parts)
  if collection == "batch_stats":
    return f"{module}.running_{leaf}", "copy"
  if leaf == "kernel":
    return f"{module}.weight", "conv"
  return f"{module}.{'weight' if leaf == 'scale' else 'bias'}", "copy"


def _transform(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(arr, (2, 3, 1, 0))
  if kind == "dense":
    if arr.ndim == 4:
      arr = arr[:, :, 0, 0]
    return np.transpose(arr, (1, 0))
  return arr


def abstract_variables(model, img_size: int = 64) -> Dict[str, Any]:
  """Shapes and dtypes of `model`'s variables, without computing anything."""
  x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b), x, x)


def _raise_if_unfit(what: str, missing, unexpected, mismatched) -> None:
  """ConversionError listing every missing key, unexpected key and shape mismatch, if any."""
  if not (missing or unexpected or mismatched):
    return
  lines = [f"state dict does not fit {what}:"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  if mismatched:
    lines.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched))
  raise ConversionError("\n".join(lines))


def _take(sd, name: str, kind: str, leaf, where: str, used: set, missing: list, mismatched: list):
  """The state dict's `name`, converted (`kind`) to the Flax leaf's layout, or None.

  Records the name as used, or as missing, or its shape mismatch (naming `where` in the model).
  """
  if name not in sd:
    missing.append(name)
    return None
  used.add(name)
  arr = _transform(np.asarray(sd[name]), kind)
  if tuple(arr.shape) != tuple(leaf.shape):
    mismatched.append(
        f"{name}: state dict {tuple(np.asarray(sd[name]).shape)} -> "
        f"{tuple(arr.shape)}, model expects {tuple(leaf.shape)} (at {where})"
    )
    return None
  return arr


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    model,
    init_variables: Optional[Mapping[str, Any]] = None,
    dtype=None,
) -> Dict[str, Any]:
  """Maps a PyTorch state dict (name -> array) onto `model`'s variables.

  Args:
    state_dict: name -> numpy-convertible array: a torchvision ResNet state dict or a full
      reference SCorrSAN one (see the module docstring for the name table).
    model: a `sccorr_jax.models.SCorrSAN`.
    init_variables: for backbone-only (torchvision) state dicts, where the head variables come
      from; default a fresh `model.init` with `PRNGKey(0)`.
    dtype: cast every array to this dtype (default: keep the state dict's).

  Returns:
    `{'params': ..., 'batch_stats': ...}` as nested dicts of numpy arrays.

  Raises:
    ConversionError: listing missing keys, unexpected keys and shape mismatches.
  """
  if getattr(model, "backbone_type", "resnet") == "dinov2":
    return _scorrsan_from_dinov2(state_dict, model, init_variables, dtype)
  sd = {str(k): v for k, v in state_dict.items()}
  full = any(k.startswith(BACKBONE_PREFIX) for k in sd)
  target = flax.core.unfreeze(abstract_variables(model))
  flat = flax.traverse_util.flatten_dict(target)
  used, missing, mismatched = set(), [], []
  out = {}
  head_from_init = {}
  for (collection, *path), leaf in flat.items():
    path = tuple(path)
    name, kind = _torch_name(path, collection)
    if path[0] == "backbone":
      name = (BACKBONE_PREFIX if full else "") + name
    elif not full:
      head_from_init[(collection,) + path] = leaf
      continue
    arr = _take(sd, name, kind, leaf, f"{collection}/{'/'.join(path)}", used, missing, mismatched)
    if arr is not None:
      out[(collection,) + path] = arr if dtype is None else arr.astype(dtype)
  unexpected = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
  _raise_if_unfit(
      f"{type(model).__name__} "
      f"({'full SCorrSAN' if full else 'torchvision backbone'} checkpoint)",
      missing,
      unexpected,
      mismatched,
  )
  if head_from_init:
    if init_variables is None:
      x = jnp.zeros((1, 64, 64, 3), jnp.float32)
      init_variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, x)
    init_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_variables))
    for key in head_from_init:
      arr = np.asarray(init_flat[key])
      out[key] = arr if dtype is None else arr.astype(dtype)
  return flax.traverse_util.unflatten_dict(out)


def to_torch_state_dict(variables: Mapping[str, Any], model) -> Dict[str, np.ndarray]:
  """Inverse of `from_torch_state_dict` for a full SCorrSAN (reference names, NCHW/OIHW)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  sd = {}
  for (collection, *path), leaf in flat.items():
    name, kind = _torch_name(tuple(path), collection)
    if path[0] == "backbone":
      name = BACKBONE_PREFIX + name
    arr = np.asarray(leaf)
    if kind == "conv":
      arr = np.transpose(arr, (3, 2, 0, 1))
    elif kind == "dense":
      arr = np.transpose(arr, (1, 0))[:, :, None, None]
    sd[name] = arr
  del model
  return sd


def backbone_state_dict(variables: Mapping[str, Any], model) -> Dict[str, np.ndarray]:
  """The ResNet backbone of `variables` as a torchvision state dict (`conv1.weight`,
  `layer1.0.bn1.running_mean`, ...): what `from_torch_state_dict` reads as ImageNet weights.

  Parameters and BatchNorm running statistics; the head (context encoder, coordinate vectors)
  is left out, so that a model loading it starts its head fresh.
  """
  full = to_torch_state_dict(variables, model)
  return {k[len(BACKBONE_PREFIX) :]: v for k, v in full.items() if k.startswith(BACKBONE_PREFIX)}


def read_state_dict(path) -> Dict[str, np.ndarray]:
  """Reads a state dict from `.npz`, `.safetensors` or (needs PyTorch) `.pth`/`.pt`.

  Args:
    path: the file. A `.pth` may hold the state dict itself or a dict with a `state_dict` or
      `model` entry (the reference's training checkpoints use `state_dict`).

  Returns:
    name -> numpy array.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: an unknown extension or a file that holds no state dict, naming the file.
    ImportError: a `.pth` file without PyTorch installed, saying how to get it or convert.
  """
  import pathlib

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no state dict file at {path}")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))
  if suffix in (".pth", ".pt", ".bin", ".ckpt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"reading {path} needs PyTorch (pip install torch), or convert it elsewhere to .npz "
          "(numpy.savez(out, **{k: v.numpy() for k, v in sd.items()})) or .safetensors"
      ) from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "net"):
      if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
        break
    if not isinstance(obj, dict):
      raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    # DataParallel checkpoints prefix every name with 'module.'.
    return {
        k[len("module.") :] if k.startswith("module.") else k: v.detach().cpu().numpy()
        for k, v in obj.items()
        if hasattr(v, "detach")
    }
  raise ValueError(
      f"{path}: unknown state dict format {suffix!r} (use .pth, .npz or " ".safetensors)"
  )


# ------------------------------------------------------------------------------------------------
# DINOv2 (official torch-hub checkpoints `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`).
#
# Name table, Flax path (under the `DINOv2` module) <- PyTorch name (Linear weights (out, in) ->
# Dense kernel (in, out); the patch-embedding conv OIHW -> HWIO):
#
#     cls_token, pos_embed, register_tokens     same names, same shapes
#     patch_embed/{kernel,bias}                 patch_embed.proj.{weight,bias}
#     blocks_{i}/norm{1,2}/{scale,bias}         blocks.{i}.norm{1,2}.{weight,bias}
#     blocks_{i}/attn/{qkv,proj}/{kernel,bias}  blocks.{i}.attn.{qkv,proj}.{weight,bias}
#     blocks_{i}/ls{1,2}/gamma                  blocks.{i}.ls{1,2}.gamma
#     blocks_{i}/mlp/{fc1,fc2|w12,w3}/...       blocks.{i}.mlp.{fc1,fc2|w12,w3}.{weight,bias}
#     norm/{scale,bias}                         norm.{weight,bias}
#
# `mask_token` (masked-image-modelling only) is ignored. Training-config checkpoints with
# `block_chunks > 0` name blocks `blocks.<chunk>.<i>.`; they are read as `blocks.<i>.`.

DINOV2_IGNORED = ("mask_token",)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _dinov2_torch_name(path: Tuple[str, ...]) -> Tuple[str, str]:
  """Flax param path of a `DINOv2` -> (PyTorch name, kind of transform)."""
  if len(path) == 1:
    return path[0], "copy"
  leaf = path[-1]
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"blocks_(\d+)", p)
    parts += (
        ["blocks", m.group(1)] if m else (["patch_embed", "proj"] if p == "patch_embed" else [p])
    )
  if leaf == "kernel":
    return ".".join(parts + ["weight"]), "conv" if path[0] == "patch_embed" else "dense"
  return ".".join(parts + [{"scale": "weight"}.get(leaf, leaf)]), "copy"


def _dinov2_params(
    state_dict: Mapping[str, Any],
    target_params: Mapping[str, Any],
    dtype=None,
    what: str = "DINOv2",
    ignore_blocks_after: Optional[int] = None,
) -> Dict[str, Any]:
  """Fills `target_params` (a DINOv2 param tree of ShapeDtypeStructs) from a state dict.

  `ignore_blocks_after`: the last block a truncated feature extractor runs; the checkpoint's
  later blocks are ignored (as the ResNet's layer4). `mask_token` is always ignored.
  """
  sd = {}
  for k, v in state_dict.items():
    k = str(k)
    m = _CHUNKED_BLOCK.match(k)
    sd[f"blocks.{m.group(1)}." + k[m.end() :] if m else k] = v
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(target_params))
  used, missing, mismatched, out = set(), [], [], {}
  for path, leaf in flat.items():
    name, kind = _dinov2_torch_name(tuple(path))
    arr = _take(sd, name, kind, leaf, "/".join(path), used, missing, mismatched)
    if arr is not None:
      out[tuple(path)] = arr if dtype is None else arr.astype(dtype)

  def ignored(k):
    m = re.match(r"blocks\.(\d+)\.", k)
    return k in DINOV2_IGNORED or bool(
        m and ignore_blocks_after is not None and int(m.group(1)) > ignore_blocks_after
    )

  unexpected = sorted(k for k in sd if k not in used and not ignored(k))
  _raise_if_unfit(
      f"{what} (official DINOv2 checkpoint names expected)", missing, unexpected, mismatched
  )
  return flax.traverse_util.unflatten_dict(out)


def is_dinov2_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the names are those of an official DINOv2 checkpoint (`pos_embed`, `blocks.0...`)."""
  keys = set(map(str, state_dict))
  return "pos_embed" in keys and "patch_embed.proj.weight" in keys


def from_dinov2_state_dict(state_dict: Mapping[str, Any], model, dtype=None) -> Dict[str, Any]:
  """Maps an official DINOv2 state dict onto a `sccorr_jax.models.dinov2.DINOv2`.

  Args:
    state_dict: name -> numpy-convertible array, the torch-hub names
      (`dinov2_vits14_pretrain.pth`, ..., `dinov2_vitg14_reg4_pretrain.pth`; name table above).
    model: the `DINOv2` (its `img_size` fixes the `pos_embed` shape, `[1, 1 + (img_size/14)^2,
      C]`).
    dtype: cast every array to this dtype (default: keep the state dict's).

  Returns:
    `{'params': ...}`, nested dicts of numpy arrays.

  Raises:
    ConversionError: listing every missing key, unexpected key and shape mismatch (`mask_token`
      is ignored).
  """
  p = int(model.patch_size)
  x = jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32)
  target = jax.eval_shape(lambda a: model.init(jax.random.PRNGKey(0), a), x)
  params = _dinov2_params(
      state_dict,
      target["params"],
      dtype,
      what=f"DINOv2(embed_dim={model.embed_dim}, depth={model.depth})",
  )
  return {"params": params}


def _scorrsan_from_dinov2(state_dict, model, init_variables, dtype) -> Dict[str, Any]:
  """SCorrSAN with the DINOv2 backbone: backbone from the official checkpoint, head from init.

  Only the blocks the model runs exist in it; the checkpoint's later blocks are ignored.
  """
  size = 4 * int(model.dinov2_kwargs().get("patch_size", 14))
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  target = jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b), x, x)
  backbone = _dinov2_params(
      state_dict,
      target["params"]["backbone"],
      dtype,
      what=f"the DINOv2 backbone of SCorrSAN ({model.dinov2_preset})",
      ignore_blocks_after=model.dinov2_blocks()[-1],
  )
  if init_variables is None:
    xi = jnp.zeros((1, size, size, 3), jnp.float32)
    init_variables = jax.jit(model.init)(jax.random.PRNGKey(0), xi, xi)
  out = jax.tree.map(np.asarray, flax.core.unfreeze(init_variables))
  if dtype is not None:
    out = jax.tree.map(lambda a: a.astype(dtype), out)
  out["params"]["backbone"] = backbone
  out.setdefault("batch_stats", {})
  return out


def dinov2_state_dict_shapes(model) -> Dict[str, Tuple[int, ...]]:
  """Official name -> shape of every tensor `from_dinov2_state_dict(.., model)` reads."""
  p = int(model.patch_size)
  x = jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32)
  target = jax.eval_shape(lambda a: model.init(jax.random.PRNGKey(0), a), x)
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(target["params"]).items():
    name, kind = _dinov2_torch_name(tuple(path))
    shape = tuple(leaf.shape)
    out[name] = (
        shape[::-1]
        if kind == "dense"
        else (shape[3], shape[2], shape[0], shape[1])
        if kind == "conv"
        else shape
    )
  return out


def to_dinov2_state_dict(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Inverse of `from_dinov2_state_dict`: official names, Linear `(out, in)`, conv OIHW.

  Args:
    variables: `{'params': ...}` of a `DINOv2` (or its param tree itself).

  Returns:
    name -> numpy array (no `mask_token`: the port has none).
  """
  params = variables.get("params", variables)
  sd = {}
  for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    name, kind = _dinov2_torch_name(tuple(path))
    arr = np.asarray(leaf)
    if kind == "conv":
      arr = np.transpose(arr, (3, 2, 0, 1))
    elif kind == "dense":
      arr = np.transpose(arr, (1, 0))
    sd[name] = arr
  return sd
