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

import functools
import os

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from sccorr_jax import cli
from sccorr_jax import losses
from sccorr_jax import schedules
from sccorr_jax import train_step
from sccorr_jax import visualize

LEGEND = (
    "panels: predictions (lines) vs ground truth (rings) | target: labels (yellow), "
    "dilated mask (blue), kept (green) / dropped (red) pseudo-labels | source: kept "
    "pseudo-label matches"
)


def compute_signals(config, model, variables_a, variables_b, batch, epoch=None):
  """The training signals of one batch, as the run's training step computes them (no update).

  Both networks run with their running BatchNorm statistics; the candidates and the kept
  positions come from `train_step.mutual_teacher_objective` with the run's own dilation and
  small-loss settings (`teacher.dilation_kernel`, 0 = no mask; `teacher.small_loss_selection`)
  and the remember rate of `epoch`.

  Args:
    config: the run's config (`teacher` section).
    model: the `SCorrSAN` of both networks.
    variables_a, variables_b: the two networks' variables (a is drawn, b is its peer).
    batch: the batch contract (`src_img`, `trg_img`, `flow`, ...), numpy.
    epoch: whose remember rate to use (default: the last epoch of the run's schedule).

  Returns:
    dict of numpy arrays: `flow_a`, `flow_b` [b, F, F, 2]; `dilated` (the candidates), `kept`
    [b, F, F] bool (the positions whose pseudo-label network a learns from); `pseudo_epe`
    [b, F, F] disagreement in cells; `num_remember`, `num_candidates` (); `remember_rate`.
  """
  teacher = config.teacher
  if epoch is None:
    epoch = int(teacher.pseudo_start_epoch) + int(teacher.remember_rate_epochs)
  cfg = train_step.StepConfig.from_config(config, model, tx=None, batch_norm="frozen")
  gt = np.asarray(batch["flow"])
  hp = schedules.step_hparams(teacher, epoch, gt[..., 0].size)
  stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)  # noqa: E731
  variables = stack(variables_a, variables_b)
  step_batch = {k: batch[k] for k in ("src_img", "trg_img", "flow")}
  objective = jax.jit(functools.partial(train_step.mutual_teacher_objective, cfg))
  _, (_, _, (terms_a, _), (flow_a, flow_b)) = objective(
      variables["params"], variables.get("batch_stats", {}), step_batch, hp
  )
  return {
      "flow_a": np.asarray(flow_a),
      "flow_b": np.asarray(flow_b),
      "dilated": np.asarray(terms_a.candidates),
      "kept": np.asarray(terms_a.kept),
      "pseudo_epe": np.asarray(losses.pseudo_label_epe(flow_a, flow_b)),
      "num_remember": int(terms_a.num_remember),
      "num_candidates": int(terms_a.num_candidates),
      "remember_rate": schedules.remember_rate(teacher, epoch),
  }


def render(batch, signals, scale: int = 2, legend: bool = True) -> np.ndarray:
  """One row of panels per pair (see the module docstring), stacked; uint8 RGB."""
  rows = []
  for i in range(np.asarray(batch["src_img"]).shape[0]):
    if "pair_valid" in batch and not bool(np.asarray(batch["pair_valid"])[i]):
      continue
    rows.append(
        visualize.draw_training_signals(
            visualize.to_uint8(batch["src_img"][i]),
            visualize.to_uint8(batch["trg_img"][i]),
            signals["flow_a"][i],
            signals["flow_b"][i],
            np.asarray(batch["flow"][i]),
            signals["dilated"][i],
            signals["kept"][i],
            batch["src_kps"][i],
            batch["trg_kps"][i],
            batch["kps_valid"][i],
            scale=scale,
        )
    )
  out = visualize.vstack(rows)
  if legend:
    text = f"{LEGEND}; kept {signals['num_remember']} of {signals['num_candidates']} candidates"
    bar = Image.new("RGB", (out.shape[1], 16), (255, 255, 255))
    ImageDraw.Draw(bar).text((2, 2), text, fill=(0, 0, 0))
    out = visualize.vstack([np.asarray(bar), out], gap=0)
  return out


def define_flags() -> None:
  """The command line's flags (defined when run as a script, not on import: tests load this file
  beside other tools)."""
  flags.DEFINE_string("checkpoint", None, "Training workdir or checkpoint (required).")
  flags.DEFINE_string("out", None, "Output PNG (required).")
  flags.DEFINE_integer("num_pairs", 4, "Validation pairs to draw.", lower_bound=1)
  flags.DEFINE_string("split", None, "Split to draw (default: the config's eval split).")
  flags.DEFINE_integer(
      "epoch",
      None,
      "Whose remember rate to use (default: the end of the run's schedule).",
      lower_bound=0,
  )
  flags.DEFINE_integer("scale", 2, "Magnification of the panels.", lower_bound=1)
  flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv) -> int:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  cli.existing_path("checkpoint", f.checkpoint, "any")
  if os.path.isdir(f.out):
    cli.fail(f"--out={f.out}: is a directory; give a .png file name")
  cli.new_output_dir("out", os.path.dirname(os.path.abspath(f.out)))

  from sccorr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top

  cli.quiet_libraries()  # again, for what the imports above brought in

  model, variables_a, config = predict.load_model(f.checkpoint, model_index=0)
  try:
    variables_b, _ = ckpt_lib.load_model_variables(f.checkpoint, model_index=1)
  except ckpt_lib.CheckpointError:
    variables_b = variables_a  # a single-model checkpoint
  split = f.split or config.get("eval", {}).get("split", "val")
  batches = data_lib.create_eval_iterator(config.data, split, batch_size=f.num_pairs)
  batch = next(iter(batches))
  signals = compute_signals(config, model, variables_a, variables_b, batch, f.epoch)
  img = render(batch, signals, scale=f.scale)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  visualize.save_png(f.out, img)
  print(
      f"wrote {f.out} ({img.shape[1]}x{img.shape[0]}): kept {signals['num_remember']} of "
      f"{signals['num_candidates']} pseudo-label candidates at remember rate "
      f"{signals['remember_rate']:g}"
  )
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
