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

from sccorr_jax import config_lib


def get_config(arg=None):
  """The PF-PASCAL config; `arg` = 'variant[,runlocal]'."""
  args = config_lib.parse_arg(arg, variant='mt', runlocal=False)
  c = config_lib.base_config('pfpascal')  # The reference's values; what differs from SPair-71k:
  c.model.sce_kernel_size = 13
  c.model.sce_features = 1024
  c.teacher.pseudo_start_epoch = 60
  c.eval.threshold = 'img'
  config_lib.apply_variant(c, args.variant)
  if args.runlocal:
    config_lib.apply_runlocal(c)
  return c


# The paper's Table 4 / Table 6 ablations on PF-PASCAL: a list of override dicts.
ablation_sweep = config_lib.ablation_sweep
