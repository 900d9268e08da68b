r"""Prepares a benchmark as a TFDS ArrayRecord dataset, without TensorFlow.

    python -m sccorr_jax.data.prepare --dataset=spair71k --manual_dir=~/datasets \
        --data_dir=~/tensorflow_datasets

`--manual_dir` holds the extracted archive (`SPair-71k/`, `PF-PASCAL/` or `PF-WILLOW/`, or that
folder itself). Without `--manual_dir` the archive is downloaded from the builder's URL.
`--dataset=synthetic` and `--dataset=parts` build the embedded datasets (no download, no manual
dir) with their default knobs.

Bad records (a pair whose image or annotation is missing/unreadable/malformed, or with no valid
keypoint) are skipped and listed at the end (`--on_bad_record=skip`, default) or stop the
preparation (`--on_bad_record=raise`); more than `--max_bad_fraction` bad pairs in a split, a
missing split file, or an empty split always stop it. The list of skipped pairs and dropped
keypoints is written beside the prepared data as `preparation_report.json`. A failed
preparation leaves no dataset that reads as complete.

A mistake on the command line (unknown `--dataset`, a `--manual_dir` that is missing, empty or
laid out wrongly, a flag that does not parse, a preparation that stops) ends with one line
`error: ...` naming the path or flag and the problem, and exit status 2; anything unforeseen
ends with one line naming the exception and exit status 1. `--verbose` shows the traceback
instead.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from sccorr_jax import cli
from sccorr_jax import config_lib
from sccorr_jax.data import builder_base
from sccorr_jax.data import pipeline
from sccorr_jax.data import records

_DATASET = flags.DEFINE_string(
    'dataset', None, f'Dataset to prepare: one of {", ".join(pipeline.DATASETS)}.'
)
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder with the extracted archive (default: download).'
)
_DATA_DIR = flags.DEFINE_string(
    'data_dir',
    None,
    'TFDS data dir to write to (default: ' '$SCCORR_DATA_DIR or ~/tensorflow_datasets).',
)
_ON_BAD = flags.DEFINE_enum(
    'on_bad_record',
    'skip',
    ['skip', 'raise'],
    'Skip bad pairs (listed at the end) or stop at the first.',
)
_MAX_BAD = flags.DEFINE_float(
    'max_bad_fraction', 0.25, 'Stop when more than this fraction of a split is bad.'
)
_REGISTER_CHECKSUMS = flags.DEFINE_bool(
    'register_checksums', False, "Record the downloaded archives' checksums (first download)."
)
if 'verbose' not in flags.FLAGS:  # another tool's module may define the same flag
  flags.DEFINE_bool('verbose', False, 'On failure, show the traceback instead of one line.')
EXIT_USER_ERROR = 2


def prepare(
    dataset: str,
    data_dir: str,
    manual_dir: str | None = None,
    policy: records.BadRecordPolicy | None = None,
    register_checksums: bool = False,
):
  """Prepares `dataset` into `data_dir`; returns the builder (its `.report` lists bad records).

  Raises:
    records.PreparationError: an unknown dataset, a `manual_dir` that is missing, empty or laid
      out wrongly, a `data_dir` that is not a directory, too many bad records, a missing split
      file, or a bad record with `on_bad_record='raise'`.
  """
  if dataset not in pipeline.DATASETS:
    raise records.PreparationError(
        f'unknown dataset {dataset!r}; expected one of {", ".join(pipeline.DATASETS)}'
    )
  data_dir = os.path.expanduser(data_dir)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise records.PreparationError(f'data dir {data_dir} is not a directory')
  if dataset not in pipeline.BUILDERS:  # embedded: generated, nothing to read
    cfg = config_lib.default_data_config(dataset)
    cfg.data_dir = data_dir
    return pipeline.get_builder(cfg)
  builder_cls = pipeline.BUILDERS[dataset]
  if manual_dir:
    manual_dir = os.path.expanduser(manual_dir)
    problem = builder_base.manual_dir_problem(manual_dir, builder_cls, dataset)
    if problem:
      raise records.PreparationError(problem)
  builder = builder_cls(data_dir=data_dir, policy=policy)
  dl_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir or None, register_checksums=register_checksums
  )
  builder.download_and_prepare(download_config=dl_config)
  report_path = os.path.join(os.fspath(builder.data_dir), 'preparation_report.json')
  with open(report_path, 'w') as f:
    f.write(builder.report.to_json())
  logging.info(
      '%s prepared in %s; %s',
      dataset,
      builder.data_dir,
      builder.report.summary() or 'no bad record',
  )
  return builder


def _fail(message: str, status: int = EXIT_USER_ERROR):
  """Ends the command with one line `error: <message>` on stderr."""
  sys.stdout.flush()
  sys.stderr.flush()
  sys.stderr.write(f'error: {" ".join(message.split())}\n')
  sys.stderr.flush()
  sys.exit(status)


def _run():
  if not _DATASET.value:
    raise records.PreparationError(f'--dataset is required: one of {", ".join(pipeline.DATASETS)}')
  if _DATASET.value not in pipeline.DATASETS:
    raise records.PreparationError(
        f'--dataset={_DATASET.value}: unknown dataset; expected one of '
        f'{", ".join(pipeline.DATASETS)}'
    )
  if not 0 <= _MAX_BAD.value <= 1:
    raise records.PreparationError(f'--max_bad_fraction={_MAX_BAD.value}: must lie in [0, 1]')
  data_dir = _DATA_DIR.value or config_lib.default_data_config().data_dir
  builder = prepare(
      _DATASET.value,
      data_dir,
      _MANUAL_DIR.value,
      records.BadRecordPolicy(_ON_BAD.value, _MAX_BAD.value),
      _REGISTER_CHECKSUMS.value,
  )
  for split, info in builder.info.splits.items():
    print(f'{split}: {info.num_examples} pairs')
  report = getattr(builder, 'report', None)
  if report is not None and (report.bad or report.dropped_kps or report.notes):
    print(report.summary())
  print(f'prepared in {builder.data_dir}')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; flags are written --name=value')
  try:
    _run()
  except Exception as e:  # pylint: disable=broad-except  # one line unless --verbose
    if flags.FLAGS.verbose:
      raise
    if isinstance(e, (records.PreparationError, records.BadRecordError)):
      _fail(str(e))
    _fail(f'{type(e).__name__}: {e} (rerun with --verbose for the traceback)', status=1)


if __name__ == '__main__':
  # The project's runner: flag mistakes in one line, --help exits 0, quiet library logs (the
  # progress bars of a long preparation stay).
  cli.run(main, progress_bars=True)
