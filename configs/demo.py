r"""The CPU demo, on the embedded `parts` benchmark: semantic correspondence between instances.

    python -m sccorr_jax.main --config=configs/demo.py --workdir=runs/demo

Pairs are two instances of one of six procedurally generated articulated categories (quadruped,
bird, vehicle, face, humanoid, flower; `sccorr_jax.data.parts`, built on first use into
`data.data_dir` in seconds), with different poses, proportions, flips, textures and backgrounds;
the labels are the named keypoints visible in both images, and training batches also carry the
exact dense ground truth (`dense_flow`, `dense_valid`) and the keypoints withheld by the label
budget. Model, optimiser and schedule are those of `configs/demo_warp.py` (a small trunk from
scratch, 96x96 images, 24x24 flow, label receptive field 11), so the two demos differ only in
the data. Validation PCK@0.1 (bbox threshold) on the 96 `val` pairs, whose textures come from
photographs training never uses.

Arguments: `baseline` | `st` | `mt` (default); `kps=K` keeps K labelled keypoints per training
pair (`data.keypoints_per_pair`, 0 = all); `frac=P` labels a fraction P of the training pairs
(`data.labelled_pair_fraction`); `runlocal` (a smoke run: 3 steps, one validation batch);
`epochs=N`; `tiny` is the test suite's model and data (32x32 synthetic warps, seconds per run).
"""

from __future__ import annotations

import os

from sccorr_jax import config_lib as common


def get_config(arg=None):
  """The demo config; `arg` = 'variant[,kps=K][,frac=P][,runlocal][,epochs=N][,tiny]'."""
  args = common.parse_arg(arg, variant='mt', runlocal=False, tiny=False, epochs=0, kps=0,
                          frac=1.0)
  data_dir = os.path.join(os.path.expanduser('~'), '.cache', 'sccorr_jax', 'data')
  if args.tiny:
    c = common.tiny_config(args.variant)
    c.data.data_dir = data_dir
    return c
  c = common.base_config('parts')
  c.data.data_dir = data_dir
  c.data.parts_img_size = 96
  c.data.parts_train_pairs_per_category = 64  # 384 training pairs
  c.data.parts_eval_pairs_per_category = 16  # 96 validation and 96 test pairs
  c.data.img_size = 96
  c.data.feature_size = 24
  c.data.receptive_field = 11
  c.data.augment = False  # The colour augmentation slows learning from scratch here.
  c.data.num_threads = 2
  c.data.keypoints_per_pair = args.kps
  c.data.labelled_pair_fraction = args.frac

  c.model.backbone_depth = 18
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.backbone_width = 64
  c.model.backbone_stages = 2
  c.model.sce_kernel_size = 5
  c.model.sce_features = 128
  c.model.feature_size = 24

  c.optim.batch_size = 8
  c.optim.num_epochs = 12
  c.optim.lr = 1e-3
  c.optim.backbone_lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'constant'
  c.optim.train_coordinates = False  # From scratch at lr 1e-3 they get distorted.

  c.teacher.pseudo_start_epoch = 4
  c.teacher.remember_rate_epochs = 4
  c.teacher.pseudo_weight = 1.0

  c.eval.batch_size = 16
  c.eval.every_epochs = 4
  c.log_every_steps = 10
  common.apply_variant(c, args.variant)
  if args.epochs:
    c.optim.num_epochs = args.epochs
  if args.runlocal:
    c.optim.num_epochs = 1
    c.optim.steps_per_epoch = 3
    c.eval.max_batches = 1
    c.log_every_steps = 1
  return c


def get_sweep(name):
  """`tools/experiment.py`'s sweeps at this config's resolution (96 px, stride 8)."""
  return common.get_sweep(name, img_size=96, stride=8)
