r"""How sparse a config's training labels are against its dense ground truth, per pair.

    python tools/label_stats.py --config=configs/demo.py:baseline,kps=1
    python tools/label_stats.py --config=configs/demo.py:baseline --batches=40 --json=/tmp/k.json

Reads `--batches` training batches exactly as training does (`data.resolve`, the label budget,
the preprocessing) and reports, per pair, mean ± std over the pairs:

* `keypoints`: labelled keypoints kept by the budget (`data.keypoints_per_pair`);
* `sparse_cells`: flow-grid cells that carry a sparse label (`geometry.keypoints_to_flow`: every
  cell whose receptive box, `data.receptive_field` pixels, holds a kept keypoint);
* `dense_cells`: cells where the dense ground truth is valid (`dense_valid`: the object, visible
  in both images); `sparse_in_dense`: sparse cells that are also dense cells;
* `coverage`: `sparse_cells / dense_cells` of all the pairs together: the share of what a
  dense-truth oracle is told that the sparse labels already tell. Pseudo-labels can only add
  information where it is small (docs/data.md, "How sparse is k = all").

Needs a dataset with a dense ground truth (`parts`, `synthetic`).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags
import numpy as np

from sccorr_jax import cli


def define_flags() -> None:
  """The command line's flags (defined when run as a script, not on import: tests load this file
  beside other tools that define `--config` too)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/demo.py[:arg]).', lock_config=True
  )
  flags.DEFINE_integer('batches', 20, 'Training batches to read.', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Data seed (shuffling, augmentation).')
  flags.DEFINE_string('json', None, 'Also write the numbers here.')
  flags.mark_flags_as_required(['config'])


def pair_stats(batch) -> dict:
  """Per-pair label counts of one training batch (numpy arrays, `[b]` each)."""
  from sccorr_jax import geometry  # pylint: disable=g-import-not-at-top

  sparse = ~np.asarray(geometry.unlabelled_mask(np.asarray(batch['flow'])))
  dense = np.asarray(batch['dense_valid'], bool)
  real = np.asarray(batch['pair_valid'], bool)
  flat = lambda m: m.reshape(m.shape[0], -1).sum(1)[real]
  return {
      'keypoints': np.asarray(batch['kps_valid'], bool).sum(-1)[real],
      'sparse_cells': flat(sparse),
      'dense_cells': flat(dense),
      'sparse_in_dense': flat(sparse & dense),
  }


def measure(config, batches: int, seed: int = 0) -> dict:
  """The numbers of the module docstring for `config`'s training split."""
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  if not data_lib.has_dense_truth(config.data):  # before resolve builds or opens the dataset
    raise ValueError(f'{config.data.name}: no dense ground truth to compare the labels with')
  data = data_lib.resolve(config.data)
  it = data_lib.create_train_iterator(data, batch_size=config.optim.batch_size, seed=seed)
  rows = [pair_stats(next(it)) for _ in range(batches)]
  stats = {k: np.concatenate([r[k] for r in rows]).astype(np.float64) for k in rows[0]}
  out = {k: {'mean': float(v.mean()), 'std': float(v.std())} for k, v in stats.items()}
  out['coverage'] = float(stats['sparse_cells'].sum() / max(stats['dense_cells'].sum(), 1.0))
  out['pairs'] = int(len(stats['keypoints']))
  return out


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  out = measure(f.config, f.batches, f.seed)
  for k, v in out.items():
    print(f'{k:16s} ' + (f'{v["mean"]:7.2f} ± {v["std"]:.2f}' if isinstance(v, dict) else f'{v}'))
  if f.json:
    with open(f.json, 'w') as fp:
      json.dump(out, fp, indent=1)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
