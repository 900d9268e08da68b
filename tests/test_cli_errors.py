"""Every user mistake through the real command line: exit status 2, one last line that names the
file or flag and the problem, no traceback (`sccorr_jax.cli`). Run from a directory other than
the checkout, as a user would. Most cases fail before JAX or the model is loaded."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from conftest import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = ['-m', 'sccorr_jax.main']
MATCH = [str(ROOT / 'tools' / 'match.py')]
DEMO = str(ROOT / 'configs' / 'demo.py')


def _run(cmd, cwd, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return run_python(*cmd, *args, cwd=cwd, env=env, timeout=timeout)


def _assert_one_line(r, *fragments):
  """Exit status 2, no traceback, exactly one `error:` line, the last one, naming `fragments`."""
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert lines and lines[-1].startswith('error: '), r.stderr[-3000:]
  assert [x for x in lines if x.startswith('error:')] == lines[-1:], r.stderr[-3000:]
  for f in fragments:
    assert f in lines[-1], (f, lines[-1])
  return lines[-1]


@pytest.mark.parametrize(
    'tool',
    [
        MAIN,
        MATCH,
        [str(ROOT / 'tools' / 'visualize_training.py')],
        [str(ROOT / 'tools' / 'convert_torch.py')],
        [str(ROOT / 'tools' / 'benchmark.py')],
        [str(ROOT / 'tools' / 'measure_confidence.py')],
        ['-m', 'sccorr_jax.data.prepare'],
        ['-m', 'sccorr_jax.export'],
    ],
    ids=[
        'main',
        'match',
        'visualize_training',
        'convert_torch',
        'benchmark',
        'measure_confidence',
        'prepare',
        'export',
    ],
)
def test_help_exits_0_from_any_directory(tmp_path, tool):
  for flag in ('--help', '-h') if tool == MAIN else ('--help',):
    r = _run(tool, tmp_path, flag)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'flags:' in r.stdout and "(default: 'None')" not in r.stdout, r.stdout


def test_missing_config_file_fails_before_jax_starts(tmp_path):
  # -X importtime lists every module imported: jax must not be among them.
  r = _run(
      ['-X', 'importtime', *MAIN],
      tmp_path,
      '--config=configs/demo.py',
      f'--workdir={tmp_path / "w"}',
  )
  line = _assert_one_line(
      r, '--config=configs/demo.py', 'does not exist', f'did you mean --config={DEMO}'
  )
  assert not [x for x in r.stderr.splitlines() if x.rstrip().endswith('| jax')], line


@pytest.mark.parametrize(
    'args, fragments',
    [
        (
            [f'--config={DEMO}:mtt', '--workdir=w'],
            [
                f'--config={DEMO}:mtt',
                "variant must be one of ('baseline', 'dense', 'st', 'mt', 'truth_teacher'), got 'mtt'",
            ],
        ),
        ([f'--config={DEMO}:tiny'], ['--workdir is required']),
        (
            [f'--config={DEMO}:tiny', '--workdir=w', '--mode=eval', '--checkpoint=nowhere'],
            ['--checkpoint=nowhere: no such file or directory'],
        ),
        (
            [f'--config={DEMO}:tiny', '--workdir=w', '--mode=eval', '--checkpoint=empty'],
            ['--checkpoint=empty: is an empty directory'],
        ),
        (
            [f'--config={DEMO}:tiny', '--workdir=w', '--mode=eval', '--checkpoint=foreign'],
            ['foreign is neither a model export'],
        ),
        ([f'--config={DEMO}:tiny', '--workdir=afile'], ['--workdir=afile: exists and is a file']),
    ],
    ids=[
        'bad_variant',
        'no_workdir',
        'missing_checkpoint',
        'empty_checkpoint',
        'not_a_checkpoint',
        'workdir_is_a_file',
    ],
)
def test_main_mistakes(tmp_path, args, fragments):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'foreign').mkdir()
  (tmp_path / 'foreign' / 'notes.txt').write_text('hello')
  (tmp_path / 'afile').write_text('x')
  _assert_one_line(_run(MAIN, tmp_path, *args), *fragments)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('match_inputs')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)).save(d / 'ok.png')
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / 'one.png')
  (d / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated JPEG' * 4)
  (d / 'bad.json').write_text('[[1, 2], [3')
  (d / 'outside.json').write_text(json.dumps({'keypoints': [[5, 5], [75, 10]]}))
  (d / 'afile').write_text('x')
  (d / 'ckpt').mkdir()  # exists; the checks below fail before it is read
  return d


@pytest.mark.parametrize(
    'args, fragments',
    [
        (['missing.png', 'ok.png', '--out=o'], ['SRC missing.png: no such image file']),
        (['ok.png', 'ok.png', '--out=afile'], ['--out=afile: exists and is a file']),
        (
            ['ok.png', 'ok.png', '--out=o', '--checkpoint=nowhere'],
            ['--checkpoint=nowhere: no such file or directory'],
        ),
        (['ok.png', '--out=o'], ['expected two images, SRC and TRG, got 1']),
        (['corrupt.jpg', 'ok.png', '--out=o'], ['SRC corrupt.jpg: cannot read the image']),
        (['ok.png', 'one.png', '--out=o'], ['TRG one.png: 1x1 pixels', 'too small', 'at least 16']),
        (['ok.png', 'ok.png', '--out=o', '--keypoints=bad.json'], ['bad.json: not valid JSON']),
        (
            ['ok.png', 'ok.png', '--out=o', '--keypoints=outside.json'],
            ['--keypoints=outside.json: 1 keypoint(s) outside the 60x40', '#1 (x=75, y=10)'],
        ),
    ],
    ids=[
        'missing_image',
        'out_is_a_file',
        'missing_checkpoint',
        'one_image',
        'corrupt_image',
        'one_pixel_image',
        'malformed_keypoints',
        'keypoints_outside',
    ],
)
def test_match_mistakes(files, args, fragments):
  if not any(a.startswith('--checkpoint') for a in args):
    args = args + ['--checkpoint=ckpt']
  _assert_one_line(_run(MATCH, files, *args), *fragments)
  assert not (files / 'o').exists()  # nothing written


def test_verbose_adds_the_traceback(files):
  r = _run(MATCH, files, 'corrupt.jpg', 'ok.png', '--out=o', '--checkpoint=ckpt', '--verbose')
  assert r.returncode == 2 and 'Traceback' in r.stderr and 'in load_image' in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: SRC corrupt.jpg: cannot read')


def test_library_chatter_is_dropped_and_real_warnings_kept():
  import logging  # pylint: disable=g-import-not-at-top
  from sccorr_jax import cli  # pylint: disable=g-import-not-at-top

  def passes(path, level, msg):
    record = logging.LogRecord('absl', level, path, 1, msg, (), None)
    return cli.LibraryChatter().filter(record)

  site = '/venv/lib/python3.11/site-packages'
  dropped = [
      (
          f'{site}/tensorflow_datasets/core/dataset_builder.py',
          logging.WARNING,
          'Using custom data configuration: %s',
      ),
      (
          f'{site}/tensorflow_datasets/core/dataset_info.py',
          logging.INFO,
          'Load dataset info from %s',
      ),
      (
          f'{site}/orbax/checkpoint/checkpoint_manager.py',
          logging.WARNING,
          'Requested `tracked_metric`; did not provide metrics.',
      ),
      (
          f'{site}/orbax/checkpoint/_src/metadata/checkpoint.py',
          logging.WARNING,
          'Metadata file does not exist: %s',
      ),
      (f'{site}/jax/_src/xla_bridge.py', logging.INFO, "Unable to initialize backend 'tpu'"),
  ]
  kept = [
      (
          f'{site}/orbax/checkpoint/_src/metadata/checkpoint.py',
          logging.ERROR,
          'Failed to read Metadata file: %s',
      ),
      (f'{site}/jax/_src/xla_bridge.py', logging.WARNING, 'An NVIDIA GPU may be present'),
      (f'{site}/tensorflow_datasets/core/dataset_builder.py', logging.WARNING, 'Other warning'),
      ('/work/main/sccorr_jax/train.py', logging.INFO, 'compiled the mt train step in %.1f s'),
  ]
  assert not any(passes(*r) for r in dropped)
  assert all(passes(*r) for r in kept)


def test_inconsistent_config_is_one_line(tmp_path):
  """A config whose settings do not fit together (train.check_config) ends in one line."""
  r = _run(
      MAIN,
      tmp_path,
      f'--config={DEMO}:tiny',
      f'--workdir={tmp_path / "w"}',
      '--config.teacher.dilation_kernel=4',
  )
  _assert_one_line(r, 'teacher.dilation_kernel must be an odd positive int')
