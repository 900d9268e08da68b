"""Tests of the sweep runner `sccorr_jax.experiments` (`tools/experiment.py`; issue 11, part 3).

One real run of the tiny config (`configs/demo.py:tiny`, 1 epoch of 2 steps): interrupted after
step 1, finished by the runner from its checkpoint, then skipped by a second invocation. The
rest needs no training: run order and the 'st' teacher reference, identical cells, the
settings guard, and the Markdown and plot writers on hand-made results.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from sccorr_jax import config_lib
from sccorr_jax import experiments
from sccorr_jax import train
from sccorr_jax.experiments import workers

pytestmark = pytest.mark.usefixtures('fast_compiles')

CONFIG = 'configs/demo.py:tiny'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic_data'))


def _files(root):
  """Every file under `root` -> (size, mtime_ns)."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      st = os.stat(os.path.join(dirpath, n))
      out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
  return out


def _no_training(config, workdir):
  raise AssertionError(f'trained {workdir} again')


def test_runner_resumes_a_killed_run_then_skips_it(data_dir, tmp_path):
  out = str(tmp_path / 'sweep')
  common = {'data.data_dir': data_dir, 'optim.num_epochs': 1}
  cells = experiments.plan_cells({'baseline': {'learning_mode': 'baseline'}})
  # A run killed after step 1 (of 2), with its checkpoint, in the runner's workdir.
  workdir = experiments.run_dir(out, 'baseline', 0)
  config = experiments.make_config(CONFIG, cells[0], 0, out, common)
  assert train.train_and_evaluate(config, workdir, stop_after_steps=1)['step'] == 1

  runs = experiments.run_sweep(CONFIG, 'test', cells, [0], out, common)
  assert len(runs) == 1
  entry = runs[0]
  assert (entry['cell'], entry['seed'], entry['step']) == ('baseline', 0, 2)
  assert entry['resumed_from_step'] == 1
  # The zero flow is validated once, at the first validation, and reported from there.
  assert 0 <= entry['zero_flow']['val/zero_flow/pck@0.1'] <= 100
  with open(os.path.join(out, 'results.md')) as f:
    assert 'Zero-flow (identity) val/pck@0.1:' in f.read()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'train/epoch' in r] == [1, 2]  # Each step trained once.
  val = [r for r in rows if 'val/epoch' in r]
  assert entry['final']['val/pck@0.1'] == pytest.approx(val[-1]['val/pck@0.1'])
  assert entry['best']['metrics']['val/pck@0.1'] == pytest.approx(entry['best']['value'])
  # compile_s is 0 here: the step compiled for the interrupted run is reused in-process.
  assert entry['wall_s'] > 0 and entry['compile_s'] >= 0
  for name in ('results.md', 'test.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0

  # The second invocation trains nothing and writes neither results.json nor checkpoints.
  with open(os.path.join(out, 'results.json'), 'rb') as f:
    before = f.read()
  files = _files(os.path.join(out, 'runs'))
  again = experiments.run_sweep(CONFIG, 'test', cells, [0], out, common, train_fn=_no_training)
  assert again == runs
  with open(os.path.join(out, 'results.json'), 'rb') as f:
    assert f.read() == before
  assert _files(os.path.join(out, 'runs')) == files

  # Other settings in the same directory are refused rather than mixed into one table.
  with pytest.raises(ValueError, match='optim.num_epochs'):
    experiments.run_sweep(
        CONFIG, 'test', cells, [0], out, {**common, 'optim.num_epochs': 2}, train_fn=_no_training
    )

  # The held-out split: the final checkpoint evaluated once, at the validation's protocol (on
  # 'val' itself the numbers are the run's own final ones), recorded and reported.
  runs = experiments.evaluate_sweep(CONFIG, 'test', cells, [0], out, 'val', common)
  held = runs[0]['heldout']['val']
  assert held['val/pck@0.1'] == pytest.approx(entry['final']['val/pck@0.1'], abs=1e-4)
  assert held['val/num_pairs'] == entry['final']['val/num_pairs']
  with open(os.path.join(out, 'results.md')) as f:
    assert '## Held-out split `val`' in f.read()
  evaluated = experiments.evaluate_runs(
      experiments.Results(os.path.join(out, 'results.json'), runs_settings(common)),
      {('baseline', 0): None},
      out,
      'val',
      metrics_fn=_no_training,
  )
  assert evaluated == 0  # Each run once.


def runs_settings(common):
  return {'config': CONFIG, 'sweep': 'test', 'set': common}


def test_st_cells_follow_and_use_the_same_seeds_baseline(tmp_path):
  sweep = config_lib.get_sweep('modes')
  order = [c.name for c in experiments.plan_cells(sweep)]
  assert order.index('baseline') < order.index('st')
  assert [c.name for c in experiments.plan_cells(sweep, ['st'])] == ['baseline', 'st']
  out = str(tmp_path)
  st = experiments.plan_cells(sweep, ['st'])[1]
  for seed in (0, 2):
    config = experiments.make_config(CONFIG, st, seed, out)
    assert config.learning_mode == 'st' and config.seed == seed
    assert config.teacher.checkpoint == os.path.abspath(experiments.run_dir(out, 'baseline', seed))
  text = experiments.describe(CONFIG, experiments.plan_cells(sweep, ['st']), [0, 1], out, {})
  assert 'st after baseline' in text and 'seed1: to run' in text
  with pytest.raises(ValueError, match='unknown cell'):
    experiments.plan_cells(sweep, ['nope'])
  with pytest.raises(ValueError, match='cycle'):
    experiments.plan_cells({'a': {'x': 'cell:b'}, 'b': {'x': 'cell:a'}})


def test_cells_with_identical_configs_are_found(tmp_path):
  sweep = config_lib.get_sweep('modes')
  cells = experiments.plan_cells(sweep)
  configs = [experiments.make_config(CONFIG, c, 0, str(tmp_path)) for c in cells]
  same = experiments.identical_cells(cells, configs)
  # The tiny config's default dilation is 7: that cell is `mt`; every other cell differs.
  assert configs[0].teacher.dilation_kernel == 7
  assert same == {'mt_dilation7': 'mt'}


def test_sweeps_and_overrides():
  budget = config_lib.get_sweep('budget')
  assert {(o['learning_mode'], o['data.keypoints_per_pair']) for o in budget.values()} == {
      (m, k) for m in ('baseline', 'mt') for k in (1, 2, 4, 8, 0)
  }
  ablation = config_lib.get_sweep('ablation')
  assert len(ablation) == len(config_lib.ablation_sweep())
  assert ablation['st']['teacher.checkpoint'] == 'cell:baseline'
  assert config_lib.parse_overrides(['optim.lr=1e-3', 'data.data_dir=/tmp/x', 'a.b=true']) == {
      'optim.lr': 1e-3,
      'data.data_dir': '/tmp/x',
      'a.b': True,
  }
  c = config_lib.load_config(CONFIG)
  c.lock()
  with pytest.raises(KeyError, match='optim.typo'):
    config_lib.apply_overrides(c, {'optim.typo': 1})
  with pytest.raises(TypeError, match='optim.num_epochs'):
    config_lib.apply_overrides(c, {'optim.num_epochs': 'many'})


def _entry(cell, seed, pck, overrides=None, pseudo=None):
  return {
      'cell': cell,
      'seed': seed,
      'overrides': overrides or {'learning_mode': cell},
      'select_metric': 'val/pck@0.1',
      'final': {'val/pck@0.05': pck / 2, 'val/pck@0.1': pck},
      'best': {'value': pck + 1.0, 'epoch': 3},
      'pseudo': pseudo or {},
      'wall_s': 10.0,
      'compile_s': 2.0,
  }


def test_markdown_mean_and_std_over_seeds():
  entries = [_entry('baseline', s, v) for s, v in enumerate((10.0, 20.0, 30.0))]
  entries.append(
      _entry(
          'mt',
          0,
          40.0,
          pseudo={
              'train/a/pseudo_kept_epe': 0.5,
              'train/b/pseudo_kept_epe': 0.7,
              'train/pseudo_weight': 1.0,
          },
      )
  )
  entries.append(_entry('st', 0, 30.0, pseudo={'train/pseudo_kept_epe': 0.25}))
  text = experiments.markdown_table(entries, ['mt', 'baseline'])
  main, pseudo = text.split('## Pseudo-labels')
  main, against = main.split('## Against the baseline')
  assert '| mt | baseline | 1 / 3 | +20.00 | – |' in against  # one mt seed: no p
  rows = {
      line.split(' | ')[0].strip('| '): line
      for line in main.splitlines()
      if line.startswith('| ') and '---' not in line
  }
  # Sample std (ddof 1) of 10, 20, 30 is 10; one seed has no std.
  assert (
      '| baseline | learning_mode=baseline | 3 | 10.00 ± 5.00 | 20.00 ± 10.00 '
      '| 21.00 ± 10.00 | 3.0 ± 0.0 |'
  ) in rows['baseline']
  assert '| mt | learning_mode=mt | 1 | 20.00 | 40.00 | 41.00 |' in rows['mt']
  lines = main.splitlines()
  assert lines.index(rows['mt']) < lines.index(rows['baseline'])  # The given order.
  # Network a's pseudo-label metrics, for the cells that have any.
  # One column for network a of mt and the student of st; b and the λ schedule left out.
  assert '| cell | n | pseudo_kept_epe |' in pseudo
  assert '| mt | 1 | 0.500 |' in pseudo and '| st | 1 | 0.250 |' in pseudo
  assert '0.700' not in pseudo and 'weight' not in pseudo and 'baseline' not in pseudo


def test_cells_are_compared_with_their_own_baseline_by_welch():
  entries = []
  for seed, (b1, m1, ball) in enumerate(
      ((30.0, 31.0, 40.0), (32.0, 35.0, 44.0), (31.0, 36.0, 42.0))
  ):
    k1 = {'data.keypoints_per_pair': 1}
    entries.append(_entry('baseline_k1', seed, b1, {'learning_mode': 'baseline', **k1}))
    entries.append(_entry('baseline', seed, ball))
    mt = _entry('mt_k1', seed, m1, {'learning_mode': 'mt', **k1})
    mt['final'].update({'val/a/pck@0.1': m1, 'val/b/pck@0.1': m1 - 2.0})
    entries.append(mt)
  entries.append(
      _entry('st', 0, 41.0, {'learning_mode': 'st', 'teacher.checkpoint': 'cell:baseline'})
  )
  # st: one seed, so a difference and no p; its teacher keys do not count.
  text = experiments.markdown_table(entries).split('## Against the baseline')[1]
  rows = {line.split(' | ')[0].strip('| '): line for line in text.splitlines() if ' | ' in line}
  # mt_k1 against baseline_k1 (not the k = all baseline): means 34 vs 31, a and b's mean 33.
  from scipy import stats  # pylint: disable=g-import-not-at-top

  p_sel = stats.ttest_ind([31, 35, 36], [30, 32, 31], equal_var=False).pvalue
  p_two = stats.ttest_ind([30, 34, 35], [30, 32, 31], equal_var=False).pvalue
  # Paired by seed: the differences 1, 3, 5 (selected) and 0, 2, 4 (a, b's mean).
  q_sel, q_two = (stats.ttest_1samp(d, 0.0).pvalue for d in ([1, 3, 5], [0, 2, 4]))
  assert rows['mt_k1'] == (
      f'| mt_k1 | baseline_k1 | 3 / 3 | +3.00 (p = {p_sel:.2g}; paired p = {q_sel:.2g}) | '
      f'+2.00 (p = {p_two:.2g}; paired p = {q_two:.2g}) |'
  )
  assert rows['st'] == '| st | baseline | 1 / 3 | -1.00 | – |'
  assert 'baseline_k1 |' not in text.split('| cell |')[1].split('mt_k1')[0]  # no self-row
  assert experiments.welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
  # Only the seeds both ran are paired; fewer than two give no p.
  assert experiments.paired({0: 2.0, 1: 3.0, 5: 9.0}, {0: 1.0, 1: 2.0}) == (1.0, 0.0)
  assert experiments.paired({0: 2.0, 1: 2.0}, {0: 2.0, 1: 2.0}) == (0.0, 1.0)
  diff, p = experiments.paired({0: 2.0}, {0: 1.0, 1: 2.0})
  assert diff == 1.0 and p != p


def test_strategies_are_compared_with_the_papers_pseudo_labels_also_on_the_heldout_split():
  entries = []
  for seed, (m, c) in enumerate(((30.0, 33.0), (32.0, 35.0), (31.0, 37.0))):
    for cell, v, overrides in (
        ('mt', m, {'learning_mode': 'mt'}),
        ('mt_gate_cycle', c, {'learning_mode': 'mt', 'teacher.gate': 'cycle'}),
    ):
      e = _entry(cell, seed, v, overrides)
      e['final'].update({'val/a/pck@0.1': v, 'val/b/pck@0.1': v - 2.0})
      e['heldout'] = {'test': {'test/pck@0.1': v - 10, 'test/a/pck@0.1': v - 10}}
      e['heldout']['test']['test/b/pck@0.1'] = v - 11
      entries.append(e)
  entries.append(_entry('baseline', 0, 20.0))  # No seed 1, 2: a difference without p.
  groups = experiments.by_cell(entries)
  assert experiments.default_teacher_cell(groups['mt_gate_cycle'], groups) == 'mt'
  assert experiments.default_teacher_cell(groups['mt'], groups) is None
  st = [_entry('st', 0, 1.0, {'learning_mode': 'st', 'teacher.checkpoint': 'cell:baseline'})]
  assert experiments.default_teacher_cell(st, groups) is None
  from scipy import stats  # pylint: disable=g-import-not-at-top

  p = stats.ttest_ind([33, 35, 37], [30, 32, 31], equal_var=False).pvalue
  q = stats.ttest_1samp([3, 3, 6], 0.0).pvalue
  text = experiments.markdown_table(entries)
  val, test = text.split("## Against the paper's pseudo-labels")[1:]
  # Selected against selected, and the mean of a, b against the default's mean of a, b: both
  # shift by the same 2 here, so the difference and p are the same.
  both = f'+4.00 (p = {p:.2g}; paired p = {q:.2g})'
  row = f'| mt_gate_cycle | mt | 3 / 3 | {both} | {both} |'
  assert row in val.split('##')[0]
  assert row in test  # On `test` every number is 10 (11 for b) lower: the same differences.
  assert '## Held-out split `test`' in text
  assert '| mt_gate_cycle | 3 | 25.00 ± 2.00 | 24.50 ± 2.00 |' in text
  assert '| mt | baseline | 3 / 1 | +11.00 | +10.00 |' in text.split('Held-out')[0]


def test_budget_curve_and_plots(tmp_path):
  entries = []
  for mode, shift in (('baseline', 0.0), ('mt', 5.0)):
    for k in (0, 1, 4):
      for seed, noise in enumerate((-1.0, 1.0)):
        entries.append(
            _entry(
                f'{mode}_k{k}',
                seed,
                10.0 * (k or 8) + shift + noise,
                {'learning_mode': mode, 'data.keypoints_per_pair': k},
            )
        )
  series = experiments.budget_series(entries, 'val/pck@0.1')
  assert [p[0] for p in series['mt']] == [1, 4, 0]  # 'all' last.
  k, mean, std, n = series['mt'][1]
  assert (k, n) == (4, 2) and mean == pytest.approx(45.0) and std == pytest.approx(2**0.5)
  paths = experiments.write_reports(str(tmp_path), entries, settings={'sweep': 'budget'})
  assert [os.path.basename(p) for p in paths] == ['results.md', 'budget.png']
  bars = str(tmp_path / 'modes.png')
  experiments.plot_bars(entries[:4], 'val/pck@0.1', bars)
  for path in (paths[1], bars):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _fake_train(config, workdir):
  """A picklable stand-in for training in worker processes: records when it ran, in the workdir;
  fails for the cell whose dilation is 15 at seed 1, the last run of the test's sweep."""
  start = time.time()
  time.sleep(0.3)
  if config.teacher.dilation_kernel == 15 and config.seed == 1:
    raise FloatingPointError('diverged')
  print('trained', workdir)  # Into the run's train.log.
  with open(os.path.join(workdir, 'times.json'), 'w') as f:
    json.dump([start, time.time(), os.getpid()], f)
  return {
      'step': 1,
      'epoch': int(config.optim.num_epochs),
      'val': {'val/pck@0.1': 1.0},
      'best': {},
      'state': object(),
  }


def test_workers_run_cells_in_parallel_after_the_cells_they_need(tmp_path):
  out = str(tmp_path / 'sweep')
  sweep = config_lib.get_sweep('modes')
  cells = experiments.plan_cells(sweep, ['st', 'mt', 'mt_dilation7', 'mt_dilation15'])
  with pytest.raises(RuntimeError, match=r'cell mt_dilation15 seed 1 failed: diverged .*train.log'):
    experiments.run_sweep(CONFIG, 'test', cells, [0, 1], out, train_fn=_fake_train, workers=2)
  with open(os.path.join(out, 'results.json')) as f:
    runs = {(r['cell'], r['seed']): r for r in json.load(f)['runs']}
  # The failed run is the last to start: every other run finished and was recorded.
  assert set(runs) == {(c.name, s) for c in cells for s in (0, 1)} - {('mt_dilation15', 1)}
  assert runs['mt_dilation7', 0]['same_as'] == 'mt' and runs['mt', 0]['workers'] == 2

  def times(cell, seed):
    with open(os.path.join(experiments.run_dir(out, cell, seed), 'times.json')) as f:
      return json.load(f)

  for seed in (0, 1):
    # The teacher run finished before its student started; two processes trained.
    assert times('baseline', seed)[1] <= times('st', seed)[0]
  assert len({times(c, 0)[2] for c in ('baseline', 'st', 'mt')}) >= 2
  with open(os.path.join(experiments.run_dir(out, 'st', 0), 'train.log')) as f:
    assert 'trained' in f.read()


def test_cpu_groups_split_the_cpus_evenly():
  assert workers.cpu_groups(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3, 4]]
  assert workers.cpu_groups(1, [3, 1]) == [[1, 3]]
  with pytest.raises(ValueError, match='--workers=3: .* 2 CPU'):
    workers.cpu_groups(3, [0, 1])


