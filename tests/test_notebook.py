"""tools/colab_tpu.ipynb runs unchanged on a CPU runtime on the embedded dataset.

Its code cells are executed in order as one script (no Jupyter needed), in a fresh Python
process whose working directory holds links to the checkout, as a Colab VM would after the
install cell.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tools" / "colab_tpu.ipynb"


def _code_cells():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_and_tpu_ready():
  cells = _code_cells()
  text = "\n".join(cells)
  assert "jax[tpu]" in text and "drive.mount" in text and "gs://" in text
  assert "configs/spair.py" in text and "'mt'" in text
  for src in cells:  # plain Python (no shell magics), so it also runs as a script
    compile(src, "cell", "exec")
    assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines())


def test_notebook_runs_on_cpu(tmp_path):
  if not ((ROOT / "sccorr_jax" / "train.py").exists() and (ROOT / "configs" / "spair.py").exists()):
    pytest.skip("the trainer (sccorr_jax/train.py, configs/spair.py) is not in this checkout")
  for name in ("sccorr_jax", "configs", "tools", "requirements.txt"):
    (tmp_path / name).symlink_to(ROOT / name)
  script = tmp_path / "notebook_as_script.py"
  script.write_text("\n\n".join(_code_cells()))
  env = dict(
      os.environ,
      SCCORR_DATA_DIR=str(tmp_path / "tfds_data"),
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  proc = subprocess.run(
      [sys.executable, str(script)],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "pck@" in proc.stdout or "a=0.1" in proc.stdout
  report = tmp_path / "runs" / "colab_spair_mt" / "eval"
  assert list(report.glob("eval_synthetic_*.json")) and list(report.glob("eval_synthetic_*.txt"))
  for name in ("matches", "warped", "training_signals"):
    with Image.open(tmp_path / "pictures" / f"{name}.png") as im:
      assert im.format == "PNG" and im.size[0] > 0
