r"""A sanity demo on the embedded warp dataset (one photograph warped onto itself): no download.

    python -m sccorr_jax.main --config=configs/demo_warp.py --workdir=runs/demo_warp

The default demo is `configs/demo.py` (the `parts` benchmark: two different instances of a
category). Here both images of a pair show the same appearance and up to 40 keypoints are
labelled, so sparse labels hardly matter; it is kept as a fast, easy check that training works.

Pairs are warps of the photographs shipped with scikit-image (`sccorr_jax.data.synthetic`,
built on first use into `data.data_dir`), with sparse keypoints as labels: 96x96 images, 32
training pairs per photograph. The network is the full SCorrSAN pipeline (context encoder,
correlation, mutual-NN, upsampling, soft-argmax, sparse EPE, mutual teachers with dilated masks
and small-loss selection) with `configs/demo.py`'s CPU recipe (`cpu_recipe`, which gives the
reasoning): a small ResNet trunk trained from scratch (stride 8), a 24x24 flow, lr 1e-3
constant, λ = 1 from epoch 4, batch 8, 12 epochs. Validation PCK@0.1 (bbox threshold, 48 pairs
of 3 photographs not used for training) every 4 epochs, with the zero-flow baseline of the same
pairs.

Variants: `baseline` | `st` | `mt` (default); `runlocal` shrinks it further (a smoke run);
`tiny` is the test suite's model and data (32x32 images, seconds per run); `epochs=N`.
"""

from __future__ import annotations

import os

from sccorr_jax import config_lib

# The CPU demos' network, optimiser and schedule: `configs/demo.py`'s `cpu_recipe`.
demo = config_lib.load_config_module(os.path.join(os.path.dirname(__file__), 'demo.py'))


def get_config(arg=None):
  """The warp demo config; `arg` = 'variant[,runlocal][,epochs=N][,tiny]'."""
  args = config_lib.parse_arg(arg, variant='mt', runlocal=False, tiny=False, epochs=0)
  c = demo.cpu_recipe('synthetic', args)
  if not args.tiny:
    c.data.synthetic_img_size = 96
    c.data.synthetic_train_pairs_per_photo = 32
    c.data.synthetic_eval_pairs_per_photo = 16
  return c


def get_sweep(name):
  """`tools/experiment.py`'s sweeps at this config's resolution (96 px, stride 8)."""
  return config_lib.get_sweep(name, img_size=96, stride=8)
