r"""The CPU demo, on the embedded `parts` benchmark: semantic correspondence between instances.

    python -m sccorr_jax.main --config=configs/demo.py --workdir=runs/demo

Pairs are two instances of one of six procedurally generated articulated categories (quadruped,
bird, vehicle, face, humanoid, flower; `sccorr_jax.data.parts`, built on first use into
`data.data_dir`), with different poses, proportions, flips, textures and backgrounds; the
labels are the named keypoints visible in both images, and training batches also carry the
exact dense ground truth (`dense_flow`, `dense_valid`) and the keypoints withheld by the label
budget. Validation PCK@0.1 (bbox threshold) on the 96 `val` pairs, whose textures come from
photographs training never uses.

The pretrained regime (default; README "The embedded benchmark and its two regimes"): both
networks start from the shipped trunk `weights/parts_trunk.safetensors` (pretrained by
`configs/pretrain.py` with no label of the benchmark; each head fresh), 3,840 training pairs
whose parts have their category's typical appearance (`data.parts_appearance='category'`),
12 epochs of 72 steps. Model, optimiser and teacher schedule are `cpu_recipe` below (a small
trunk, 96x96 images, 24x24 flow, label receptive field 11, lr 1e-3, λ = 1 from epoch 4), which
`configs/demo_warp.py` and `configs/pretrain.py` (whose trunk this config loads) share.

Arguments: `baseline` | `dense` | `truth_teacher` | `st` | `mt` (default); `kps=K` keeps K
labelled keypoints per training pair (`data.keypoints_per_pair`, 0 = all); `frac=P` labels a fraction P of the training
pairs (`data.labelled_pair_fraction`); `pretrained=False` starts from scratch on the same
benchmark; `scratch` is the first regime (no trunk, 384 training pairs, arbitrary part
materials: the settings of the README's first-regime tables); `runlocal` (a smoke run: 3 steps,
one validation batch); `epochs=N`; `tiny` is the test suite's model and data (32x32 synthetic
warps, seconds per run).
"""

from __future__ import annotations

import os

from sccorr_jax import config_lib

# The shipped pretrained trunk (`configs/pretrain.py`, `tools/export_trunk.py`; weights/README.md
# gives the command that regenerates it), relative to the repository root.
PRETRAINED = 'weights/parts_trunk.safetensors'
# Where the embedded datasets are built on first use.
DATA_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'sccorr_jax', 'data')


def get_config(arg=None):
  """The demo config; `arg` = 'variant[,kps=K][,frac=P][,scratch][,pretrained=False][,runlocal]
  [,epochs=N][,tiny]'."""
  args = config_lib.parse_arg(
      arg,
      variant='mt',
      runlocal=False,
      tiny=False,
      epochs=0,
      kps=0,
      frac=1.0,
      scratch=False,
      pretrained=True,
  )
  c = cpu_recipe('parts', args)
  if args.tiny:
    return c
  c.data.parts_img_size = 96
  c.data.parts_eval_pairs_per_category = 16  # 96 validation and 96 test pairs
  c.data.keypoints_per_pair = args.kps
  c.data.labelled_pair_fraction = args.frac
  if args.scratch:  # The first regime: nothing pretrained, 384 training pairs.
    c.data.parts_train_pairs_per_category = 64
    return c
  if args.pretrained:
    c.model.pretrained = PRETRAINED
  c.data.parts_appearance = 'category'  # parts look like their category's, varied
  c.data.parts_train_pairs_per_category = 640  # 3,840 training pairs
  if not args.runlocal:
    c.optim.steps_per_epoch = 72  # An epoch of 576 pairs: 12 epochs see each pair 1.8 times.
  return c


def cpu_recipe(dataset, args):
  """The CPU demos' network, optimiser and schedule on `dataset` (this file, `demo_warp.py`, and
  `pretrain.py`, whose trunk this file loads and so must be this network).

  A small ResNet trunk trained from scratch (one basic block per stage, two stages: stride 8,
  64 -> 128 channels), 96x96 images, a 12x12 correlation upsampled 2x to a 24x24 flow (4 pixels
  per cell, as the reference's 64x64 flow of 256x256 images; label receptive field 11 as the
  reference). Changed from the reference because nothing is pretrained and a CPU has minutes:
  lr 1e-3 (constant, both groups), weight decay 1e-4, no colour augmentation, the soft-argmax
  coordinate vectors kept at linspace(-1, 1), λ = 1 from epoch 4 with the remember rate rising
  over 4 epochs; batch 8, 12 epochs, validation every 4.

  Args:
    dataset: `config.data.name`; the caller sets its size knobs.
    args: the parsed config-file argument: `variant` (a learning mode), `runlocal`
      (3 steps, one validation batch), `epochs` (0 = 12), `tiny` (the test suite's model and
      data instead: `config_lib.tiny_config`, 32x32 synthetic warps, seconds per run).
  """
  if args.tiny:
    return config_lib.tiny_config(args.variant, DATA_DIR)
  c = config_lib.base_config(dataset)
  c.data.data_dir = DATA_DIR
  c.data.img_size = 96
  c.data.receptive_field = 11
  c.data.augment = False  # The colour augmentation slows learning from scratch here.
  c.data.num_threads = 2

  c.model.backbone_depth = 18
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.backbone_width = 64
  c.model.backbone_stages = 2
  c.model.sce_kernel_size = 5
  c.model.sce_features = 128
  c.model.feature_size = 24  # And so data.feature_size.

  c.optim.batch_size = 8
  c.optim.num_epochs = args.epochs or 12
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
  config_lib.apply_variant(c, args.variant)
  if args.runlocal:
    c.optim.num_epochs = 1
    c.optim.steps_per_epoch = 3
    c.eval.max_batches = 1
    c.log_every_steps = 1
  return c


def get_sweep(name):
  """`tools/experiment.py`'s sweeps at this config's resolution (96 px, stride 8)."""
  return config_lib.get_sweep(name, img_size=96, stride=8, dense_oracle=True)
