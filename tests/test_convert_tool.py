"""tools/convert_torch.py: a reference state dict (real names and shapes) -> Orbax -> variables."""

import pathlib
import subprocess
import sys

import jax
import numpy as np

from sccorr_jax import models
from sccorr_jax import checkpoint, convert

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run(
      [sys.executable, str(ROOT / "tools" / "convert_torch.py"), *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_convert_tool_round_trips_the_reference_state_dict(tmp_path, reference_forward):
  fx, weights = reference_forward
  src = tmp_path / "scorrsan_spair.npz"
  np.savez(src, **weights)
  out = tmp_path / "converted"
  res = _run(f"--input={src}", "--config=configs/spair.py", f"--output={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  variables, config = checkpoint.load_model_variables(out)
  assert int(config.model.sce_kernel_size) == int(fx["sce_ksize"])
  model = models.build_model(config)
  back = convert.to_torch_state_dict(jax.tree.map(np.asarray, variables), model)
  used = [k for k in weights if not (".layer4." in k or ".fc." in k or "num_batches" in k)]
  assert sorted(back) == sorted(used)
  for k in used:
    np.testing.assert_array_equal(back[k], weights[k], err_msg=k)


def test_convert_tool_reports_a_config_mismatch(tmp_path, reference_forward):
  _, weights = reference_forward
  src = tmp_path / "scorrsan_spair.npz"
  np.savez(src, **weights)
  # The PF-PASCAL configuration (SCE 13/1024) cannot hold SPair-71k (7/2048) weights.
  res = _run(f"--input={src}", "--config=configs/pfpascal.py", f"--output={tmp_path / 'x'}")
  assert res.returncode != 0
  assert "shape mismatches" in res.stderr and "SCEs.0.conv.weight" in res.stderr
  assert not (tmp_path / "x").exists()


def test_convert_tool_names_a_missing_file(tmp_path):
  res = _run(f"--input={tmp_path / 'nope.pth'}", f"--output={tmp_path / 'x'}")
  assert res.returncode != 0 and "nope.pth" in res.stderr
