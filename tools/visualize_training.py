"""Draw what the teacher-student loop sees on a batch of validation pairs.

    python tools/visualize_training.py --checkpoint=runs/spair_mt --out=viz.png [--num_pairs=4]

For each pair, one row of three panels (network a of a mutual-teacher checkpoint; its peer b
provides the pseudo-labels):

1. source | target with network a's predicted matches of the labelled target keypoints (lines)
   and the ground-truth source keypoints (rings);
2. the target on the flow grid: sparse labels (yellow squares), the dilated label mask (blue
   tint: the pseudo-label candidates), candidates kept by small-loss selection (green dots) and
   dropped (red dots);
3. the source with where the kept pseudo-labels (peer b's flow at the kept cells) point.

The selection runs over the whole batch at once, as in training, with the remember rate given
(default: the config's final rate). A checkpoint with a single model uses it as its own peer
(every disagreement is then 0).
"""

from __future__ import annotations

import argparse
import os
import sys


import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PIL import ImageDraw  # noqa: E402

from sccorr_jax import losses  # noqa: E402
from sccorr_jax import visualize  # noqa: E402

LEGEND = ("panels: predictions (lines) vs ground truth (rings) | target: labels (yellow), "
          "dilated mask (blue), kept (green) / dropped (red) pseudo-labels | source: kept "
          "pseudo-label matches")


def compute_signals(model, variables_a, variables_b, batch, dilation_kernel: int = 7,
                    remember_rate: float = 0.9):
  """The training signals of one batch (no parameter update).

  Args:
    model: the `SCorrSAN` of both networks.
    variables_a, variables_b: the two networks' variables (a is drawn, b is its peer).
    batch: the batch contract (`src_img`, `trg_img`, `flow`, ...), numpy.
    dilation_kernel: odd side of the label dilation (the config's `teacher.dilation_kernel`).
    remember_rate: fraction of candidates kept by the small-loss selection.

  Returns:
    dict of numpy arrays: `flow_a`, `flow_b` [b, F, F, 2]; `dilated`, `kept` [b, F, F] bool
    (kept: the positions whose pseudo-label network a learns from, chosen by b's losses);
    `pseudo_epe` [b, F, F] disagreement in cells; `num_remember`, `num_candidates` ().
  """
  src, trg = batch["src_img"], batch["trg_img"]
  apply = jax.jit(model.apply)
  flow_a = apply(variables_a, src, trg)
  flow_b = apply(variables_b, src, trg)
  gt = np.asarray(batch["flow"])
  dilated = losses.dilated_label_mask(gt, dilation_kernel)
  loss_a = losses.pseudo_label_epe(flow_a, flow_b)
  loss_b = losses.pseudo_label_epe(flow_b, flow_a)
  sel = losses.small_loss_selection_with_masks(loss_a, loss_b, dilated, remember_rate)
  return {"flow_a": np.asarray(flow_a), "flow_b": np.asarray(flow_b),
          "dilated": np.asarray(dilated), "kept": np.asarray(sel.kept_b),
          "pseudo_epe": np.asarray(loss_a), "num_remember": int(sel.num_remember),
          "num_candidates": int(sel.num_candidates)}


def render(batch, signals, scale: int = 2, legend: bool = True) -> np.ndarray:
  """One row of panels per pair (see the module docstring), stacked; uint8 RGB."""
  rows = []
  for i in range(np.asarray(batch["src_img"]).shape[0]):
    if "pair_valid" in batch and not bool(np.asarray(batch["pair_valid"])[i]):
      continue
    rows.append(visualize.draw_training_signals(
        visualize.to_uint8(batch["src_img"][i]), visualize.to_uint8(batch["trg_img"][i]),
        signals["flow_a"][i], signals["flow_b"][i], np.asarray(batch["flow"][i]),
        signals["dilated"][i], signals["kept"][i], batch["src_kps"][i], batch["trg_kps"][i],
        batch["kps_valid"][i], scale=scale))
  out = visualize.vstack(rows)
  if legend:
    text = (f"{LEGEND}; kept {signals['num_remember']} of {signals['num_candidates']} "
            f"candidates")
    bar = Image.new("RGB", (out.shape[1], 16), (255, 255, 255))
    ImageDraw.Draw(bar).text((2, 2), text, fill=(0, 0, 0))
    out = visualize.vstack([np.asarray(bar), out], gap=0)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="training workdir or checkpoint")
  p.add_argument("--out", required=True, help="output PNG")
  p.add_argument("--num_pairs", type=int, default=4)
  p.add_argument("--split", default=None, help="default: the config's eval split")
  p.add_argument("--remember_rate", type=float, default=None)
  p.add_argument("--scale", type=int, default=2)
  args = p.parse_args(argv)

  from sccorr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top

  try:
    model, variables_a, config = predict.load_model(args.checkpoint, model_index=0)
    try:
      variables_b, _ = ckpt_lib.load_model_variables(args.checkpoint, model_index=1)
    except (ValueError, KeyError, IndexError):
      variables_b = variables_a  # a single-model checkpoint
  except (FileNotFoundError, predict.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  teacher = config.get("teacher", {})
  rate = args.remember_rate
  if rate is None:
    rate = float(teacher.get("remember_rate_end", 0.9))
  kernel = teacher.get("dilation_kernel", 7) or 7
  split = args.split or config.get("eval", {}).get("split", "val")
  batches = data_lib.create_eval_iterator(config.data, split, batch_size=args.num_pairs)
  batch = next(iter(batches))
  signals = compute_signals(model, variables_a, variables_b, batch, int(kernel), rate)
  img = render(batch, signals, scale=args.scale)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  visualize.save_png(args.out, img)
  print(f"wrote {args.out} ({img.shape[1]}x{img.shape[0]}): kept {signals['num_remember']} of "
        f"{signals['num_candidates']} pseudo-label candidates at remember rate {rate:g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
