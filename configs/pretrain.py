r"""Pretraining the demo's trunk without any label of the `parts` benchmark: the analogue of
ImageNet pretraining followed by transfer to new categories.

    python -m sccorr_jax.main --config=configs/pretrain.py --workdir=runs/pretrain
    python tools/export_trunk.py --checkpoint=runs/pretrain --out=weights/parts_trunk.safetensors

The network is `configs/demo.py`'s (a small ResNet trunk, 96x96 images, 24x24 flow), trained
with `learning_mode='dense'`: the end-point error on the exact dense ground truth of every
visible object pixel. The stream holds no annotation of the benchmark's six categories and no
image of its `val` / `test` photographs. Sources (`source=`):

* `novel` (default): pairs of two instances of procedurally generated categories disjoint from
  the six (`parts` with `data.parts_novel_categories`: random kinematic trees of the same
  generator, `procedural.novel_category`), textures and backgrounds from the training
  photographs only. Unlimited instances of unseen categories.
* `warps`: self-supervised synthetic warps of the training photographs (`synthetic`, the
  GLU-Net recipe: the flow is known because the warp is).

`tools/export_trunk.py` writes the last step's backbone (parameters and BatchNorm statistics)
as a torchvision-named state dict, which `configs/demo.py` loads through `model.pretrained`
exactly as ImageNet weights are loaded (`models.build.init_variables`): the context encoder and
the soft-argmax head start fresh in each network, as in the paper.

Arguments: `source=novel|warps`; `epochs=N`; `runlocal` (a smoke run: 3 steps, one validation
batch, a tiny dataset).
"""

from __future__ import annotations

import os

from sccorr_jax import config_lib

# The network the trunk is for, and its optimiser and schedule: `configs/demo.py`'s `cpu_recipe`.
demo = config_lib.load_config_module(os.path.join(os.path.dirname(__file__), 'demo.py'))


def get_config(arg=None):
  """The pretraining config; `arg` = '[source=novel|warps][,epochs=N][,runlocal]'."""
  # `variant` and `tiny` are accepted as `cpu_recipe` reads them; the learning mode is 'dense'.
  args = config_lib.parse_arg(
      arg, variant='mt', runlocal=False, tiny=False, epochs=0, source='novel'
  )
  c = demo.cpu_recipe('parts', args)
  if args.source not in ('novel', 'warps'):
    raise ValueError(f"source must be 'novel' or 'warps', got {args.source!r}")
  c.learning_mode = 'dense'
  if args.source == 'novel':
    c.data.parts_img_size = 96
    c.data.parts_appearance = 'category'  # as the benchmark's regime (configs/demo.py)
    c.data.parts_novel_categories = 4 if args.runlocal else 240
    c.data.parts_train_pairs_per_category = 2 if args.runlocal else 40  # 9,600 pairs
    c.data.parts_eval_pairs_per_category = 1  # 240 validation pairs of the novel categories
  else:
    c.data.name = 'synthetic'
    c.data.synthetic_img_size = 96
    c.data.synthetic_train_pairs_per_photo = 2 if args.runlocal else 640  # 8,320 pairs
    c.data.synthetic_eval_pairs_per_photo = 1 if args.runlocal else 16
    # The warp dataset's `val` split warps the benchmark's validation photographs: monitor
    # the fit on training warps instead.
    c.eval.split = 'trn'
  c.optim.schedule = 'cosine'
  c.eval.every_epochs = 2
  if not args.runlocal:  # runlocal: cpu_recipe's 3 steps and one validation batch
    c.optim.num_epochs = args.epochs or 8  # the shipped trunk (weights/README.md)
    c.eval.max_batches = 8
  c.teacher.pseudo_start_epoch = 0
  return c
