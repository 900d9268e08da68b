"""Serialized models (`sccorr_jax.export`, issue 19 §5): a trained network in one `jax.export`
file that runs without the training code.

Tiny models (`config_lib.tiny_config`: a ResNet on 32-pixel images, 8x8 flow; a 2-block DINOv2
on 42-pixel images, 6x6 flow), written as model exports and serialized from there. Covered: the
round trip at two batch sizes against `Predictor.from_checkpoint(DIR).model.apply`, the header,
`load` without flax or the models (in a fresh process), the command line, one-line errors for
files that are not serialized models, and `Predictor` / `tools/match.py` on a serialized DINOv2
model giving the checkpoint's matches.
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile

import jax
import numpy as np
from PIL import Image
import pytest

from sccorr_jax import checkpoint
from sccorr_jax import config_lib
from sccorr_jax import constants
from sccorr_jax import export
from sccorr_jax import models
from sccorr_jax import predict

from conftest import load_tool
from conftest import run_python

pytestmark = pytest.mark.usefixtures('fast_compiles')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Float32 rounding: the serialized function runs the network per pair (vmap), `apply` batched.
RTOL = 1e-5


def _run(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return run_python(*args, cwd=cwd, env=env, timeout=300)


def _model_export(config, directory):
  """A model export (Orbax directory) of `config`'s freshly initialised network."""
  model = models.build_model(config)
  variables = models.init_variables(config, model, jax.random.PRNGKey(0), 1)
  return checkpoint.save_model_variables(directory, variables, config)


def _pairs(b, s, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=(b, s, s, 3)).astype(np.float32) for _ in range(2))


def _apply(predictor, src, trg):
  """`predictor.model.apply(predictor.variables, src, trg, return_aux=True)`, jitted."""
  return jax.jit(lambda v, s, t: predictor.model.apply(v, s, t, return_aux=True))(
      predictor.variables, src, trg
  )


@pytest.fixture(scope='module')
def resnet(tmp_path_factory):
  root = tmp_path_factory.mktemp('resnet')
  ckpt = _model_export(config_lib.tiny_config('baseline'), root / 'ckpt')
  header, size = export.export_checkpoint(ckpt, root / 'model.zip')
  return dict(root=root, ckpt=ckpt, file=root / 'model.zip', header=header, size=size)


