r"""SCorrSAN on PF-PASCAL (the reference's hyper-parameters).

    python -m sccorr_jax.main --config=configs/pfpascal.py:mt --workdir=runs/pfpascal_mt \
        --config.model.pretrained=/path/to/resnet101-5d3b4d8f.pth
    python -m sccorr_jax.main --config=configs/pfpascal.py:mt,runlocal --workdir=/tmp/pfp_smoke

Variants: `baseline` | `st` | `mt` (default), `runlocal`.

Differences from SPair-71k (`configs/spair.py`, which documents the shared values): SCE kernel
13 / 1024 channels; pseudo loss from epoch 60; PCK threshold `img` (the image side, 256 pixels);
training pairs flipped horizontally when the split file says so (the reference). 150 epochs,
step schedule with milestone 150 (no decay), batch 16, lr 3e-5 / 3e-6, weight decay 0.05.
"""

from __future__ import annotations

from sccorr_jax import config_lib as common


def get_config(arg=None):
  """The PF-PASCAL config; `arg` = 'variant[,runlocal]'."""
  return common.benchmark_config('pfpascal', arg, sce_kernel_size=13, sce_features=1024,
                                 pseudo_start_epoch=60, threshold='img')


def ablation_sweep():
  """The paper's Table 4 / Table 6 ablations on PF-PASCAL: a list of override dicts."""
  return common.ablation_sweep()