def test_pseudo_metrics_are_the_last_epochs_windows_mean():
  rows = [
      {'step': 10, 'train/loss': 1.0},
      {'step': 20, 'train/a/pseudo_kept_epe': 9.0},  # Epoch 1 (steps 1..24): left out.
      {'step': 30, 'train/a/pseudo_kept_epe': 3.0, 'train/pseudo_agreement': 0.5},
      {'step': 40, 'train/a/pseudo_kept_epe': 5.0},  # No agreement logged in this window.
      {'step': 48, 'val/pck@0.1': 10.0},
  ]
  pseudo, steps = experiments.last_epoch_pseudo_metrics(rows, steps_per_epoch=24)
  assert pseudo == {'train/a/pseudo_kept_epe': 4.0, 'train/pseudo_agreement': 0.5}
  assert steps == [30, 40]
  assert experiments.last_epoch_pseudo_metrics(rows[:1], 24) == ({}, None)


def test_mt_cells_also_report_the_mean_of_their_two_networks(tmp_path):
  mt = _entry('mt', 0, 12.0)
  mt['final'].update({'val/a/pck@0.1': 12.0, 'val/b/pck@0.1': 9.0})
  runs = [_entry('baseline', 0, 10.0), mt]
  assert experiments.networks_mean(mt, 'val/pck@0.1') == 10.5
  assert experiments.networks_mean(runs[0], 'val/pck@0.1') is None
  table = experiments.markdown_table(runs)
  assert 'mean of networks a, b' in table
  assert '| mt |' in table and '| 10.50 |' in table
  for e, k in zip(runs, (2, 2)):
    e['overrides'] = {'learning_mode': e['cell'], experiments.BUDGET_KEY: k}
  assert experiments.budget_series(runs, 'val/pck@0.1', networks=True) == {
      'mt': [(2, 10.5, pytest.approx(float('nan'), nan_ok=True), 1)]
  }


def test_workers_stop_when_the_runner_dies():
  # Each worker asks the kernel for SIGTERM when its parent dies; the trainer's SIGTERM
  # handler then checkpoints and stops, so the next invocation resumes without a twin.
  with workers.pool(1) as pool:
    assert pool.submit(workers.parent_death_signal).result() == signal.SIGTERM
  assert workers.parent_death_signal() == 0  # This (test) process asked for nothing.
