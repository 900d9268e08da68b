"""The evaluator: sums and counts per protocol, against hand-computed values and pck.npz."""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sccorr_jax import checkpoint
from sccorr_jax import config_lib
from sccorr_jax import constants
from sccorr_jax import evaluation
from sccorr_jax.data import transforms

ALPHAS = (0.05, 0.1, 0.15)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _counts(flow, batch, protocol):
  return jax.device_get(
      evaluation.pair_counts(
          jnp.asarray(flow), batch, protocol.alphas, protocol.thresholds, protocol.img_size
      )
  )


def _hand_batch():
  """Three pairs on a 16-pixel image, zero flow (est = trunc(trg)), hand-made distances.

  bbox thresholds 40, 20, 40 -> bounds 2/4/6, 1/2/3, 2/4/6 at alpha 0.05/0.1/0.15; img = 16 ->
  0.8/1.6/2.4.
  """
  n = 5
  trg = np.zeros((3, n, 2), np.float32)
  src = np.zeros((3, n, 2), np.float32)
  valid = np.zeros((3, n), bool)
  # Pair 0: distances 0, 2 (tie at 0.05), 4 (tie at 0.1), 6 (tie at 0.15), 6.0001; padded slot 4
  # is filled so that it *would* be correct.
  trg[0, :4] = [
      [1.0, 1.0],
      [1.7, 1.2],
      [3.0, 3.9],
      [5.0, 5.0],
  ]  # truncated: (1,1) (1,1) (3,3) (5,5)
  src[0, :4] = [[1.0, 1.0], [3.0, 1.0], [3.0, 7.0], [11.0, 5.0]]
  valid[0, :4] = True
  trg[0, 4] = src[0, 4] = [2.0, 2.0]
  # Pair 1: threshold 20; distances 1 (tie at 0.05), 3 (tie at 0.15), 3.5.
  trg[1, :3] = [[0.0, 0.0], [4.0, 4.0], [8.0, 8.0]]
  src[1, :3] = [[1.0, 0.0], [4.0, 7.0], [8.0, 11.5]]
  valid[1, :3] = True
  # Pair 2: one keypoint outside the image (-0.4 -> 0 after truncation, 17.2 -> clamped 15).
  trg[2, :2] = [[-0.4, 3.0], [17.2, 3.0]]
  src[2, :2] = [[0.0, 3.0], [15.0, 9.0]]  # distances 0 and 6
  valid[2, :2] = True
  batch = dict(
      trg_kps=trg,
      src_kps=src,
      kps_valid=valid,
      pckthres_bbox=np.array([40.0, 20.0, 40.0], np.float32),
      pckthres_img=np.full(3, 16.0, np.float32),
      category=np.array([0, 1, 0], np.int32),
      pair_valid=np.ones(3, bool),
  )
  flow = np.zeros((3, 4, 4, 2), np.float32)
  # Hand counts [kind][alpha][pair]:
  #   bbox: pair0 d = 0,2,4,6 vs 2/4/6 -> 2, 3, 4; pair1 d = 1,3,3.5 vs 1/2/3 -> 1, 1, 2;
  #         pair2 d = 0,6 vs 2/4/6 -> 1, 1, 2.
  #   img:  pair0 vs 0.8/1.6/2.4 -> 1, 1, 2; pair1 -> 0 (d=1 > 0.8), 1, 1; pair2 -> 1, 1, 1.
  want = np.array([[[2, 1, 1], [3, 1, 1], [4, 2, 2]], [[1, 0, 1], [1, 1, 1], [2, 1, 1]]])
  return flow, batch, want


def test_pair_counts_hand_computed_with_ties_and_padding():
  flow, batch, want = _hand_batch()
  protocol = evaluation.Protocol("spair71k", alphas=ALPHAS, thresholds=("bbox", "img"), img_size=16)
  counts = _counts(flow, batch, protocol)
  np.testing.assert_array_equal(counts["n_valid"], [4, 3, 2])
  np.testing.assert_array_equal(counts["n_correct"], want)


