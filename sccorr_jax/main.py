r"""Command-line entry point: train or evaluate SCorrSAN.

    python -m sccorr_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m sccorr_jax.main --config=configs/spair.py:mt --workdir=runs/spair_mt \
        --config.model.pretrained=resnet101-5d3b4d8f.pth
    python -m sccorr_jax.main --mode=eval --config=configs/spair.py \
        --checkpoint=runs/spair_mt --workdir=runs/spair_mt_eval

`--config.a.b=value` overrides any key; the config is locked, so a mistyped key fails with a
message naming it. Every mistake (a config file or variant that does not exist, a missing flag, a
checkpoint that is not one) ends in one line, `error: ...`, exit status 2 (`--verbose` adds the
traceback; `sccorr_jax.cli`). The resolved config is written to `<workdir>/config.json`. Rerunning a
training command with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sccorr_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config file (required), e.g. configs/spair.py:mt (variants: '
    'baseline, st, mt, runlocal).',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, logs and the ' 'resolved config (required).'
)
_MODE = flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval'],
    'train (resumes if the workdir ' 'has checkpoints) or eval (needs --checkpoint).',
)
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint',
    None,
    'eval: a trainer workdir, checkpoint step ' 'directory or exported model (default: --workdir).',
)
_MODEL_INDEX = flags.DEFINE_enum(
    'model_index',
    'best',
    ['0', '1', 'best'],
    'eval of a ' "mutual-teacher checkpoint: '0' (a), '1' (b) or 'best'.",
)
_MULTIHOST = flags.DEFINE_bool(
    'multihost',
    False,
    'Call jax.distributed.initialize() first '
    '(one process per host; the cluster is auto-detected).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _check_paths(workdir: str, mode: str, checkpoint) -> None:
  """What can be checked before JAX starts (one line and exit 2 otherwise)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    cli.fail(f'--workdir={workdir}: exists and is a file, not a directory')
  if mode == 'eval':
    if checkpoint is None and not os.path.isdir(workdir):
      cli.fail(
          f'--mode=eval needs --checkpoint (or a --workdir with checkpoints); '
          f'--workdir={workdir} does not exist'
      )
    expected = 'expected a training workdir, a checkpoint step directory or an exported model'
    if checkpoint is not None and not os.path.exists(checkpoint):
      cli.fail(f'--checkpoint={checkpoint}: no such file or directory ({expected})')
    if checkpoint is not None and not os.path.isdir(checkpoint):
      cli.fail(f'--checkpoint={checkpoint}: is a file, not a checkpoint directory ({expected})')
    if checkpoint is not None and not os.listdir(checkpoint):
      cli.fail(f'--checkpoint={checkpoint}: is an empty directory ({expected})')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value
  _check_paths(workdir, _MODE.value, _CHECKPOINT.value)
  # jax and the trainer load after the flags and paths are checked: `--help` and a mistyped
  # path answer at once (no cycle is dodged here).
  import jax  # pylint: disable=g-import-not-at-top

  if _MULTIHOST.value:
    jax.distributed.initialize()
  from sccorr_jax import train  # pylint: disable=g-import-not-at-top

  cli.quiet_libraries()  # again, for what the imports above brought in
  config = _CONFIG.value
  logging.info(
      'JAX process %d of %d, %d local device(s) of %d: %s',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].device_kind,
  )
  if _MODE.value == 'train':
    summary = train.train_and_evaluate(config, workdir)
    summary.pop('state', None)
    logging.info('done: %s', json.dumps(summary, default=str))
    print(
        json.dumps(
            {
                'val': summary['val'],
                'best': summary['best'],
                'compile_s': round(summary['compile_s'], 2),
                'mean_step_s': summary['mean_step_s'],
            },
            default=str,
        )
    )
  else:
    train.write_config(config, workdir)
    index = _MODEL_INDEX.value
    index = int(index) if index in ('0', '1') else index
    out = train.run_evaluation(config, _CHECKPOINT.value or workdir, workdir, model_index=index)
    print(json.dumps(out))


if __name__ == '__main__':
  cli.run(main)
