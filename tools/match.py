r"""Match your own image pair with a trained SCorrSAN.

    python tools/match.py --checkpoint=runs/spair_mt SRC.jpg TRG.jpg --out=out/
    python tools/match.py --checkpoint=PATH SRC TRG --keypoints=trg_points.json --out=out/

`--checkpoint` is a training workdir (its best model is used), a checkpoint step directory, a
model export directory, or a serialized model file (`python -m sccorr_jax.export`,
docs/deployment.md; the same matches without the model code). Keypoints (JSON `[[x, y], ...]`
or `{"keypoints": [[x, y], ...]}`) are given on the *target* image TRG, in its pixels, and
transferred to the source SRC (the flow maps every target pixel to its source match; to go from
A to B, pass B as SRC and A as TRG). Without `--keypoints`, a 6 x 6 grid of target points is
matched.

Writes into `--out` (a new or existing directory; existing files are replaced):
  flow.npy        [hf, wf, 2] float32: for target pixel (x, y), the displacement to its match in
                  the source, in source pixels (original image sizes). (hf, wf) is the target's
                  size, or, for a target larger than --max_side on its longer side, that size
                  shrunk (pixel (i, j) is then the target point ((j + .5) Wt / wf - .5,
                  (i + .5) Ht / hf - .5); the program says so).
  keypoints.json  the target keypoints, their source matches and a confidence each
                  (docs/matching.md: what the confidence means).
  matches.png     source (left) and target (right) side by side, matches joined by lines.
  warped.png      the source warped into the target's frame (the flow's size).

Every input is checked before the model is loaded; a mistake ends in one line (`error: ...`,
exit status 2; `--verbose` adds the traceback).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from sccorr_jax import cli


def define_flags() -> None:
  """The command line's flags (defined when run as a script, not on import, so that tests can
  load several tools that each have a --checkpoint or --out)."""
  flags.DEFINE_string(
      'checkpoint',
      None,
      'Training workdir (uses its best model), checkpoint '
      'step directory, model export directory or serialized model file '
      '(python -m sccorr_jax.export) (required).',
  )
  flags.DEFINE_string('out', None, 'Output directory (required).')
  flags.DEFINE_string(
      'keypoints',
      None,
      'JSON keypoints on the target image, its pixels: '
      '[[x, y], ...] or {"keypoints": [[x, y], ...]}.',
  )
  flags.DEFINE_enum(
      'model_index',
      'best',
      ['0', '1', 'best'],
      'Mutual-teacher checkpoints: ' 'network 0 (a), 1 (b) or the recorded best.',
  )
  config_flags.DEFINE_config_file(
      'config',
      None,
      'Config file (configs/*.py[:variant]) for ' 'checkpoints that carry no config.',
      lock_config=True,
  )
  flags.DEFINE_integer(
      'grid', 6, 'n x n target points when --keypoints is not given.', lower_bound=1
  )
  flags.DEFINE_integer('height', None, 'Height of matches.png (pixels).', lower_bound=16)
  flags.DEFINE_integer(
      'max_side',
      1024,
      'Images are shrunk to this longer side when read; '
      'flow.npy and warped.png are at most this size. 0 = the full target size '
      '(large images take a lot of memory).',
      lower_bound=0,
  )
  flags.mark_flags_as_required(['checkpoint', 'out'])


OUTPUTS = ('flow.npy', 'keypoints.json', 'matches.png', 'warped.png')


def check_inputs(
    src: str, trg: str, checkpoint: str, out: str, keypoints: str | None = None
) -> None:
  """The checks that need no model (one line and exit 2 on the first problem)."""
  cli.existing_path('checkpoint', checkpoint, 'any')
  for name, path in (('SRC', src), ('TRG', trg)):
    if not os.path.exists(path):
      cli.fail(f'{name} {path}: no such image file')
    if os.path.isdir(path):
      cli.fail(f'{name} {path}: is a directory, not an image file')
  cli.existing_path('keypoints', keypoints, 'file')
  cli.new_output_dir('out', out)
  for name in OUTPUTS:
    if os.path.isdir(os.path.join(out, name)):
      cli.fail(f'--out={out}: {os.path.join(out, name)} is a directory; cannot write {name}')


def match(
    src: str,
    trg: str,
    checkpoint: str,
    out: str,
    keypoints: str | None = None,
    model_index='best',
    config=None,
    grid: int = 6,
    height: int | None = None,
    max_side: int | None = 1024,
) -> str:
  """Matches SRC and TRG and writes `OUTPUTS` into `out`; returns the summary line.

  Raises:
    FileNotFoundError, predict.ImageError, predict.KeypointError, predict.CheckpointError:
      naming the input at fault (images and keypoints are read before the model is loaded).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top
  from sccorr_jax import visualize  # pylint: disable=g-import-not-at-top

  start = time.time()
  max_side = max_side or None
  # Everything the user gave is read and checked before the (slow) model is loaded.
  src_img, src_hw = predict.read_image(src, f'SRC {src}', max_side)
  trg_img, trg_hw = predict.read_image(trg, f'TRG {trg}', max_side)
  if keypoints:
    trg_kps = predict.check_keypoints(
        predict.load_keypoints(keypoints), trg_hw, name=f'--keypoints={keypoints}'
    )
  else:
    trg_kps = predict.grid_keypoints(trg_hw, grid)
  del src_img, trg_img
  index = int(model_index) if model_index in ('0', '1', 0, 1) else model_index
  predictor = predict.Predictor.from_checkpoint(checkpoint, model_index=index, config=config)
  result = predictor.predict(src, trg, trg_kps=trg_kps, max_side=max_side)
  os.makedirs(out, exist_ok=True)
  np.save(os.path.join(out, 'flow.npy'), result.flow)
  with open(os.path.join(out, 'keypoints.json'), 'w') as f:
    json.dump(
        result.to_json(
            src_image=os.path.abspath(src),
            trg_image=os.path.abspath(trg),
            checkpoint=os.path.abspath(checkpoint),
            flow_file='flow.npy',
        ),
        f,
        indent=1,
    )
  # The pictures use the (possibly shrunk) images: points scaled to them.
  src_scale = np.array(result.src_image.shape[1::-1]) / np.array(src_hw[::-1])
  trg_scale = np.array(result.trg_image.shape[1::-1]) / np.array(trg_hw[::-1])
  visualize.save_png(
      os.path.join(out, 'matches.png'),
      visualize.draw_matches(
          result.src_image,
          result.trg_image,
          (result.src_kps + 0.5) * src_scale - 0.5,
          (result.trg_kps + 0.5) * trg_scale - 0.5,
          confidence=result.confidence,
          height=height,
      ),
  )
  visualize.save_png(
      os.path.join(out, 'warped.png'),
      visualize.warp_source(result.src_image, _flow_in_picture(result, src_hw)),
  )
  n = len(result.trg_kps)
  mean = float(np.mean(result.confidence)) if n else float('nan')
  line = (
      f'matched {n} keypoints in {time.time() - start:.1f}s; mean confidence {mean:.3f}; '
      f'wrote {", ".join(OUTPUTS)} to {out}'
  )
  hf, wf = result.flow.shape[:2]
  if (hf, wf) != tuple(trg_hw):
    line += (
        f'; flow.npy is {wf}x{hf}, the {trg_hw[1]}x{trg_hw[0]} target shrunk '
        f'{trg_hw[1] / wf:.2f}x (--max_side=0 for full size)'
    )
  return line


