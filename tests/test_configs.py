"""The experiment configs: variants, reference values, locking, ablation sweeps."""

from __future__ import annotations

import os
import sys

from ml_collections import config_flags  # noqa: F401  (absl flags are marked parsed)
import pytest

from sccorr_jax import models
from sccorr_jax import config_lib
from conftest import run_python

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')
demo, demo_warp, pfpascal, pfwillow, spair = (
    config_lib.load_config_module(os.path.join(CONFIGS, f'{name}.py'))
    for name in ('demo', 'demo_warp', 'pfpascal', 'pfwillow', 'spair')
)


def test_load_config_file_errors(tmp_path):
  with pytest.raises(config_lib.ConfigFileError, match='nope.py: does not exist'):
    config_lib.load_config(str(tmp_path / 'nope.py') + ':mt')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  with pytest.raises(config_lib.ConfigFileError, match='defines no get_config'):
    config_lib.load_config(str(tmp_path / 'empty.py'))
  assert (
      config_lib.load_config(os.path.join(CONFIGS, 'demo.py') + ':baseline,tiny').learning_mode
      == 'baseline'
  )


def test_loading_a_config_imports_no_data_pipeline():
  """config_lib (the data defaults included) and the config files (those that load another's
  recipe too) pull in neither grain nor TFDS."""
  root = os.path.dirname(CONFIGS)
  code = (
      'import glob, sys\n'
      'from sccorr_jax import config_lib\n'
      'config = config_lib.load_config("configs/demo.py")\n'
      'assert config.data.name == "parts", config.data.name\n'
      'for path in sorted(glob.glob("configs/*.py")):\n'
      '  config_lib.load_config(path)\n'
      'heavy = [m for m in ("grain", "tensorflow_datasets", "tensorflow", "jax")\n'
      '         if m in sys.modules]\n'
      'assert not heavy, heavy\n'
  )
  env = dict(os.environ, PYTHONPATH=root)
  r = run_python('-c', code, cwd=root, env=env, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]


def test_data_defaults_are_config_libs():
  """`sccorr_jax.data.default_data_config` is config_lib's (one home for the data defaults)."""
  from sccorr_jax import data  # pylint: disable=g-import-not-at-top
  from sccorr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  assert data.default_data_config is config_lib.default_data_config
  assert set(config_lib.DATASETS) == {*pipeline.EMBEDDED, *pipeline.BUILDERS}


def test_restored_config_completes_an_older_runs_data_section():
  """A run written before a data key existed reads back with that key at its default: the
  pipeline reads every key without a default of its own."""
  import json  # pylint: disable=g-import-not-at-top
  from sccorr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  stored = json.loads(
      config_lib.load_config(os.path.join(CONFIGS, 'demo.py')).to_json_best_effort()
  )
  for key in ('parts_appearance', 'parts_novel_categories', 'flip_source_p'):
    del stored['data'][key]
  config = config_lib.restored_config(stored)
  assert config.data.parts_appearance == 'random' and config.data.flip_source_p == 0.0
  assert config.data.parts_train_pairs_per_category == 640  # the run's own value stays
  knobs = pipeline._embedded_knobs(config.data)  # pylint: disable=protected-access
  assert knobs['appearance'] == 'random'
  assert config.model.to_dict() == stored['model']


def test_parse_arg():
  a = config_lib.parse_arg('st,runlocal', variant='mt', runlocal=False, epochs=0)
  assert a.variant == 'st' and a.runlocal and a.epochs == 0
  a = config_lib.parse_arg('variant=baseline,epochs=3', variant='mt', runlocal=False, epochs=0)
  assert a.variant == 'baseline' and not a.runlocal and a.epochs == 3
  assert config_lib.parse_arg(None, variant='mt').variant == 'mt'
  with pytest.raises(ValueError, match='unknown config argument'):
    config_lib.parse_arg('nosuchkey=1', variant='mt')
  with pytest.raises(ValueError, match='must be a int'):
    config_lib.parse_arg('epochs=x', epochs=0)


def test_spair_reference_values():
  c = spair.get_config()
  assert c.learning_mode == 'mt'
  assert (c.model.sce_kernel_size, c.model.sce_features) == (7, 2048)
  assert c.teacher.pseudo_start_epoch == 4 and c.teacher.pseudo_weight == 10.0
  assert (
      c.teacher.remember_rate_start,
      c.teacher.remember_rate_end,
      c.teacher.remember_rate_epochs,
  ) == (0.2, 0.9, 10)
  assert c.teacher.dilation_kernel == 7
  assert c.optim.batch_size == 16 and c.optim.num_epochs == 150
  assert (c.optim.lr, c.optim.backbone_lr, c.optim.weight_decay) == (3e-5, 3e-6, 0.05)
  assert c.optim.schedule == 'step' and tuple(c.optim.lr_milestones_epochs) == (150,)
  assert c.optim.lr_gamma == 0.5
  assert (c.data.img_size, c.data.feature_size, c.data.receptive_field) == (256, 64, 11)
  assert c.model.feature_size == 64 and c.model.batch_norm == 'batch'
  assert c.data.name == 'spair71k' and c.eval.threshold == 'bbox'


def test_pfpascal_reference_values():
  c = pfpascal.get_config('baseline')
  assert c.learning_mode == 'baseline'
  assert (c.model.sce_kernel_size, c.model.sce_features) == (13, 1024)
  assert c.teacher.pseudo_start_epoch == 60
  assert c.data.name == 'pfpascal' and c.eval.threshold == 'img'


def test_pfwillow_is_evaluation_of_a_pfpascal_model():
  c = pfwillow.get_config()
  assert c.data.name == 'pfwillow' and c.eval.split == 'test'
  assert (c.model.sce_kernel_size, c.model.sce_features) == (13, 1024)


