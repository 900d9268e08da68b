"""The matching examples of docs/matching.md: `tools/match.py` on two real image pairs.

    python tools/match_examples.py --checkpoint=runs/demo --out=docs/match_examples

1. `chelsea`: `skimage.data.chelsea()` (a cat, 451x300) against a copy of it mirrored,
   rotated by 20 degrees and cropped (an affine warp with a known inverse), so every target
   point has a known true match: the command reports how many of the 6 x 6 grid points land
   within 5% and 10% of the image's longer side of it (`chelsea/truth.json`).
2. `motorcycle`: the two views of `skimage.data.stereo_motorcycle()` (a rectified stereo
   pair: true matches lie on the same row, a few to tens of pixels apart), reported as the
   vertical error of each match.

Each pair is written into `--out/<name>/` (`src.png`, `trg.png` and what `tools/match.py`
writes: `matches.png`, `warped.png`, `flow.npy`, `keypoints.json`).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "model to match with (as tools/match.py)", required=True
)
_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
MATCH = pathlib.Path(__file__).resolve().parent / "match.py"


def chelsea_pair(angle: float = 20.0, crop: float = 0.8):
  """(src, trg, A): trg(x, y) = src(A @ (x, y, 1)); src the photograph, trg mirrored, rotated
  by `angle` degrees about the centre and cropped to `crop` of each side."""
  from skimage import data  # pylint: disable=g-import-not-at-top

  src = Image.fromarray(data.chelsea())
  w, h = src.size
  tw, th = round(crop * w), round(crop * h)
  t = np.deg2rad(angle)
  rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  centre_src, centre_trg = np.array([w - 1, h - 1]) / 2, np.array([tw - 1, th - 1]) / 2
  flip = np.diag([-1.0, 1.0])
  lin = flip @ rot  # target offset from its centre -> source offset from its centre
  a = np.concatenate([lin, (centre_src - lin @ centre_trg)[:, None]], 1)
  trg = src.transform(
      (tw, th),
      Image.Transform.AFFINE,
      data=tuple(a.reshape(-1)),
      resample=Image.Resampling.BILINEAR,
  )
  return src, trg, a


def _match(name: str, src: Image.Image, trg: Image.Image) -> dict:
  out = pathlib.Path(_OUT.value) / name
  out.mkdir(parents=True, exist_ok=True)
  src.save(out / "src.png")
  trg.save(out / "trg.png")
  subprocess.run(
      [
          sys.executable,
          str(MATCH),
          f"--checkpoint={_CHECKPOINT.value}",
          str(out / "src.png"),
          str(out / "trg.png"),
          f"--out={out}",
      ],
      check=True,
  )
  return json.loads((out / "keypoints.json").read_text())


def main(argv):
  del argv
  src, trg, a = chelsea_pair()
  result = _match("chelsea", src, trg)
  kps = result["matches"]
  pred = np.array([k["src"] for k in kps])
  truth = np.array([a @ [*k["trg"], 1.0] for k in kps])
  err = np.linalg.norm(pred - truth, axis=1) / max(src.size)
  report = {
      "points": len(kps),
      "within_5%": int((err <= 0.05).sum()),
      "within_10%": int((err <= 0.10).sum()),
      "median_error_px": float(np.median(err) * max(src.size)),
      "mean_confidence": result["mean_confidence"],
  }
  (pathlib.Path(_OUT.value) / "chelsea" / "truth.json").write_text(json.dumps(report, indent=1))
  print("chelsea:", report)
  from skimage import data  # pylint: disable=g-import-not-at-top

  left, right = data.stereo_motorcycle()[:2]
  result = _match("motorcycle", Image.fromarray(left), Image.fromarray(right))
  dy = np.array([k["src"][1] - k["trg"][1] for k in result["matches"]])
  report = {
      "points": len(dy),
      "median_abs_row_error_px": float(np.median(np.abs(dy))),
      "within_10px_of_the_row": int((np.abs(dy) <= 10).sum()),
      "mean_confidence": result["mean_confidence"],
  }
  (pathlib.Path(_OUT.value) / "motorcycle" / "truth.json").write_text(json.dumps(report, indent=1))
  print("motorcycle:", report)


if __name__ == "__main__":
  app.run(main)