def _flow_in_picture(result, src_hw):
  """The flow as displacements between the pictures' pixels (`warp_source` of the pictures)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  hf, wf = result.flow.shape[:2]
  ht, wt = result.trg_size_hw
  xt = (np.arange(wf) + 0.5) * (wt / wf) - 0.5
  yt = (np.arange(hf) + 0.5) * (ht / hf) - 0.5
  hs, ws = result.src_image.shape[:2]
  sx = (xt[None, :] + result.flow[..., 0] + 0.5) * (ws / src_hw[1]) - 0.5
  sy = (yt[:, None] + result.flow[..., 1] + 0.5) * (hs / src_hw[0]) - 0.5
  return np.stack([sx - np.arange(wf)[None, :], sy - np.arange(hf)[:, None]], -1)


def main(argv):
  if len(argv) != 3:
    cli.fail(
        f'expected two images, SRC and TRG, got {len(argv) - 1} argument(s): '
        f'{" ".join(argv[1:]) or "none"} (see --help)'
    )
  src, trg = argv[1], argv[2]
  f = flags.FLAGS
  check_inputs(src, trg, f.checkpoint, f.out, f.keypoints)
  config = f.config if f['config'].present else None
  print(
      match(
          src,
          trg,
          f.checkpoint,
          f.out,
          keypoints=f.keypoints,
          model_index=f.model_index,
          config=config,
          grid=f.grid,
          height=f.height,
          max_side=f.max_side,
      ),
      flush=True,
  )
  return 0


if __name__ == '__main__':
  define_flags()
  cli.run(main)
