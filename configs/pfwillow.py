r"""PF-WILLOW: evaluation only, with a model trained on PF-PASCAL (the paper's protocol).

    python -m sccorr_jax.main --mode=eval --config=configs/pfwillow.py \
        --checkpoint=runs/pfpascal_mt --workdir=runs/pfwillow_eval

The model is built from the checkpoint's own config (PF-PASCAL: SCE 13 / 1024); this file sets
the data and the protocol: the `test` split, PCK with the `bbox` threshold computed from the
real keypoints (the report also gives `bbox_legacy`, the released code's value over all 40
padded keypoint slots, for parity), alphas 0.05 / 0.1 / 0.15.
"""

from __future__ import annotations

from sccorr_jax import config_lib


def get_config(arg=None):
  """The PF-WILLOW evaluation config; `arg`: `runlocal` for a smoke run."""
  args = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config('pfwillow')
  # The PF-PASCAL model (used only when a checkpoint carries no config of its own).
  c.model.sce_kernel_size = 13
  c.model.sce_features = 1024
  c.learning_mode = 'mt'
  c.eval.split = 'test'
  c.eval.threshold = 'bbox'
  if args.runlocal:
    config_lib.apply_runlocal(c)
    c.eval.split = 'test'
  return c