def test_accumulator_per_pair_per_keypoint_per_category():
  flow, batch, want = _hand_batch()
  protocol = evaluation.Protocol("spair71k", alphas=ALPHAS, thresholds=("bbox", "img"), img_size=16)
  acc = evaluation.PckAccumulator(protocol, ["cat_a", "cat_b"])
  acc.update(_counts(flow, batch, protocol), batch)
  res = acc.result()
  n = np.array([4, 3, 2])
  for k, kind in enumerate(("bbox", "img")):
    for a, alpha in enumerate(ALPHAS):
      per_pair = 100 * np.mean(want[k, a] / n)
      per_kp = 100 * want[k, a].sum() / n.sum()
      assert res.pck(kind, alpha, "per_pair") == pytest.approx(per_pair, rel=1e-12)
      assert res.pck(kind, alpha, "per_keypoint") == pytest.approx(per_kp, rel=1e-12)
      cat_a = 100 * np.mean(want[k, a, [0, 2]] / n[[0, 2]])
      assert res.pck(kind, alpha, "per_pair", "category=cat_a") == pytest.approx(cat_a)
      assert res.pck(kind, alpha, "per_pair", "category=cat_b") == pytest.approx(
          100 * want[k, a, 1] / 3
      )
  # Spelled out once: bbox, alpha 0.1, per pair = (3/4 + 1/3 + 1/2) / 3.
  assert res.pck("bbox", 0.1) == pytest.approx(100 * (3 / 4 + 1 / 3 + 1 / 2) / 3)
  assert res.pck("bbox", 0.1, "per_keypoint") == pytest.approx(100 * 5 / 9)
  assert res.groups["all"].pairs == 3 and res.groups["all"].keypoints == 9


def test_partial_last_batch_is_masked_not_dropped_or_double_counted():
  flow, batch, _ = _hand_batch()
  protocol = evaluation.Protocol("spair71k", alphas=ALPHAS, thresholds=("bbox", "img"), img_size=16)
  whole = evaluation.PckAccumulator(protocol)
  whole.update(_counts(flow, batch, protocol), batch)
  # Batches of 2: [pair 0, pair 1], [pair 2, padding copy of pair 0 with pair_valid False].
  split = evaluation.PckAccumulator(protocol)
  idx = [np.array([0, 1]), np.array([2, 0])]
  for j, rows in enumerate(idx):
    sub = {k: v[rows] for k, v in batch.items()}
    sub["pair_valid"] = np.array([True, j == 0])
    split.update(_counts(flow[rows], sub, protocol), sub)
  assert split.num_padding_pairs == 1
  a, b = whole.result(), split.result()
  assert a.flat() == b.flat()
  assert b.groups["all"].pairs == 3 and b.groups["all"].keypoints == 9


def test_fixture_pck_npz_per_pair_and_per_keypoint(fixtures_dir):
  ref = dict(np.load(fixtures_dir / "pck.npz"))
  flow = ref["flow"].transpose(0, 2, 3, 1)
  valid = np.arange(40)[None] < ref["n_pts"][:, None]
  batch = dict(
      trg_kps=ref["trg_kps"].transpose(0, 2, 1),
      src_kps=ref["src_kps"].transpose(0, 2, 1),
      kps_valid=valid,
      pckthres_bbox=ref["pckthres"],
  )
  protocol = evaluation.Protocol("spair71k", alphas=tuple(ref["alphas"]), thresholds=("bbox",))
  counts = _counts(flow, batch, protocol)
  np.testing.assert_array_equal(counts["n_correct"][0], ref["correct"].sum(-1))
  acc = evaluation.PckAccumulator(protocol)
  acc.update(counts, batch)
  res = acc.result()
  for i, alpha in enumerate(ref["alphas"]):
    # The reference's validation number: the mean of the per-pair values of `pck`.
    assert res.pck("bbox", float(alpha)) == pytest.approx(ref["pck"][i].mean(), rel=1e-12)
    assert res.pck("bbox", float(alpha), "per_keypoint") == pytest.approx(
        100 * ref["correct"][i].sum() / ref["n_pts"].sum(), rel=1e-12
    )


def test_pfwillow_legacy_and_corrected_thresholds():
  # Ten keypoints in [100, 150] x [60, 140] of a 256 image: corrected bbox = max(50, 80) = 80;
  # legacy (padding -1 in the 30 empty slots) = max(150 + 1, 140 + 1) = 151.
  kps = np.zeros((40, 2), np.float32)
  valid = np.zeros(40, bool)
  xs = np.linspace(100, 150, 10)
  ys = np.linspace(60, 140, 10)
  kps[:10] = np.stack([xs, ys], -1)
  valid[:10] = True
  legacy = float(transforms.legacy_willow_threshold(kps, valid))
  assert legacy == 151.0
  # Transferred keypoints off by 10 px: correct at alpha 0.1 for legacy (15.1) but not for the
  # corrected threshold (8.0); at 0.15 both (12.0, 22.65).
  trg = kps.copy()
  src = kps.copy()
  src[:10, 0] += 10.0
  batch = dict(
      trg_kps=trg[None],
      src_kps=src[None],
      kps_valid=valid[None],
      pckthres_bbox=np.float32([80.0]),
      pckthres_bbox_legacy=np.float32([legacy]),
      pckthres_img=np.float32([256.0]),
      category=np.int32([0]),
  )
  protocol = evaluation.Protocol("pfwillow", alphas=(0.05, 0.1, 0.15))
  assert protocol.thresholds == ("bbox", "img", "bbox_legacy")
  acc = evaluation.PckAccumulator(protocol, ["car(G)"])
  acc.update(_counts(np.zeros((1, 64, 64, 2), np.float32), batch, protocol), batch)
  res = acc.result()
  assert res.pck("bbox", 0.05) == 0 and res.pck("bbox", 0.1) == 0
  assert res.pck("bbox", 0.15) == 100
  assert res.pck("bbox_legacy", 0.05) == 0 and res.pck("bbox_legacy", 0.1) == 100
  assert res.pck("img", 0.05) == 100  # 12.8
  assert "bbox_legacy" in res.table() and "padding" in res.table()


