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
12 epochs of 120 steps. Model, optimiser and teacher schedule are `config_lib.demo_config`'s (a
small trunk, 96x96 images, 24x24 flow, label receptive field 11, lr 1e-3, λ = 1 from epoch 4).

Arguments: `baseline` | `dense` | `st` | `mt` (default); `kps=K` keeps K labelled keypoints per
training pair (`data.keypoints_per_pair`, 0 = all); `frac=P` labels a fraction P of the training
pairs (`data.labelled_pair_fraction`); `pretrained=False` starts from scratch on the same
benchmark; `scratch` is the first regime (no trunk, 384 training pairs, arbitrary part
materials: the settings of the README's first-regime tables); `runlocal` (a smoke run: 3 steps,
one validation batch); `epochs=N`; `tiny` is the test suite's model and data (32x32 synthetic
warps, seconds per run).
"""

from __future__ import annotations

from sccorr_jax import config_lib as common

# The shipped pretrained trunk (`configs/pretrain.py`, `tools/export_trunk.py`; weights/README.md
# gives the command that regenerates it), relative to the repository root.
PRETRAINED = 'weights/parts_trunk.safetensors'


def get_config(arg=None):
  """The demo config; `arg` = 'variant[,kps=K][,frac=P][,scratch][,pretrained=False][,runlocal]
  [,epochs=N][,tiny]'."""
  c, args = common.demo_config('parts', arg, kps=0, frac=1.0, scratch=False, pretrained=True)
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
    c.optim.steps_per_epoch = 120  # An epoch of 960 pairs: 12 epochs see each pair 3 times.
  return c


def get_sweep(name):
  """`tools/experiment.py`'s sweeps at this config's resolution (96 px, stride 8)."""
  return common.get_sweep(name, img_size=96, stride=8, dense_oracle=True)
