"""tools/match.py on two photographs from skimage.data, with a tiny exported checkpoint."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from sccorr_jax import models
from sccorr_jax import visualize

# The trainer's checkpoint module (save_model_variables, load_model_variables, build_model).
checkpoint = pytest.importorskip("sccorr_jax.checkpoint")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(
    stage_sizes=(1, 1, 1, 1), backbone_width=8, sce_kernel_size=3, sce_features=16, feature_size=8
)


def _match(*args):
  """tools/match.py through the command line, from a directory other than the checkout."""
  return subprocess.run(
      [sys.executable, str(ROOT / "tools" / "match.py"), *map(str, args)],
      cwd=ROOT.parent,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  skimage_data = pytest.importorskip("skimage.data")
  root = tmp_path_factory.mktemp("match")
  config = ml_collections.ConfigDict(
      {
          "learning_mode": "baseline",
          "model": dict(TINY, backbone_depth=101),
          "data": {"name": "synthetic", "img_size": 64},
      }
  )
  model = models.build_model(config)
  x = jnp.zeros((1, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(0), x, x)
  export = checkpoint.save_model_variables(root / "export", variables, config)
  src = root / "chelsea.jpg"  # 300 x 451 RGB
  Image.fromarray(skimage_data.chelsea()).save(src)
  trg = root / "coffee_rgba.png"  # 400 x 600, RGBA
  Image.fromarray(skimage_data.coffee()).convert("RGBA").save(trg)
  return dict(root=root, export=export, src=str(src), trg=str(trg))


def test_match_writes_flow_keypoints_and_pictures(setup):
  out = setup["root"] / "out"
  kps = setup["root"] / "kps.json"
  kps.write_text(json.dumps({"keypoints": [[10, 20], [599, 399], [300.5, 200.25]]}))
  r = _match(
      f"--checkpoint={setup['export']}",
      setup["src"],
      setup["trg"],
      f"--keypoints={kps}",
      f"--out={out}",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "matched 3 keypoints" in r.stdout and "shrunk" not in r.stdout
  assert r.stderr.strip() == "", r.stderr  # no library chatter in a normal run
  flow = np.load(out / "flow.npy")
  assert flow.shape == (400, 600, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
  rec = json.load(open(out / "keypoints.json"))
  assert len(rec["matches"]) == 3 and rec["trg_size_hw"] == [400, 600]
  assert rec["src_size_hw"] == [300, 451] and rec["flow_size_hw"] == [400, 600]
  assert rec["matches"][1]["trg"] == [599.0, 399.0]
  for m in rec["matches"]:
    assert 0 <= m["confidence"] <= 1 + 1e-6
    assert m["confidence"] == pytest.approx(m["mass"] * m["consistency"], rel=1e-5)
  # The keypoints agree with the dense flow at an integer keypoint.
  np.testing.assert_allclose(rec["matches"][0]["src"], np.array([10, 20]) + flow[20, 10], atol=1e-3)
  with Image.open(out / "matches.png") as im:
    im.verify()
  with Image.open(out / "matches.png") as im:
    _, _, _, total = visualize.side_by_side_layout((300, 451), (400, 600))
    assert im.format == "PNG" and im.size == (total, 400) and im.mode == "RGB"
  with Image.open(out / "warped.png") as im:
    assert im.format == "PNG" and im.size == (600, 400)


def test_a_large_target_gives_a_bounded_flow_and_says_so(setup):
  """A large image is shrunk when read: flow.npy and warped.png are at most --max_side."""
  big = setup["root"] / "big.png"  # 1200 x 1800 (h x w)
  Image.open(setup["trg"]).convert("RGB").resize((1800, 1200)).save(big)
  out = setup["root"] / "out_big"
  r = _match(
      f"--checkpoint={setup['export']}",
      setup["src"],
      big,
      f"--out={out}",
      "--grid=3",
      "--max_side=300",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "flow.npy is 300x200, the 1800x1200 target shrunk 6.00x" in r.stdout, r.stdout
  flow = np.load(out / "flow.npy")
  assert flow.shape == (200, 300, 2)
  rec = json.load(open(out / "keypoints.json"))
  assert len(rec["matches"]) == 9 and rec["trg_size_hw"] == [1200, 1800]
  assert rec["flow_size_hw"] == [200, 300]
  # Flow pixel (i, j) is the target point ((j + .5) * 6 - .5, (i + .5) * 6 - .5): the grid's
  # centre keypoint (899.5, 599.5) lies between pixels; the flow there matches its source point.
  centre = rec["matches"][4]
  np.testing.assert_allclose(centre["trg"], [899.5, 599.5])
  i, j = 99.5 - 0.5, 149.5 - 0.5  # flow-pixel coordinates of (899.5, 599.5)
  f = flow[int(i) : int(i) + 2, int(j) : int(j) + 2].mean(axis=(0, 1))
  np.testing.assert_allclose(centre["src"], np.array(centre["trg"]) + f, atol=0.5)
  with Image.open(out / "warped.png") as im:
    assert im.size == (300, 200)


def test_checkpoint_of_another_configuration_is_named(setup):
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top

  other = ml_collections.ConfigDict(
      {
          "learning_mode": "baseline",
          "model": dict(TINY, sce_kernel_size=5),
          "data": {"name": "synthetic", "img_size": 64},
      }
  )
  with pytest.raises(Exception, match=r"sce.*(140|148)"):
    checkpoint.load_model_variables(setup["export"], model_config=other)
  model, variables, _ = predict.load_model(setup["export"])
  with pytest.raises(predict.CheckpointError, match=r"params/sce/conv/kernel has shape"):
    predict.check_variables(models.build_model(other), variables, 64, source="export")


def test_measure_confidence_statistics():
  from conftest import load_tool  # pylint: disable=g-import-not-at-top

  tool = load_tool("measure_confidence")
  assert tool.auc([2.0, 3.0], [1.0]) == 1.0 and tool.auc([1.0], [2.0, 3.0]) == 0.0
  assert tool.auc([1.0, 2.0], [1.0, 2.0]) == 0.5  # ties count half
  category = np.array([0, 0, 0, 1, 1, 2])
  partner = tool.other_category(category)
  assert (category[partner] != category).all()
  with pytest.raises(ValueError, match="same category"):
    tool.other_category(np.zeros(3, int))