@pytest.mark.parametrize('module', [spair, pfpascal, demo, demo_warp])
@pytest.mark.parametrize('variant', ['baseline', 'st', 'mt', 'mt,runlocal'])
def test_variants_are_consistent(module, variant):
  c = module.get_config(variant)
  assert c.learning_mode == variant.split(',')[0]
  stride = 2 ** (c.model.backbone_stages + 1)
  assert c.data.feature_size == (c.model.feature_size or c.data.img_size // stride)
  assert models.build_model(c).feature_size == c.model.feature_size
  assert c.optim.batch_size % 4 == 0


def test_runlocal_is_small():
  c = spair.get_config('runlocal')
  assert c.data.img_size <= 64 and c.optim.num_epochs * c.optim.steps_per_epoch <= 10


def test_locked_config_rejects_typos():
  c = spair.get_config()
  c.lock()
  with pytest.raises(AttributeError, match='lr_typo'):
    c.optim.lr_typo = 1.0
  c.optim.lr = 1e-4  # Existing keys stay writable.


@pytest.mark.parametrize('entry', config_lib.ablation_sweep())
def test_every_ablation_is_a_config_switch(entry):
  c = spair.get_config()
  c.lock()
  for key, value in entry.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
    assert node[leaf] == value
  assert c.learning_mode in config_lib.LEARNING_MODES


def test_ablation_sweep_covers_tables_4_and_6():
  keys = {k for entry in config_lib.ablation_sweep() for k in entry}
  assert {
      'model.use_context',
      'model.feature_size',
      'optim.freeze_backbone',
      'learning_mode',
      'teacher.small_loss_selection',
      'teacher.dilation_kernel',
  } <= keys
  kernels = {e.get('teacher.dilation_kernel', 7) for e in config_lib.ablation_sweep()}
  assert {0, 3, 7, 15} <= kernels
  lines = config_lib.sweep_to_flags(config_lib.ablation_sweep())
  assert all(s.startswith('--config.') for s in lines)


def test_command_line_overrides(monkeypatch):
  """`--config.x.y=v` overrides of the optional fields (None-able ones take 0 for None)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  argv = [
      'prog',
      f'--config={os.path.join(CONFIGS, "spair.py")}:baseline',
      '--config.model.stage_sizes=(1,1,1,1)',
      '--config.model.feature_size=0',
      '--config.teacher.dilation_kernel=0',
      '--config.optim.lr=1e-4',
      '--config.model.pretrained=/x.pth',
      '--config.optim.steps_per_epoch=5',
  ]
  monkeypatch.setattr(sys, 'argv', argv)
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True)
  fv(argv)
  c = holder.value
  assert c.learning_mode == 'baseline' and tuple(c.model.stage_sizes) == (1, 1, 1, 1)
  assert c.model.feature_size == 0 and c.teacher.dilation_kernel == 0
  assert models.build_model(c).feature_size is None
  assert c.optim.lr == 1e-4 and c.model.pretrained == '/x.pth' and c.optim.steps_per_epoch == 5


def _flags_config(monkeypatch, spec, *overrides):
  """The config of `--config=<spec> <overrides>` through absl, as `sccorr_jax.main` reads it."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  argv = ['prog', f'--config={spec}', *overrides]
  monkeypatch.setattr(sys, 'argv', argv)
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True)
  fv(argv)
  return holder.value


@pytest.mark.parametrize('name', ['spair', 'demo', 'demo_warp', 'pretrain', 'spair_dinov2'])
def test_data_feature_size_follows_model_feature_size(monkeypatch, name):
  """One value: `model.feature_size=N` (command line or `apply_overrides`) sets both keys."""
  spec = os.path.join(CONFIGS, f'{name}.py')
  c = _flags_config(monkeypatch, spec, '--config.model.feature_size=32')
  assert c.model.feature_size == c.data.feature_size == 32
  c = config_lib.load_config(spec)
  c.lock()
  config_lib.apply_overrides(c, {'model.feature_size': 48})
  assert c.model.feature_size == c.data.feature_size == 48
  c = config_lib.load_config(spec + ':runlocal')
  assert c.data.feature_size == c.model.feature_size  # runlocal's own size, one value too


def test_the_stride_16_loss_ablation_detaches_data_feature_size(monkeypatch):
  """`model.feature_size=0` (no upsampling) takes the label grid of the correlation, set apart
  in either order (why the link is one way); the model does not follow `data.feature_size`."""
  from sccorr_jax import train  # pylint: disable=g-import-not-at-top

  entry = [e for e in config_lib.ablation_sweep() if e.get('model.feature_size') == 0][0]
  for order in (entry, dict(reversed(list(entry.items())))):
    c = spair.get_config()
    c.lock()
    config_lib.apply_overrides(c, order)
    assert (c.model.feature_size, c.data.feature_size) == (0, 16)
    train.check_config(c)
  c = _flags_config(
      monkeypatch, os.path.join(CONFIGS, 'spair.py'), *config_lib.sweep_to_flags([entry])[0].split()
  )
  assert (c.model.feature_size, c.data.feature_size) == (0, 16)
  c = spair.get_config()
  c.data.feature_size = 32  # On its own: the model keeps its grid, and the check says so.
  assert c.model.feature_size == 64
  with pytest.raises(config_lib.ConfigError, match='data.feature_size'):
    train.check_config(c)


def test_the_feature_size_link_survives_pickling():
  """The experiment runner sends configs to spawned workers."""
  import pickle  # pylint: disable=g-import-not-at-top

  c = pickle.loads(pickle.dumps(demo.get_config()))
  c.model.feature_size = 12
  assert c.data.feature_size == 12