def test_difficulty_groups_and_report_tags(tmp_path):
  flow, batch, want = _hand_batch()
  batch = dict(batch, viewpoint_variation=np.int32([0, 2, 2]), occlusion=np.int32([1, 0, 1]))
  protocol = evaluation.Protocol(
      "spair71k", split="test", alphas=ALPHAS, thresholds=("bbox", "img"), img_size=16
  )
  acc = evaluation.PckAccumulator(protocol, ["cat_a", "cat_b"])
  acc.update(_counts(flow, batch, protocol), batch)
  res = acc.result()
  assert res.pck("bbox", 0.1, group="viewpoint_variation=2") == pytest.approx(
      100 * (1 / 3 + 1 / 2) / 2
  )
  assert res.pck("bbox", 0.15, group="occlusion=1") == pytest.approx(100 * (4 / 4 + 2 / 2) / 2)
  paths = res.write(str(tmp_path), "eval", checkpoint="ckpt")
  report = json.load(open(paths["json"]))
  assert report["pairs"] == 3 and report["checkpoint"] == "ckpt"
  keys = {
      "threshold",
      "alpha",
      "averaging",
      "resolution",
      "direction",
      "group",
      "benchmark",
      "split",
      "pck",
  }
  for r in report["results"]:
    assert keys <= set(r)
    assert r["metric"] == evaluation.metric_name(
        r["threshold"], r["alpha"], r["averaging"], 16, r["group"]
    )
  assert "pck@0.1/bbox/per_pair/16px/trg->src" in res.flat(groups=False)
  table = open(paths["table"]).read()
  assert "bbox (standard)" in table and "cat_b" in table and "viewpoint_variation=2 (hard)" in table


def test_standard_thresholds_agree_with_the_data_pipeline():
  assert evaluation.default_thresholds("pfpascal")[0] == "img"
  assert evaluation.default_thresholds("spair71k") == ("bbox", "img")


class _FlowFromImage(nn.Module):
  """A stand-in network whose flow is written in the source image (channels 0, 1 of a 4x4 grid)."""

  @nn.compact
  def __call__(self, src_img, trg_img):
    del trg_img
    return src_img[:, :4, :4, :2] + 0 * self.param("w", nn.initializers.zeros, ())


def test_evaluate_model_data_parallel_with_host_padding():
  # 5 pairs in batches of 3 (the last one partial, padded by a copy with pair_valid False);
  # 3 does not divide the 4 simulated devices, so the evaluator pads again on the host.
  flow, batch, want = _hand_batch()
  rng = np.random.default_rng(0)
  flows = np.concatenate([flow, rng.normal(scale=0.3, size=(2, 4, 4, 2))]).astype(np.float32)
  full = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
  full["src_img"] = np.zeros((5, 16, 16, 3), np.float32)
  full["src_img"][:, :4, :4, :2] = flows
  full["trg_img"] = np.zeros((5, 16, 16, 3), np.float32)
  batches = []
  for rows, real in (([0, 1, 2], [1, 1, 1]), ([3, 4, 0], [1, 1, 0])):
    b = {k: v[rows] for k, v in full.items()}
    b["pair_valid"] = np.array(real, bool)
    batches.append(b)
  protocol = evaluation.Protocol("spair71k", alphas=ALPHAS, thresholds=("bbox", "img"), img_size=16)
  model = _FlowFromImage()
  variables = model.init(jax.random.PRNGKey(0), full["src_img"][:1], full["trg_img"][:1])
  res = evaluation.evaluate_model(model, variables, batches, protocol, progress=False)
  direct = evaluation.PckAccumulator(protocol)
  direct.update(
      _counts(flows, full, protocol), {"pair_valid": np.ones(5, bool), "category": full["category"]}
  )
  assert res.flat() == direct.result().flat()
  assert res.groups["all"].pairs == 5 and res.num_padding_pairs == 1


# ------------------------------------------------------------------------------------------------
# A checkpoint written by a (shrunk) demo run reproduces the validation PCK its trainer logged.


