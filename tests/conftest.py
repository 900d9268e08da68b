"""Shared pytest set-up.

Four simulated CPU devices (set before jax is imported) so that sharding code is exercised on
CPU; absl flags marked parsed so that grain's multiprocessing and absl-using code run under
pytest.
"""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

# The reference fixtures (../shared/fixtures/reference) live in ../shared beside the checkout (CI clones with shared/ beside
# it); SCCORR_FIXTURES points elsewhere.
FIXTURES = pathlib.Path(os.environ.get(
    "SCCORR_FIXTURES", ROOT.parent / "shared" / "fixtures" / "reference"))


@pytest.fixture(scope="session")
def fixtures_dir():
  if not FIXTURES.is_dir():
    message = (f"reference fixtures not found at {FIXTURES} (set SCCORR_FIXTURES); the parity "
               "tests need them")
    if os.environ.get("CI"):  # In CI a missing fixture is a failure, never a silent skip.
      pytest.fail(message)
    pytest.skip(message)
  return FIXTURES


@pytest.fixture(scope="session")
def reference_forward(fixtures_dir):
  """(model_forward.npz as a dict, the regenerated reference weights name -> float32 array)."""
  import importlib.util
  import json

  import numpy as np

  spec = importlib.util.spec_from_file_location("weights_recipe",
                                                fixtures_dir / "weights_recipe.py")
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  fx = dict(np.load(fixtures_dir / "model_forward.npz"))
  names = [str(n) for n in fx["param_names"]]
  shapes = [tuple(s) for s in json.loads(str(fx["param_shapes_json"]))]
  weights = recipe.make_weights(list(zip(names, shapes)), seed=int(fx["weights_seed"]))
  assert recipe.weights_digest(weights, names) == str(fx["weights_sha256"])
  return fx, weights


@pytest.fixture(scope="module")
def fast_compiles():
  """Tiny models: XLA's optimisation passes cost more than they save. Opt in per module with
  `pytestmark = pytest.mark.usefixtures('fast_compiles')` (never for the parity tests)."""
  import jax

  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
