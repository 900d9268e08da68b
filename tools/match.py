"""Match your own image pair with a trained SCorrSAN.

    python tools/match.py --checkpoint=runs/spair_mt SRC.jpg TRG.jpg --out=out/
    python tools/match.py --checkpoint=PATH SRC TRG --keypoints=trg_points.json --out=out/

`--checkpoint` is a training workdir (its best model is used), a checkpoint step directory or an
exported model. Keypoints (JSON `[[x, y], ...]` or `{"keypoints": [[x, y], ...]}`) are given on
the *target* image TRG, in its pixels, and transferred to the source SRC (the flow maps every
target pixel to its source match; to go from A to B, pass B as SRC and A as TRG). Without
`--keypoints`, a 6 x 6 grid of target points is matched.

Writes into `--out`:
  flow.npy        [Ht, Wt, 2] float32: for every target pixel (x, y), the displacement to its
                  match in the source, in source pixels (original image sizes).
  keypoints.json  the target keypoints, their source matches and a confidence each.
  matches.png     source (left) and target (right) side by side, matches joined by lines.
  warped.png      the source warped into the target's frame (target size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from sccorr_jax import config_lib


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("src", help="source image (any size, RGB/grey/RGBA)")
  p.add_argument("trg", help="target image")
  p.add_argument("--checkpoint", required=True,
                 help="training workdir (uses its best model), checkpoint step dir or export")
  p.add_argument("--keypoints", default=None, help="JSON keypoints on the target image")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--model_index", default=None,
                 help="mutual-teacher checkpoints: 0, 1 or best (default: the recorded best)")
  p.add_argument("--config", default=None,
                 help="config file (configs/*.py) for checkpoints that carry no config")
  p.add_argument("--grid", type=int, default=6, help="n x n target points without --keypoints")
  p.add_argument("--height", type=int, default=None, help="height of matches.png (pixels)")
  return p.parse_args(argv)


def _model_index(value):
  if value is None or value == "best":
    return value
  return int(value)


def _load_config(path):
  return None if path is None else config_lib.load_config(path)


def main(argv=None) -> int:
  args = parse_args(argv)
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top
  from sccorr_jax import visualize  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  try:
    start = time.time()
    predictor = predict.Predictor.from_checkpoint(args.checkpoint,
                                                  model_index=_model_index(args.model_index),
                                                  config=_load_config(args.config))
    trg_kps = None
    if args.keypoints:
      trg_kps = predict.load_keypoints(args.keypoints)
    else:
      trg_hw = predict.load_image(args.trg).shape[:2]
      trg_kps = predict.grid_keypoints(trg_hw, args.grid)
    out = predictor.predict(args.src, args.trg, trg_kps=trg_kps)
  except (FileNotFoundError, predict.ImageError, predict.KeypointError,
          predict.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  np.save(os.path.join(args.out, "flow.npy"), out.flow)
  with open(os.path.join(args.out, "keypoints.json"), "w") as f:
    json.dump(out.to_json(src_image=os.path.abspath(args.src),
                          trg_image=os.path.abspath(args.trg),
                          checkpoint=os.path.abspath(args.checkpoint),
                          flow_file="flow.npy"), f, indent=1)
  visualize.save_png(os.path.join(args.out, "matches.png"),
                     visualize.draw_matches(out.src_image, out.trg_image, out.src_kps,
                                            out.trg_kps, confidence=out.confidence,
                                            height=args.height))
  visualize.save_png(os.path.join(args.out, "warped.png"),
                     visualize.warp_source(out.src_image, out.flow))
  print(f"matched {len(out.trg_kps)} keypoints in {time.time() - start:.1f}s; mean confidence "
        f"{float(np.mean(out.confidence)) if len(out.confidence) else float('nan'):.3f}; "
        f"wrote flow.npy, keypoints.json, matches.png, warped.png to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
