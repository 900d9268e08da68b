r"""Command-line entry point: train or evaluate SCorrSAN.

    python -m sccorr_jax.main --config=configs/demo.py --workdir=/tmp/sccorr_demo
    python -m sccorr_jax.main --config=configs/spair.py:mt --workdir=runs/spair_mt \
        --config.model.pretrained=resnet101-5d3b4d8f.pth
    python -m sccorr_jax.main --mode=eval --config=configs/spair.py \
        --checkpoint=runs/spair_mt --workdir=runs/spair_mt_eval

`--config.a.b=value` overrides any key; the config is locked, so a mistyped key fails with a
message naming it. The resolved config is written to `<workdir>/config.json`. Rerunning a
training command with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/spair.py:mt (variants: baseline, st, '
    'mt, runlocal).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the '
                               'resolved config (required).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (resumes if the workdir '
                          'has checkpoints) or eval (needs --checkpoint).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'eval: a trainer workdir, checkpoint step '
                                  'directory or exported model (default: --workdir).')
_MODEL_INDEX = flags.DEFINE_string('model_index', 'best', "eval of a mutual-teacher checkpoint: "
                                   "'0' (a), '1' (b) or 'best'.")
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first '
                               '(one process per host; the cluster is auto-detected).')
flags.mark_flags_as_required(['config', 'workdir'])


def _from_config_flags(exc: BaseException) -> bool:
  """Whether an exception was raised while ml_collections parsed the --config flags."""
  tb = exc.__traceback__
  while tb is not None:
    if 'config_flags' in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _QuietOrbax(pylogging.Filter):
  """Drops Orbax's per-save INFO chatter (its warnings and errors stay)."""

  def filter(self, record):
    return record.levelno > pylogging.INFO or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # Hide GPUs from TensorFlow if it happens to be installed (tfds may import it).
  os.environ.setdefault('CUDA_VISIBLE_DEVICES_FOR_TF', '')
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from sccorr_jax import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  logging.info('JAX process %d of %d, %d local device(s) of %d: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  workdir = _WORKDIR.value
  if _MODE.value == 'train':
    summary = train.train_and_evaluate(config, workdir)
    summary.pop('state', None)
    logging.info('done: %s', json.dumps(summary, default=str))
    print(json.dumps({'val': summary['val'], 'best': summary['best'],
                      'compile_s': round(summary['compile_s'], 2),
                      'mean_step_s': summary['mean_step_s']}, default=str))
  else:
    train.write_config(config, workdir)
    index = _MODEL_INDEX.value
    index = int(index) if index in ('0', '1') else index
    out = train.run_evaluation(config, _CHECKPOINT.value or workdir, workdir,
                               model_index=index)
    print(json.dumps(out))


def _run():
  try:
    app.run(main)
  except (AttributeError, KeyError) as e:
    if not _from_config_flags(e):
      raise
    # A mistyped --config.x.y on the locked config: say which override and what exists.
    root = e
    while root.args and isinstance(root.args[0], BaseException):
      root = root.args[0]
    text = str(root.args[0]) if root.args else str(root)
    overrides = ' '.join(a for a in sys.argv if a.startswith('--config.'))
    sys.exit(f"error: unknown config key in {overrides}: {text.replace(chr(10), '; ')}")


if __name__ == '__main__':
  _run()
