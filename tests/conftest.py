"""Shared pytest set-up.

Four simulated CPU devices (set before jax is imported) so that sharding code is exercised on
CPU; absl flags marked parsed so that grain's multiprocessing and absl-using code run under
pytest.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = pathlib.Path(__file__).resolve().parents[1]

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


def assert_trees_close(actual, desired, rtol: float, what: str = "") -> None:
  """Per leaf, norm-wise: `||actual - desired|| <= rtol * ||desired||` (float64 norms).

  The project's rule for float32 results of two differently compiled programs (sharded vs
  single-device, two fusions of one formula), and for anything after an optimiser step: float32
  rounding differs between CPU models, and Adam divides by a second moment that can be eps-sized,
  so one element's rounding difference can become a full learning-rate step. Per-element
  tolerances then pass on one CPU and fail on another; a leaf's norm does not.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  pairs = zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(desired))
  for (path, a), d in pairs:
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    assert a.shape == d.shape, (what, jax.tree_util.keystr(path), a.shape, d.shape)
    err, scale = np.linalg.norm(a - d), np.linalg.norm(d)
    assert err <= rtol * scale, (
        f"{what}{jax.tree_util.keystr(path)}: ||a - b|| = {err:.3g} > "
        f"{rtol:g} * ||b|| = {rtol * scale:.3g}"
    )


def load_module(path, name: str):
  """The Python file at `path` as a module called `name` (tools, fixture recipes)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def load_tool(name: str):
  """The module of `tools/<name>.py` (tools are scripts, not a package)."""
  return load_module(ROOT / "tools" / f"{name}.py", f"tools_{name}")


def run_python(*args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
  """`python ARGS` (this interpreter, the arguments as strings) in `cwd`, its output captured as
  text; a non-zero exit is the caller's to check."""
  return subprocess.run(
      [sys.executable, *map(str, args)],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


# The reference fixtures (../shared/fixtures/reference) live in ../shared beside the checkout (CI clones with shared/ beside
# it); SCCORR_FIXTURES points elsewhere.
FIXTURES = pathlib.Path(
    os.environ.get("SCCORR_FIXTURES", ROOT.parent / "shared" / "fixtures" / "reference")
)
# The DINOv2 fixtures (../shared/fixtures/dinov2, recorded from facebookresearch/dinov2);
# SCCORR_DINOV2_FIXTURES points elsewhere.
DINOV2_FIXTURES = pathlib.Path(
    os.environ.get("SCCORR_DINOV2_FIXTURES", ROOT.parent / "shared" / "fixtures" / "dinov2")
)


def _fixtures(path: pathlib.Path, env: str, what: str) -> pathlib.Path:
  if not path.is_dir():
    message = f"{what} fixtures not found at {path} (set {env}); the parity tests need them"
    if os.environ.get("CI"):  # In CI a missing fixture is a failure, never a silent skip.
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def fixtures_dir():
  return _fixtures(FIXTURES, "SCCORR_FIXTURES", "reference")


@pytest.fixture(scope="session")
def dinov2_fixtures_dir():
  return _fixtures(DINOV2_FIXTURES, "SCCORR_DINOV2_FIXTURES", "DINOv2")


@pytest.fixture(scope="session")
def reference_forward(fixtures_dir):
  """(model_forward.npz as a dict, the regenerated reference weights name -> float32 array)."""
  import json

  import numpy as np

  recipe = load_module(fixtures_dir / "weights_recipe.py", "weights_recipe")
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
