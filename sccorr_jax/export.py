r"""Serialized models: one file that runs a trained SCorrSAN without the training code (issue 19).

    python -m sccorr_jax.export --checkpoint=runs/demo --out=runs/demo/model.zip

    from sccorr_jax import export      # imports jax, numpy and PIL; not flax, not the models
    model = export.load('runs/demo/model.zip')
    src = model.preprocess(src_rgb)    # [h, w, 3] uint8 -> [S, S, 3] float32
    flow = model(src[None], trg[None])  # [b, S, S, 3] float32 each -> [b, fs, fs, 2]

A *serialized model* is a `jax.export` function of the pair `(src, trg)` with the network's
weights inside it as constants, so running it needs only jax and numpy: no Flax, no model code,
no config. It is not the *model export* of `checkpoint.save_model_variables` (an Orbax directory
of variables and config, which needs this package to rebuild the network); `Predictor` and
`tools/match.py` accept both, and a training workdir. This module is the one place that writes
and reads the file; `docs/deployment.md` says what it holds, its sizes, and how to serve it.

The file is a zip archive (stored: float weights barely compress) of two entries:

* `header.json`: `format` (`FORMAT`) and `format_version`; `img_size` S and `flow_size` fs;
  the input and output shapes (batch `b` symbolic); `preprocessing`: what `preprocess` does
  (RGB, PIL bilinear antialiased resize to S x S, aspect not kept, /255, ImageNet mean and std),
  for callers in other languages; `flow`: its direction and units; `model`: backbone, soft-argmax
  `beta`, coordinate vectors (for `Predictor`'s confidence); `config`: the run's config;
  `source`: the checkpoint and network it came from; the jax version and lowering platforms.
* `function.jaxexport`: `jax.export.Exported.serialize()` of
  `(src, trg) -> (flow, corr)`: src, trg [b, S, S, 3] float32 ImageNet-normalised (exactly
  `predict.preprocess_image`); flow [b, fs, fs, 2] float32, for every target cell the
  displacement (x, y) to its source match in cells of the fs grid; corr [b, hs, ws, ht, wt], the
  filtered correlation (`Predictor`'s confidence reads it; a second function for it would
  store the weights twice). `load` gives the flow alone. Inference only: BatchNorm uses its
  running statistics. The function is lowered for `DEFAULT_PLATFORMS`.

The network is mapped over pairs (`jax.vmap` of the one-pair forward): its fused soft-argmax
picks its memory blocks from the batch size, which the file leaves symbolic. The result equals
`model.apply(variables, src, trg)` to float32 rounding (tests/test_export.py).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from sccorr_jax import constants
from sccorr_jax import images

FORMAT = 'sccorr_jax.serialized_model'
FORMAT_VERSION = 1
HEADER = 'header.json'
FUNCTION = 'function.jaxexport'
# Lowered for all three, so that a file written on a laptop can run on a GPU or TPU server (only
# the CPU was run here); the file grows by about 0.1%: few operations lower per platform.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')

PREPROCESSING = {
    'color': 'RGB (grey, palette and 16-bit converted; transparency composited on white)',
    'resize': 'to S x S, bilinear with antialiasing (PIL Image.resize BILINEAR), aspect '
    'ratio not kept',
    'scale': 'uint8 / 255 -> [0, 1]',
    'mean': list(constants.IMAGENET_MEAN),
    'std': list(constants.IMAGENET_STD),
    'normalised': '(x / 255 - mean) / std per channel, float32',
    'layout': 'NHWC: [b, S, S, 3]',
    'python': 'sccorr_jax.export.load(f).preprocess(rgb) = sccorr_jax.predict.preprocess_image',
}
FLOW = (
    'for every target cell (x, y) of the fs x fs grid, the displacement to its match in the '
    'source: source = (x + flow[..., 0], y + flow[..., 1]), in cells of that grid; cell i '
    'is centred on pixel (i + 0.5) * S / fs - 0.5 of the S x S input'
)


class SerializedModelError(ValueError):
  """A file that is not a usable serialized model; the message names it and the problem."""


# ------------------------------------------------------------------------------------------------
# Reading (jax and numpy only).


class SerializedModel:
  """A loaded serialized model: `model(src, trg) -> flow`.

  Attributes:
    path: the file it was read from.
    header: the file's `header.json` (module docstring).
    exported: the `jax.export.Exported` function `(src, trg) -> (flow, corr)`.
    img_size: S, the input side (pixels).
    flow_size: fs, the flow grid side.
  """

  def __init__(self, path: str, header: Dict[str, Any], exported: jax_export.Exported):
    self.path = path
    self.header = header
    self.exported = exported
    self.img_size = int(header['img_size'])
    self.flow_size = int(header['flow_size'])
    self._flow = jax.jit(lambda src, trg: exported.call(src, trg)[0])
    self._flow_and_corr = jax.jit(exported.call)

  def __call__(self, src, trg) -> jax.Array:
    """The flow of pairs of preprocessed images.

    Args:
      src: [b, S, S, 3] float32 source images, preprocessed as `preprocess` (any b).
      trg: [b, S, S, 3] float32 target images.

    Returns:
      [b, fs, fs, 2] float32 flow target -> source, cells of the fs grid (`FLOW`).
    """
    return self._flow(*self._check(src, trg))

  def flow_and_corr(self, src, trg) -> Tuple[jax.Array, jax.Array]:
    """`(flow [b, fs, fs, 2], corr [b, hs, ws, ht, wt])`: the flow and the filtered
    correlation it was computed from (`Predictor`'s confidence)."""
    return self._flow_and_corr(*self._check(src, trg))

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 RGB -> [S, S, 3] float32, the input the model was trained on."""
    return images.preprocess(image, self.img_size)

  def _check(self, src, trg):
    """Shapes checked; floating inputs cast to float32 (as jax does with float64 arrays);
    integer images refused: they have not been preprocessed."""
    s = self.img_size
    out = []
    for name, x in (('src', src), ('trg', trg)):
      x = x if hasattr(x, 'dtype') else np.asarray(x)
      floating = jnp.issubdtype(x.dtype, jnp.floating)
      if x.ndim != 4 or tuple(x.shape[1:]) != (s, s, 3) or not floating:
        raise ValueError(
            f'{self.path}: {name} must be [b, {s}, {s}, 3] float32 (preprocessed '
            f'images, see its header), got {list(x.shape)} {x.dtype}'
        )
      out.append(x.astype(np.float32) if x.dtype != np.float32 else x)
    if out[0].shape[0] != out[1].shape[0]:
      raise ValueError(
          f'{self.path}: src and trg must hold as many images, got '
          f'{out[0].shape[0]} and {out[1].shape[0]}'
      )
    return out


def read(path) -> Tuple[Dict[str, Any], bytes]:
  """`(header, serialized function bytes)` of a serialized model file.

  Raises:
    FileNotFoundError: nothing at `path`.
    SerializedModelError: one line naming `path` and the problem (a directory, not a
      serialized model, a newer format, damaged).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file')
  if os.path.isdir(path):
    raise SerializedModelError(
        f'{path}: is a directory, not a serialized model file (a '
        'checkpoint directory loads with predict.Predictor.'
        'from_checkpoint)'
    )
  what = (
      f'not a serialized model (expected a zip archive of {HEADER} and {FUNCTION}, written '
      'by python -m sccorr_jax.export)'
  )
  if not zipfile.is_zipfile(path):
    raise SerializedModelError(f'{path}: {what}')
  try:
    with zipfile.ZipFile(path) as z:
      names = set(z.namelist())
      if HEADER not in names or FUNCTION not in names:
        raise SerializedModelError(f'{path}: {what}; it holds {", ".join(sorted(names)[:5])}')
      header = json.loads(z.read(HEADER))
      if not isinstance(header, dict) or header.get('format') != FORMAT:
        raise SerializedModelError(f'{path}: {what}; its {HEADER} has no format {FORMAT!r}')
      version = header.get('format_version')
      if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SerializedModelError(
            f'{path}: format_version {version!r} is newer than this '
            f'sccorr_jax reads ({FORMAT_VERSION}); update sccorr_jax'
        )
      blob = z.read(FUNCTION)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    if isinstance(e, SerializedModelError):
      raise
    raise SerializedModelError(
        f'{path}: damaged serialized model ({type(e).__name__}: ' f'{_first_line(e)})'
    ) from e
  return header, blob


def load(path) -> SerializedModel:
  """Loads a serialized model (`python -m sccorr_jax.export`) with jax and numpy only.

  Args:
    path: the file.

  Returns:
    A `SerializedModel`: `model(src, trg) -> flow` ([b, S, S, 3] float32 each, preprocessed as
    `model.preprocess`; [b, fs, fs, 2] float32).

  Raises:
    FileNotFoundError: nothing at `path`.
    SerializedModelError: one line naming `path` and the problem.
  """
  header, blob = read(path)
  try:
    exported = jax_export.deserialize(bytearray(blob))
  except Exception as e:  # pylint: disable=broad-except  # jax says why in its own terms.
    raise SerializedModelError(
        f'{os.fspath(path)}: damaged serialized model: jax.export cannot '
        f'read {FUNCTION} ({type(e).__name__}: {_first_line(e)})'
    ) from e
  return SerializedModel(os.fspath(path), header, exported)


def _first_line(e: BaseException) -> str:
  lines = [s.strip() for s in str(e).splitlines() if s.strip()]
  return lines[0] if lines else type(e).__name__


# ------------------------------------------------------------------------------------------------
# Writing (from a model and its variables; flax is imported by whoever built them).


def pair_function(model, variables):
  """`(src, trg) -> (flow, corr)` of `model` in inference mode, `variables` closed over.

  Mapped over pairs (`jax.vmap` of the one-pair forward): the fused soft-argmax chooses its
  memory blocks from the batch size, which cannot depend on a symbolic one.
  """

  def one_pair(src, trg):
    flow, aux = model.apply(variables, src[None], trg[None], return_aux=True)
    return flow[0], aux['corr'][0]

  return jax.vmap(one_pair)


def serialize(
    model, variables, img_size: int, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> jax_export.Exported:
  """`pair_function` exported for [b, S, S, 3] float32 inputs, `b` symbolic."""
  (b,) = jax_export.symbolic_shape('b')
  s = int(img_size)
  spec = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
  return jax_export.export(jax.jit(pair_function(model, variables)), platforms=tuple(platforms))(
      spec, spec
  )


def _shape(aval) -> list:
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def make_header(
    model,
    variables,
    img_size: int,
    exported: jax_export.Exported,
    config=None,
    source: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
  """The file's `header.json` (module docstring)."""
  params = variables['params']
  flow_aval, corr_aval = exported.out_avals
  coords = None
  if 'x_normal' in params:
    coords = {k: np.asarray(params[f'{k}_normal'], np.float64).tolist() for k in ('x', 'y')}
  backbone = getattr(model, 'backbone_type', 'resnet')
  if backbone == 'dinov2':
    net = f'DINOv2 {model.dinov2_preset} blocks {list(model.dinov2_blocks())}'
  else:
    net = f'ResNet-{model.backbone_depth} ({model.backbone_stages} stages)'
  n = int(sum(np.size(a) for a in jax.tree.leaves(variables)))
  s, fs = int(img_size), int(flow_aval.shape[1])
  spec = {'shape': ['b', s, s, 3], 'dtype': 'float32'}
  return {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'img_size': s,
      'flow_size': fs,
      'inputs': {'src': spec, 'trg': spec},
      'outputs': {
          'flow': {'shape': _shape(flow_aval), 'dtype': str(flow_aval.dtype)},
          'corr': {'shape': _shape(corr_aval), 'dtype': str(corr_aval.dtype)},
      },
      'preprocessing': PREPROCESSING,
      'flow': FLOW,
      'model': {
          'summary': f'{net}, SCE {model.sce_kernel_size}/{model.sce_features}, {s} px '
          f'-> {fs}x{fs} flow, {n:,} weights',
          'backbone': backbone,
          'feature_size': model.feature_size,
          'beta': float(model.beta),
          'dtype': None if model.dtype is None else jnp.dtype(model.dtype).name,
          'weights': n,
          'coords': coords,
      },
      'config': _config_json(config),
      'source': source or {},
      'jax_version': jax.__version__,
      'platforms': list(exported.platforms),
      'calling_convention_version': int(exported.calling_convention_version),
      'created_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }


def _config_json(config) -> Optional[Dict[str, Any]]:
  if config is None:
    return None
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def write(path, header: Dict[str, Any], exported: jax_export.Exported) -> int:
  """Writes the file atomically (a temporary file beside it, then a rename); returns its size.

  Raises:
    FileExistsError: `path` exists (a serialized model is never overwritten).
  """
  path = os.fspath(path)
  if os.path.exists(path):
    raise FileExistsError(
        f'{path}: exists; a serialized model is never overwritten (remove it '
        'or choose another name)'
    )
  blob = exported.serialize()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as z:
      z.writestr(HEADER, json.dumps(header, indent=1))
      z.writestr(FUNCTION, bytes(blob))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return os.path.getsize(path)


def export_checkpoint(
    checkpoint, out, model_index=None, config=None, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> Tuple[Dict[str, Any], int]:
  """Serializes the model of a checkpoint into the file `out`.

  Args:
    checkpoint: a training workdir (its best model), a checkpoint step directory or a model
      export directory (`predict.Predictor.from_checkpoint`).
    out: the file to write (must not exist).
    model_index: mutual-teacher checkpoints: 0, 1, 'best' or None (the recorded best).
    config: fallback experiment config for checkpoints without one.
    platforms: what the function is lowered for (`PLATFORMS`).

  Returns:
    `(header, file size in bytes)`.

  Raises:
    FileNotFoundError, FileExistsError, predict.CheckpointError, SerializedModelError: one
      line naming the file and the problem.
  """
  # Here, not at the top: `import sccorr_jax.export` and `load` must not import flax or the
  # models (a serving process has neither); writing needs both.
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top

  checkpoint = os.fspath(checkpoint)
  if os.path.isfile(checkpoint):
    raise SerializedModelError(
        f'{checkpoint}: is a file; --checkpoint is a training workdir, a '
        'checkpoint step directory or a model export directory'
    )
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise SerializedModelError(
        f'platforms {",".join(platforms)}: each must be one of ' f'{", ".join(PLATFORMS)}'
    )
  predictor = predict.Predictor.from_checkpoint(checkpoint, model_index=model_index, config=config)
  model = predictor.model
  if getattr(model, 'inputs', 'images') != 'images':
    raise SerializedModelError(
        f'{checkpoint}: its model runs on cached DINOv2 features '
        "(model.inputs='features') and holds no backbone; serializing "
        'it with its backbone is not supported'
    )
  exported = serialize(model, predictor.variables, predictor.img_size, platforms)
  source = {
      'checkpoint': os.path.abspath(checkpoint),
      'model_index': 'best' if model_index is None else model_index,
      'learning_mode': (predictor.config or {}).get('learning_mode'),
  }
  header = make_header(
      model, predictor.variables, predictor.img_size, exported, predictor.config, source
  )
  return header, write(out, header, exported)


# ------------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """The command line's flags (defined when run, not on import)."""
  # pylint: disable=g-import-not-at-top  # absl and ml_collections: the command line only.
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string(
      'checkpoint',
      None,
      'Training workdir (uses its best model), checkpoint '
      'step directory or model export directory (required).',
  )
  flags.DEFINE_string(
      'out',
      None,
      'The serialized model file to write, e.g. model.zip ' '(required; never overwritten).',
  )
  flags.DEFINE_enum(
      'model_index',
      'best',
      ['0', '1', 'best'],
      'Mutual-teacher checkpoints: ' 'network 0 (a), 1 (b) or the recorded best.',
  )
  flags.DEFINE_list(
      'platforms',
      list(DEFAULT_PLATFORMS),
      'Platforms the function is lowered ' f'for, of {", ".join(PLATFORMS)}.',
  )
  config_flags.DEFINE_config_file(
      'config',
      None,
      'Config file (configs/*.py[:variant]) for ' 'checkpoints that carry no config.',
      lock_config=True,
  )
  flags.mark_flags_as_required(['checkpoint', 'out'])


def _check_out(out: str) -> None:
  """The --out checks that need no model (one line and exit 2)."""
  from sccorr_jax import cli  # pylint: disable=g-import-not-at-top

  if os.path.isdir(out):
    cli.fail(f'--out={out}: is a directory; --out names the file to write')
  if os.path.exists(out):
    cli.fail(
        f'--out={out}: exists; a serialized model is never overwritten (remove it or '
        'choose another name)'
    )
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    cli.fail(f'--out={out}: {parent} is a file, not a directory')
  if not os.access(parent, os.W_OK):
    cli.fail(f'--out={out}: {parent} is not writable')


def main(argv) -> int:
  # pylint: disable=g-import-not-at-top  # the command line only.
  from absl import flags
  from sccorr_jax import cli

  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])} (see --help)')
  f = flags.FLAGS
  cli.existing_path('checkpoint', f.checkpoint, 'any')
  _check_out(f.out)
  if not f.platforms or set(f.platforms) - set(PLATFORMS):
    cli.fail(f'--platforms={",".join(f.platforms)}: each must be one of {", ".join(PLATFORMS)}')
  start = time.time()
  index = int(f.model_index) if f.model_index in ('0', '1') else f.model_index
  header, size = export_checkpoint(
      f.checkpoint,
      f.out,
      model_index=index,
      config=f.config if f['config'].present else None,
      platforms=f.platforms,
  )
  print(
      f"wrote {f.out}: {size / 2**20:.1f} MiB; {header['model']['summary']}; input [b, "
      f"{header['img_size']}, {header['img_size']}, 3] float32 per image; lowered for "
      f"{', '.join(header['platforms'])} in {time.time() - start:.1f} s",
      flush=True,
  )
  return 0


if __name__ == '__main__':
  # pylint: disable=g-import-not-at-top
  # The importable module's main: under `python -m` this file is also `__main__`, a second copy
  # whose SerializedModelError `cli` would not know as a user's mistake.
  from absl import flags as _flags
  from sccorr_jax import cli as _cli
  from sccorr_jax import export as _export

  _export.define_flags()
  _flags.adopt_module_key_flags(_export)  # --help lists them as this program's flags.
  _cli.run(_export.main)
