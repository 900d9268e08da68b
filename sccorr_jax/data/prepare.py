r"""Prepares a benchmark as a TFDS ArrayRecord dataset, without TensorFlow.

    python -m sccorr_jax.data.prepare --dataset=spair71k --manual_dir=~/datasets \
        --data_dir=~/tensorflow_datasets

`--manual_dir` holds the extracted archive (`SPair-71k/`, `PF-PASCAL/` or `PF-WILLOW/`, or that
folder itself). Without `--manual_dir` the archive is downloaded from the builder's URL.
`--dataset=synthetic` builds the embedded dataset (no download, no manual dir).

Bad records (a pair whose image or annotation is missing/unreadable/malformed, or with no valid
keypoint) are skipped and listed at the end (`--on_bad_record=skip`, default) or stop the
preparation (`--on_bad_record=raise`); more than `--max_bad_fraction` bad pairs in a split, a
missing split file, or an empty split always stop it. The list of skipped pairs and dropped
keypoints is written beside the prepared data as `preparation_report.json`. A failed
preparation leaves no dataset that reads as complete.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from sccorr_jax.data import pipeline
from sccorr_jax.data import records

_DATASET = flags.DEFINE_enum('dataset', None, list(pipeline.DATASETS), 'Dataset to prepare.')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None,
                                  'Folder with the extracted archive (default: download).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir to write to (default: '
                                '$SCCORR_DATA_DIR or ~/tensorflow_datasets).')
_ON_BAD = flags.DEFINE_enum('on_bad_record', 'skip', ['skip', 'raise'],
                            'Skip bad pairs (listed at the end) or stop at the first.')
_MAX_BAD = flags.DEFINE_float('max_bad_fraction', 0.25,
                              'Stop when more than this fraction of a split is bad.')
_REGISTER_CHECKSUMS = flags.DEFINE_bool(
    'register_checksums', False, 'Record the downloaded archives\' checksums (first download).')


def prepare(dataset: str, data_dir: str, manual_dir: str | None = None,
            policy: records.BadRecordPolicy | None = None,
            register_checksums: bool = False):
  """Prepares `dataset` into `data_dir`; returns the builder (its `.report` lists bad records).

  Raises:
    records.PreparationError: too many bad records, a missing split file, or a bad record
      with `on_bad_record='raise'`.
  """
  data_dir = os.path.expanduser(data_dir)
  if dataset == 'synthetic':
    cfg = pipeline.default_data_config('synthetic')
    cfg.data_dir = data_dir
    return pipeline.get_builder(cfg)
  builder = pipeline.BUILDERS[dataset](data_dir=data_dir, policy=policy)
  dl_config = tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
      register_checksums=register_checksums)
  builder.download_and_prepare(download_config=dl_config)
  report_path = os.path.join(os.fspath(builder.data_dir), 'preparation_report.json')
  with open(report_path, 'w') as f:
    f.write(builder.report.to_json())
  logging.info('%s prepared in %s; %s', dataset, builder.data_dir,
               builder.report.summary() or 'no bad record')
  return builder


def main(argv):
  del argv
  data_dir = _DATA_DIR.value or pipeline.default_data_config().data_dir
  builder = prepare(_DATASET.value, data_dir, _MANUAL_DIR.value,
                    records.BadRecordPolicy(_ON_BAD.value, _MAX_BAD.value),
                    _REGISTER_CHECKSUMS.value)
  for split, info in builder.info.splits.items():
    print(f'{split}: {info.num_examples} pairs')
  report = getattr(builder, 'report', None)
  if report is not None and (report.bad or report.dropped_kps):
    print(report.summary())
  print(f'prepared in {builder.data_dir}')


if __name__ == '__main__':
  flags.mark_flag_as_required('dataset')
  app.run(main)
