"""tools/match.py on two photographs from skimage.data, with a tiny exported checkpoint."""

from __future__ import annotations

import importlib.util
import json
import pathlib

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
TINY = dict(stage_sizes=(1, 1, 1, 1), backbone_width=8, sce_kernel_size=3, sce_features=16,
            feature_size=8)


def _tool():
  spec = importlib.util.spec_from_file_location("match_tool", ROOT / "tools" / "match.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  skimage_data = pytest.importorskip("skimage.data")
  root = tmp_path_factory.mktemp("match")
  config = ml_collections.ConfigDict({
      "learning_mode": "baseline", "model": dict(TINY, backbone_depth=101),
      "data": {"name": "synthetic", "img_size": 64}})
  model = models.build_model(config)
  x = jnp.zeros((1, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(0), x, x)
  export = checkpoint.save_model_variables(root / "export", variables, config)
  src = root / "chelsea.jpg"  # 300 x 451 RGB
  Image.fromarray(skimage_data.chelsea()).save(src)
  trg = root / "coffee_rgba.png"  # 400 x 600, RGBA
  Image.fromarray(skimage_data.coffee()).convert("RGBA").save(trg)
  return dict(root=root, export=export, src=str(src), trg=str(trg), tool=_tool())


def test_match_writes_flow_keypoints_and_pictures(setup):
  out = setup["root"] / "out"
  kps = setup["root"] / "kps.json"
  kps.write_text(json.dumps({"keypoints": [[10, 20], [599, 399], [300.5, 200.25]]}))
  rc = setup["tool"].main([f"--checkpoint={setup['export']}", setup["src"], setup["trg"],
                           f"--keypoints={kps}", f"--out={out}"])
  assert rc == 0
  flow = np.load(out / "flow.npy")
  assert flow.shape == (400, 600, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
  rec = json.load(open(out / "keypoints.json"))
  assert len(rec["matches"]) == 3 and rec["trg_size_hw"] == [400, 600]
  assert rec["src_size_hw"] == [300, 451]
  assert rec["matches"][1]["trg"] == [599.0, 399.0]
  for m in rec["matches"]:
    assert 0 <= m["confidence"] <= 1 + 1e-6
  # The keypoints agree with the dense flow at an integer keypoint.
  np.testing.assert_allclose(rec["matches"][0]["src"], np.array([10, 20]) + flow[20, 10],
                             atol=1e-3)
  with Image.open(out / "matches.png") as im:
    im.verify()
  with Image.open(out / "matches.png") as im:
    _, _, _, total = visualize.side_by_side_layout((300, 451), (400, 600))
    assert im.format == "PNG" and im.size == (total, 400) and im.mode == "RGB"
  with Image.open(out / "warped.png") as im:
    assert im.format == "PNG" and im.size == (600, 400)


def test_match_workdir_default_grid_and_bad_input(setup, capsys):
  tool = setup["tool"]
  out = setup["root"] / "out_grid"
  assert tool.main([f"--checkpoint={setup['export']}", setup["src"], setup["trg"],
                    f"--out={out}", "--grid=3"]) == 0
  assert len(json.load(open(out / "keypoints.json"))["matches"]) == 9
  capsys.readouterr()
  bad = setup["root"] / "bad.jpg"
  bad.write_bytes(b"\x89PNG garbage")
  cases = [
      ([f"--checkpoint={setup['root'] / 'no_such_run'}", setup["src"], setup["trg"]],
       "no checkpoint"),
      ([f"--checkpoint={setup['export']}", str(bad), setup["trg"]], "bad.jpg: cannot read"),
      ([f"--checkpoint={setup['export']}", setup["src"], str(setup["root"] / "none.png")],
       "none.png: no such image file"),
  ]
  kps = setup["root"] / "outside.json"
  kps.write_text("[[5, 5], [650, 10]]")
  cases.append(([f"--checkpoint={setup['export']}", setup["src"], setup["trg"],
                 f"--keypoints={kps}"], "#1 (x=650, y=10)"))
  for argv, message in cases:
    assert tool.main(argv + [f"--out={setup['root'] / 'bad_out'}"]) == 2
    err = capsys.readouterr().err
    assert message in err, (message, err)
  assert not (setup["root"] / "bad_out").exists()


def test_checkpoint_of_another_configuration_is_named(setup):
  from sccorr_jax import predict  # pylint: disable=g-import-not-at-top
  other = ml_collections.ConfigDict({
      "learning_mode": "baseline", "model": dict(TINY, sce_kernel_size=5),
      "data": {"name": "synthetic", "img_size": 64}})
  with pytest.raises(Exception, match=r"sce.*(140|148)"):
    checkpoint.load_model_variables(setup["export"], model_config=other)
  model, variables, _ = predict.load_model(setup["export"])
  with pytest.raises(predict.CheckpointError, match=r"params/sce/conv/kernel has shape"):
    predict.check_variables(models.build_model(other), variables, 64, source="export")
