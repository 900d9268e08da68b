r"""How well the match confidence of `sccorr_jax.predict` separates real from nonsense pairs.

    python tools/measure_confidence.py --checkpoint=/tmp/demockpt [--split=val]

Matched pairs: the checkpoint's validation pairs (its config's dataset), as they are. Mismatched
pairs: each target with the source of a pair of another category (for the embedded synthetic
data: another photograph). Every pair is matched with `Predictor.predict` at the labelled target
keypoints, as `tools/match.py` does. Reported for the confidence and its two factors (`mass`,
`consistency`; `docs/matching.md`):

* per pair, the mean over its keypoints: mean +- std over matched and over mismatched pairs, and
  the AUC of telling them apart (the probability that a random matched pair scores higher than
  a random mismatched one; 0.5 = chance, 1 = perfect);
* per keypoint of the matched pairs: the AUC of telling correct matches (within PCK@0.1 of the
  benchmark's threshold) from wrong ones.
"""

from __future__ import annotations

import json
import platform

from absl import flags
import numpy as np

from sccorr_jax import cli


def define_flags() -> None:
  """The command line's flags (defined when run as a script, not on import)."""
  flags.DEFINE_string('checkpoint', None, 'Training workdir or checkpoint (required).')
  flags.DEFINE_string('split', None, "Split (default: the config's eval split).")
  flags.DEFINE_string('json', None, 'Also write the numbers here.')
  flags.mark_flags_as_required(['checkpoint'])


SCORES = ('confidence', 'mass', 'consistency')


def auc(pos, neg) -> float:
  """P(score of a random positive > that of a random negative), ties counted half."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  greater = (pos[:, None] > neg[None]).mean()
  ties = (pos[:, None] == neg[None]).mean()
  return float(greater + 0.5 * ties)


def other_category(category: np.ndarray) -> np.ndarray:
  """For each pair, the index of a pair of another category (deterministic)."""
  n = len(category)
  out = np.empty(n, np.int64)
  for i in range(n):
    for k in range(1, n):
      j = (i + n // 3 + k) % n
      if category[j] != category[i]:
        out[i] = j
        break
    else:
      raise ValueError('every pair has the same category: nothing to mismatch')
  return out


def measure(checkpoint: str, split=None) -> dict:
  """The numbers of the module docstring for `checkpoint`."""
  from sccorr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top
  from sccorr_jax import visualize  # pylint: disable=g-import-not-at-top

  cli.quiet_libraries()
  predictor = predict.Predictor.from_checkpoint(checkpoint)
  config = predictor.config
  split = split or config.eval.split
  batches = list(data_lib.create_eval_iterator(config.data, split, batch_size=16))
  b = {k: np.concatenate([np.asarray(x[k]) for x in batches]) for k in batches[0]}
  b = {k: v[b['pair_valid']] for k, v in b.items()}
  images = {k: [visualize.to_uint8(x) for x in b[k]] for k in ('src_img', 'trg_img')}
  partner = other_category(b['category'])
  pairs = {'matched': [], 'mismatched': []}
  correct = []
  for i in range(len(partner)):
    kps = b['trg_kps'][i][b['kps_valid'][i]]
    for kind, j in (('matched', i), ('mismatched', partner[i])):
      out = predictor.predict(images['src_img'][j], images['trg_img'][i], trg_kps=kps)
      pairs[kind].append({s: getattr(out, s) for s in SCORES})
      if kind == 'matched':
        err = np.linalg.norm(out.src_kps - b['src_kps'][i][b['kps_valid'][i]], axis=-1)
        correct.append(err <= 0.1 * b['pckthres'][i])
  report = {
      'checkpoint': checkpoint,
      'split': split,
      'pairs': len(partner),
      'keypoints': int(sum(len(c) for c in correct)),
      'pck@0.1': float(np.mean(np.concatenate(correct))) * 100,
      'machine': f'{platform.processor() or platform.machine()}, {platform.node()}',
  }
  for s in SCORES:
    m = np.array([p[s].mean() for p in pairs['matched']])
    w = np.array([p[s].mean() for p in pairs['mismatched']])
    kp = np.concatenate([p[s] for p in pairs['matched']])
    ok = np.concatenate(correct)
    report[s] = {
        'matched_mean': float(m.mean()),
        'matched_std': float(m.std()),
        'mismatched_mean': float(w.mean()),
        'mismatched_std': float(w.std()),
        'pair_auc': auc(m, w),
        'keypoint_auc_correct_vs_wrong': auc(kp[ok], kp[~ok]),
    }
  return report


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  cli.existing_path('checkpoint', f.checkpoint, 'any')
  report = measure(f.checkpoint, f.split)
  print(
      f"{report['pairs']} pairs, {report['keypoints']} keypoints, PCK@0.1 "
      f"{report['pck@0.1']:.1f}"
  )
  print(
      f"{'score':12s} {'matched pairs':>16s} {'mismatched pairs':>17s} {'pair AUC':>9s} "
      f"{'kp AUC (correct vs wrong)':>26s}"
  )
  for s in SCORES:
    r = report[s]
    print(
        f"{s:12s} {r['matched_mean']:8.3f} ± {r['matched_std']:.3f} "
        f"{r['mismatched_mean']:9.3f} ± {r['mismatched_std']:.3f} {r['pair_auc']:9.3f} "
        f"{r['keypoint_auc_correct_vs_wrong']:26.3f}"
    )
  if f.json:
    with open(f.json, 'w') as out:
      json.dump(report, out, indent=1)
  return 0


if __name__ == '__main__':
  define_flags()
  cli.run(main)
