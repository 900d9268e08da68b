"""Pretraining without any label of the `parts` benchmark (`configs/pretrain.py`), the trunk file
it exports (`tools/export_trunk.py`) and the shipped trunk that `configs/demo.py` loads.

Covers: the novel categories are disjoint from the six and their records use no `val` / `test`
photograph (checked on generated records); a `runlocal` pretraining run in the real on-disk
format, exported and loaded into the demo model through the one loader of pretrained
backbones; a mismatched trunk file is one clear error; the shipped file's SHA-256.
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from sccorr_jax import config_lib
from sccorr_jax import convert
from sccorr_jax import models
from sccorr_jax import train
from sccorr_jax.data import parts
from sccorr_jax.data import procedural
from sccorr_jax.data import synthetic

pytestmark = pytest.mark.usefixtures('fast_compiles')

PRETRAIN = str(ROOT / 'configs' / 'pretrain.py')


def _tree(cat: procedural.Category):
  return [(p.parent, p.length, p.width, p.angle, p.exponent) for p in cat.parts]


def test_novel_categories_are_valid_deterministic_and_not_the_benchmark_six():
  seen = set()
  for i in range(60):
    cat = procedural.novel_category(i)  # Category() checks flip tables and 10-30 keypoints
    assert cat.name == procedural.novel_category_name(i) not in procedural.CATEGORY_NAMES
    assert procedural.category(procedural.NOVEL_BASE + i) is cat
    assert all(_tree(cat) != _tree(c) for c in procedural.CATEGORIES)
    seen.add(str(_tree(cat)))
  assert len(seen) == 60  # every category its own tree
  procedural.novel_category.cache_clear()
  assert _tree(procedural.novel_category(7)) == _tree(procedural.category('novel_00007'))


def test_pretraining_records_hold_no_benchmark_category_and_no_eval_photograph(monkeypatch):
  """Every split of the pretraining stream, generated: only novel categories, and textures and
  backgrounds from the training photographs alone."""
  config = config_lib.load_config(PRETRAIN + ':runlocal')
  assert config.learning_mode == 'dense' and config.data.name == 'parts'
  cfg = parts.make_config(
      img_size=48,
      train_pairs_per_category=2,
      eval_pairs_per_category=1,
      novel_categories=int(config.data.parts_novel_categories),
  )
  used = []
  real = procedural.texture_photo
  monkeypatch.setattr(
      procedural, 'texture_photo', lambda name, *a, **k: used.append(name) or real(name, *a, **k)
  )
  names = parts.category_names(cfg)
  assert not set(names) & set(procedural.CATEGORY_NAMES)
  for split in ('trn', 'val', 'test'):
    for cat in range(len(names)):
      example = parts.make_example(split, cat, 0, cfg)
      assert example['category'] == cat and example['pair_id'].startswith(names[cat])
      assert example['dense_valid'].any()
  assert used and set(used) <= set(synthetic.PHOTOS['trn'])
  # The benchmark itself draws its val/test textures from their own photographs.
  used.clear()
  parts.make_example('val', 0, 0, parts.make_config(img_size=48))
  assert set(used) <= set(synthetic.PHOTOS['val'])
  # The warp source monitors on training warps: the warp dataset's val split warps the
  # benchmark's validation photographs.
  warps = config_lib.load_config(PRETRAIN + ':source=warps,runlocal')
  assert warps.data.name == 'synthetic' and warps.eval.split == 'trn'


def test_flip_source_is_refused_with_novel_categories(tmp_path):
  from sccorr_jax import data  # pylint: disable=g-import-not-at-top

  cfg = data.default_data_config('parts')
  cfg.update(data_dir=str(tmp_path), parts_novel_categories=3, flip_source_p=0.5)
  with pytest.raises(ValueError, match='data.flip_source_p=0'):
    data.num_examples(cfg, 'trn')


def test_runlocal_pretraining_exports_a_trunk_the_demo_loads(tmp_path):
  config = config_lib.load_config(PRETRAIN + ':runlocal')
  config.data.data_dir = str(tmp_path / 'data')
  config.data.parts_img_size = 48
  config.data.img_size = 48
  config.model.feature_size = config.data.feature_size = 12
  summary = train.train_and_evaluate(config, str(tmp_path / 'pretrain'))
  assert summary['step'] == 3 and summary['nonfinite_total'] == 0
  assert np.isfinite(summary['val']['val/pck@0.1'])
  out = tmp_path / 'trunk.safetensors'
  r = subprocess.run(
      [
          sys.executable,
          str(ROOT / 'tools' / 'export_trunk.py'),
          f'--checkpoint={tmp_path / "pretrain"}',
          f'--out={out}',
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert r.returncode == 0, r.stderr
  digest = hashlib.sha256(out.read_bytes()).hexdigest()
  assert f'sha256 {digest}' in r.stdout and '(step 3)' in r.stdout
  # The demo model (2 networks) starts from it: the backbone equal to the pretrained one in
  # both, the heads fresh and different.
  demo = config_lib.load_config(str(ROOT / 'configs' / 'demo.py'))
  demo.model.pretrained = str(out)
  model = models.build_model(demo)
  stacked = models.init_variables(demo, model, jax.random.PRNGKey(0), 2)
  sd = convert.read_state_dict(out)
  assert sd['conv1.weight'].shape == (64, 3, 7, 7) and 'layer2.0.bn2.running_var' in sd
  kernel = np.asarray(stacked['params']['backbone']['conv1']['kernel'])
  want = np.transpose(sd['conv1.weight'], (2, 3, 1, 0))
  np.testing.assert_array_equal(kernel[0], want)
  np.testing.assert_array_equal(kernel[1], want)
  sce = np.asarray(stacked['params']['sce']['conv']['kernel'])
  assert not np.array_equal(sce[0], sce[1])


def test_a_trunk_of_another_model_is_one_clear_error(tmp_path):
  demo = config_lib.load_config(str(ROOT / 'configs' / 'demo.py'))
  other = config_lib.load_config(str(ROOT / 'configs' / 'demo.py'))
  other.model.backbone_width = 32
  other.model.pretrained = None
  small = models.build_model(other)
  variables = models.init_variables(other, small, jax.random.PRNGKey(0), 1)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'other.safetensors'
  save_file(
      {
          k: np.ascontiguousarray(v)
          for k, v in convert.backbone_state_dict(jax.device_get(variables), small).items()
      },
      str(path),
  )
  demo.model.pretrained = str(path)
  with pytest.raises(convert.ConversionError, match=r'shape|mismatch') as e:
    models.init_variables(demo, models.build_model(demo), jax.random.PRNGKey(0), 1)
  assert 'conv1' in str(e.value)


def test_pretrained_path_resolves_against_the_repository_root(tmp_path, monkeypatch):
  from sccorr_jax.models import build  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(tmp_path)
  assert build.pretrained_path('configs/demo.py') == ROOT / 'configs' / 'demo.py'
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'demo.py').write_text('')  # a file here wins
  assert build.pretrained_path('configs/demo.py') == pathlib.Path('configs/demo.py')


def test_the_shipped_trunk_matches_its_hash_and_loads_into_the_demo_model():
  """`configs/demo.py`'s `model.pretrained`: a file tracked in git, its SHA-256 the one
  recorded in weights/SHA256SUMS (`sha256sum -c`), loaded into both demo networks."""
  demo = config_lib.load_config(str(ROOT / 'configs' / 'demo.py'))
  rel = demo.model.pretrained
  path = ROOT / rel
  sums = dict(
      reversed(line.split())
      for line in (ROOT / 'weights' / 'SHA256SUMS').read_text().splitlines()
      if line.strip()
  )
  assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[pathlib.Path(rel).name]
  assert path.stat().st_size < 25e6
  tracked = subprocess.run(
      ['git', 'ls-files', '--error-unmatch', rel],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )
  assert tracked.returncode == 0 or not (ROOT / '.git').exists(), tracked.stderr
  model = models.build_model(demo)
  stacked = models.init_variables(demo, model, jax.random.PRNGKey(0), 2)
  sd = convert.read_state_dict(path)
  want = np.transpose(sd['layer2.0.conv2.weight'], (2, 3, 1, 0))
  got = np.asarray(stacked['params']['backbone']['layer2_0']['conv2']['kernel'])
  np.testing.assert_array_equal(got[0], want)
  np.testing.assert_array_equal(got[1], want)