def _demo_config(data_dir):
  c = config_lib.load_config(f"{ROOT / 'configs' / 'demo_warp.py'}:mt,runlocal")
  overrides = {
      "data.data_dir": str(data_dir),
      "data.synthetic_train_pairs_per_photo": 2,
      "data.synthetic_eval_pairs_per_photo": 3,
      "optim.num_epochs": 2,
      "optim.steps_per_epoch": 1,
      "teacher.pseudo_start_epoch": 1,
      "eval.every_epochs": 1,
      "eval.batch_size": 4,
      "eval.max_batches": None,
      "progress_bar": False,
  }
  return config_lib.apply_overrides(c, overrides)


def test_demo_checkpoint_reproduces_the_logged_validation_pck(tmp_path):
  train = pytest.importorskip("sccorr_jax.train")
  if not (ROOT / "configs" / "demo_warp.py").exists():
    pytest.skip("configs/demo_warp.py is not in this checkout")
  from sccorr_jax import data  # pylint: disable=g-import-not-at-top
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top

  config = _demo_config(tmp_path / "data")
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  logged = [m for m in logged if "val/pck@0.1" in m]
  assert len(logged) == 2
  best = summary["best"]
  at_best = [m for m in logged if m["step"] == best["step"]][-1]
  assert at_best["val/pck@0.1"] == pytest.approx(best["value"], abs=1e-9)
  # The recorded best model of the best checkpoint, and each mutual teacher by index.
  result = evaluation.evaluate_checkpoint(
      config, str(workdir), str(tmp_path / "eval"), split=config.eval.split, progress=False
  )
  for a in config.eval.alphas:
    assert result.pck("bbox", a) == pytest.approx(at_best[f"val/pck@{a:g}"], abs=1e-9)
  protocol = evaluation.Protocol.from_config(config, config.eval.split)
  batches = data.create_eval_iterator(
      config.data, config.eval.split, batch_size=config.eval.batch_size
  )
  step = None
  for index, name in ((0, "a"), (1, "b")):
    model, variables, _ = predict.load_model(str(workdir), model_index=index)
    step = step or evaluation.make_eval_step(model, protocol)
    r = evaluation.evaluate_model(
        model, variables, batches, protocol, eval_step=step, progress=False
    )
    assert r.pck("bbox", 0.1) == pytest.approx(at_best[f"val/{name}/pck@0.1"], abs=1e-9)
    assert r.pck("bbox", 0.1, "per_keypoint") == pytest.approx(
        at_best[f"val/{name}/pck@0.1/per_keypoint"], abs=1e-9
    )
  report = json.load(open(tmp_path / "eval" / f"eval_synthetic_{config.eval.split}.json"))
  assert report["pairs"] == 9 and report["padding_pairs_masked"] == 3  # 9 pairs, batches of 4


def test_one_metric_key_scheme_for_reports_and_training_logs():
  assert evaluation.metric_name("bbox", 0.1, "per_pair", 256) == (
      "pck@0.1/bbox/per_pair/256px/trg->src"
  )
  assert evaluation.metric_name("img", 0.05, "per_keypoint", 96, "category=cat") == (
      "pck@0.05/img/per_keypoint/96px/trg->src/category=cat"
  )
  assert evaluation.metric_key(0.1, scope="val/") == "val/pck@0.1"
  assert evaluation.metric_key(0.1, averaging="per_keypoint", scope="val/a") == (
      "val/a/pck@0.1/per_keypoint"
  )
  assert evaluation.metric_key(0.15, scope="val/zero_flow") == "val/zero_flow/pck@0.15"
  config = ml_collections.ConfigDict({"eval": {"select_alpha": 0.05}})
  assert checkpoint.select_metric(config) == "val/pck@0.05"


def test_metric_keys_parse_back_into_their_parts():
  for key in (
      "val/pck@0.1",
      "val/a/pck@0.1/per_keypoint",
      "val/zero_flow/pck@0.15",
      "test/pck@0.05",
      "pck@0.1/bbox/per_pair/256px/trg->src",
      "pck@0.05/img/per_keypoint/96px/trg->src/category=cat",
  ):
    parts = constants.parse_metric_key(key)
    assert constants.metric_key(*parts) == key
  assert constants.parse_metric_key("val/a/pck@0.1/per_keypoint") == constants.MetricKey(
      0.1, averaging="per_keypoint", scope="val/a"
  )
  assert constants.parse_metric_key("pck@0.05/bbox_legacy/per_pair/256px/trg->src").img_size == 256
  for key in ("val/epoch", "val/best_model", "train/a/loss_sup", "val/pck@x"):
    assert constants.parse_metric_key(key) is None