@pytest.fixture(scope='module')
def dinov2_model(tmp_path_factory):
  """A tiny DINOv2 SCorrSAN, serialized through the command line."""
  root = tmp_path_factory.mktemp('dinov2')
  c = config_lib.tiny_config('baseline')
  config_lib.apply_dinov2(c, 'vits14', (0, 1), trained_blocks=1)
  config_lib.apply_dinov2_tiny(c, img_size=42, feature_size=6)
  ckpt = _model_export(c, root / 'ckpt')
  r = _run(
      '-m',
      'sccorr_jax.export',
      f'--checkpoint={ckpt}',
      f'--out={root / "model.zip"}',
      '--platforms=cpu',
      cwd=root,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return dict(root=root, ckpt=ckpt, file=root / 'model.zip', stdout=r.stdout, stderr=r.stderr)


def test_round_trip_at_two_batch_sizes(resnet):
  served = export.load(resnet['file'])
  reference = predict.Predictor.from_checkpoint(resnet['ckpt'])
  for b in (1, 3):
    src, trg = _pairs(b, 32, seed=b)
    flow = served(src, trg)
    want, aux = _apply(reference, src, trg)
    assert flow.shape == (b, 8, 8, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(flow, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    _, corr = served.flow_and_corr(src, trg)
    np.testing.assert_allclose(corr, aux['corr'], rtol=RTOL, atol=1e-6)
  with pytest.raises(ValueError, match=r'src must be \[b, 32, 32, 3\] float32.*got \[1, 64'):
    served(*_pairs(1, 64))
  with pytest.raises(ValueError, match=r'trg must be .*preprocessed.*got \[1, 32, 32, 3\] uint8'):
    served(src[:1], np.zeros((1, 32, 32, 3), np.uint8))
  np.testing.assert_array_equal(served(src.astype(np.float64), trg), flow)  # cast, as jax does


def test_the_header_records_the_input_and_its_preprocessing(resnet):
  header = export.load(resnet['file']).header
  assert header['format'] == export.FORMAT and header['format_version'] == 1
  assert header['img_size'] == 32 and header['flow_size'] == 8
  assert header['inputs']['src'] == {'shape': ['b', 32, 32, 3], 'dtype': 'float32'}
  assert header['outputs']['flow'] == {'shape': ['b', 8, 8, 2], 'dtype': 'float32'}
  assert header['outputs']['corr']['shape'] == ['b', 2, 2, 2, 2]
  assert header['preprocessing']['mean'] == list(constants.IMAGENET_MEAN)
  assert header['preprocessing']['std'] == list(constants.IMAGENET_STD)
  assert header['model']['backbone'] == 'resnet' and header['model']['beta'] == 0.02
  assert header['config']['model']['sce_features'] == 16
  assert header['platforms'] == list(export.DEFAULT_PLATFORMS)
  with zipfile.ZipFile(resnet['file']) as z:
    assert sorted(z.namelist()) == sorted([export.HEADER, export.FUNCTION])
    assert json.loads(z.read(export.HEADER)) == header
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
  np.testing.assert_array_equal(
      export.load(resnet['file']).preprocess(image), predict.preprocess_image(image, 32)
  )


def test_load_imports_neither_flax_nor_the_models(resnet):
  code = (
      'import sys, numpy as np\n'
      'import sccorr_jax.export\n'
      f'model = sccorr_jax.export.load({str(resnet["file"])!r})\n'
      'x = np.zeros((2, 32, 32, 3), np.float32)\n'
      'assert model(x, x).shape == (2, 8, 8, 2)\n'
      'print(sorted(m for m in sys.modules if m == "flax" or m.startswith("flax.")\n'
      '             or m.startswith("sccorr_jax.models")))\n'
  )
  r = _run('-c', code, cwd=resnet['root'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == '[]', r.stdout


def test_files_that_are_not_serialized_models_are_named_in_one_line(resnet, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('hello')
  np.savez(tmp_path / 'arrays.npz', a=np.zeros(3))
  truncated = tmp_path / 'truncated.zip'
  truncated.write_bytes(resnet['file'].read_bytes()[: resnet['size'] // 2])
  flipped = bytearray(resnet['file'].read_bytes())
  flipped[len(flipped) // 2] ^= 0xFF
  (tmp_path / 'flipped.zip').write_bytes(flipped)
  cases = [
      (notes, 'not a serialized model'),
      (tmp_path / 'arrays.npz', 'not a serialized model'),
      (truncated, 'not a serialized model'),
      (tmp_path, 'is a directory'),
      (tmp_path / 'flipped.zip', 'damaged serialized model .BadZipFile: Bad CRC-32'),
  ]
  for path, problem in cases:
    with pytest.raises(export.SerializedModelError, match=f'^{path}: {problem}'):
      export.load(path)
  with pytest.raises(FileNotFoundError, match='missing.zip: no such file'):
    export.load(tmp_path / 'missing.zip')
  with pytest.raises(predict.CheckpointError, match='holds one network'):
    predict.Predictor.from_checkpoint(str(resnet['file']), model_index=1)
  # Through the command line that reads serialized models: one line, exit status 2.
  image = tmp_path / 'a.png'
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
  r = _run(
      ROOT / 'tools' / 'match.py',
      '--checkpoint=notes.txt',
      'a.png',
      'a.png',
      '--out=o',
      cwd=tmp_path,
  )
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      'error: notes.txt: not a serialized model (expected a zip archive of header.json and '
      'function.jaxexport, written by python -m sccorr_jax.export)'
  ), r.stderr


def test_command_line_serializes_a_dinov2_model(dinov2_model):
  assert dinov2_model['stderr'].strip() == '', dinov2_model['stderr']
  assert f"wrote {dinov2_model['file']}" in dinov2_model['stdout']
  assert 'DINOv2 vits14 blocks [0, 1]' in dinov2_model['stdout']
  served = export.load(dinov2_model['file'])
  assert served.header['platforms'] == ['cpu'] and served.header['model']['backbone'] == 'dinov2'
  reference = predict.Predictor.from_checkpoint(dinov2_model['ckpt'])
  src, trg = _pairs(2, 42)
  want, _ = _apply(reference, src, trg)
  flow = served(src, trg)
  assert flow.shape == (2, 6, 6, 2)
  np.testing.assert_allclose(flow, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def test_an_existing_out_is_refused_before_anything_loads(resnet, capsys):
  with pytest.raises(SystemExit) as e:
    export._check_out(str(resnet['file']))  # pylint: disable=protected-access
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      f'error: --out={resnet["file"]}: exists; a serialized model is never overwritten (remove '
      'it or choose another name)\n'
  )


def test_match_on_a_dinov2_checkpoint_and_its_serialized_model(dinov2_model):
  """`tools/match.py` (its `match`, in-process) on the checkpoint and on the file agree."""
  match = load_tool('match')
  root = dinov2_model['root']
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8)).save(root / 'src.png')
  Image.fromarray(rng.integers(0, 256, (60, 45, 3), np.uint8)).save(root / 'trg.png')
  out = {}
  for kind in ('ckpt', 'file'):
    line = match.match(
        str(root / 'src.png'),
        str(root / 'trg.png'),
        str(dinov2_model[kind]),
        str(root / f'out_{kind}'),
        grid=3,
    )
    assert 'matched 9 keypoints' in line, line
    out[kind] = json.loads((root / f'out_{kind}' / 'keypoints.json').read_text())
  a, b = out['ckpt']['matches'], out['file']['matches']
  np.testing.assert_allclose([m['src'] for m in b], [m['src'] for m in a], atol=1e-3)
  np.testing.assert_allclose([m['confidence'] for m in b], [m['confidence'] for m in a], atol=1e-4)
  np.testing.assert_allclose(
      np.load(root / 'out_file' / 'flow.npy'), np.load(root / 'out_ckpt' / 'flow.npy'), atol=1e-3
  )
