"""The whole network against the reference forward (model_forward.npz), weight import, and the
model-level contracts (jit, vmap over two parameter sets, separate BatchNorm statistics)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax import convert
from sccorr_jax.models import SCorrSAN

nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
TINY = dict(
    stage_sizes=(1, 1, 1, 1), backbone_width=8, sce_kernel_size=3, sce_features=16, feature_size=8
)


@pytest.fixture(scope="module")
def reference(reference_forward):
  fx, weights = reference_forward
  model = SCorrSAN(
      sce_kernel_size=int(fx["sce_ksize"]),
      sce_features=int(fx["sce_outdim"]),
      feature_size=int(fx["feature_size"]),
  )
  return fx, weights, model


def _forward(model, variables, fx, dtype):
  src = jnp.asarray(nhwc(fx["src_img"]).astype(dtype))
  trg = jnp.asarray(nhwc(fx["trg_img"]).astype(dtype))
  variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
  fn = jax.jit(lambda v, s, t: model.apply(v, s, t, return_aux=True))
  return jax.tree.map(np.asarray, fn(variables, src, trg))


def _stats(x):
  x = x.reshape(x.shape[0], -1).astype(np.float64)
  return np.stack([x.mean(1), np.abs(x).mean(1), np.sqrt((x**2).mean(1))], axis=1)


def test_full_forward_float64(reference):
  fx, weights, model = reference
  variables = convert.from_torch_state_dict(weights, model)
  with jax.enable_x64(True):
    flow, aux = _forward(model, variables, fx, np.float64)
  assert flow.dtype == np.float64 and flow.shape == (2, 64, 64, 2)
  # The README's x64 tolerances: flow 1e-6 grid cells (expect ~1e-10); float32-rounded
  # intermediates within 2e-6 of their max; block statistics rtol 1e-6.
  np.testing.assert_allclose(flow, nhwc(fx["flow"]), atol=1e-6, rtol=0)
  grid = np.stack(
      [
          (flow[..., 0] + np.arange(64)[None, None, :]) * 2 / 63 - 1,
          (flow[..., 1] + np.arange(64)[None, :, None]) * 2 / 63 - 1,
      ],
      -1,
  )
  np.testing.assert_allclose(grid[..., 0], fx["grid_x"][:, 0], atol=1e-8, rtol=0)
  np.testing.assert_allclose(grid[..., 1], fx["grid_y"][:, 0], atol=1e-8, rtol=0)
  for ours, key in [
      (aux["src_feat"], "src_feat"),
      (aux["trg_feat"], "trg_feat"),
      (aux["src_ctx"], "src_sce"),
      (aux["trg_ctx"], "trg_sce"),
  ]:
    ref = nhwc(fx[key])
    assert np.abs(ours - ref).max() <= 2e-6 * np.abs(ref).max(), key
  corr = aux["corr"].reshape(2, 256, 256)
  assert np.abs(corr - fx["corr_mnn"]).max() <= 2e-6 * np.abs(fx["corr_mnn"]).max()
  for side in ("src", "trg"):
    bb = aux[f"{side}_backbone"]
    np.testing.assert_allclose(_stats(bb["stem"]), fx[f"{side}_stem_stats"], rtol=1e-6)
    blocks = [bb[f"layer{s}_{i}_pre_relu"] for s, n in zip((1, 2, 3), (3, 4, 23)) for i in range(n)]
    ours = np.stack([_stats(b) for b in blocks])
    np.testing.assert_allclose(ours, fx[f"{side}_block_stats"][:30], rtol=1e-6)


def test_full_forward_float32(reference):
  fx, weights, model = reference
  variables = convert.from_torch_state_dict(weights, model)
  flow, aux = _forward(model, variables, fx, np.float32)
  assert flow.dtype == np.float32
  # float32 on CPU: flow within 5e-3 cells (the reference's own float32 run is within 7.1e-4),
  # features and context within 1e-4 of their max.
  np.testing.assert_allclose(flow, nhwc(fx["flow"]), atol=5e-3, rtol=0)
  for ours, key in [(aux["src_feat"], "src_feat"), (aux["trg_ctx"], "trg_sce")]:
    ref = nhwc(fx[key])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), key


def test_convert_round_trip_and_errors(reference):
  fx, weights, model = reference
  variables = convert.from_torch_state_dict(weights, model)
  back = convert.to_torch_state_dict(variables, model)
  ignored = [k for k in weights if ".layer4." in k or ".fc." in k or "num_batches" in k]
  assert set(back) == set(weights) - set(ignored)
  for k, v in back.items():
    np.testing.assert_array_equal(v, weights[k], err_msg=k)
  # Torchvision-style names fill the backbone; the head comes from init_variables.
  tv = {
      k[len(convert.BACKBONE_PREFIX) :]: v
      for k, v in weights.items()
      if k.startswith(convert.BACKBONE_PREFIX)
  }
  head_init = {"params": {"x_normal": np.zeros(64, np.float32)}}
  init = flax.core.unfreeze(jax.tree.map(np.asarray, variables))
  init["params"]["x_normal"] = np.full(64, 7.0, np.float32)
  tv_vars = convert.from_torch_state_dict(tv, model, init_variables=init)
  np.testing.assert_array_equal(tv_vars["params"]["x_normal"], 7.0)
  np.testing.assert_array_equal(
      tv_vars["params"]["backbone"]["layer3_22"]["conv2"]["kernel"],
      variables["params"]["backbone"]["layer3_22"]["conv2"]["kernel"],
  )
  del head_init
  # Errors list every problem.
  bad = dict(weights)
  del bad["SCEs.0.conv.bias"]
  bad["feature_extraction.backbone.layer3.22.bn3.weight"] = np.zeros(3, np.float32)
  bad["something.else"] = np.zeros(1)
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torch_state_dict(bad, model)
  msg = str(e.value)
  assert "SCEs.0.conv.bias" in msg and "something.else" in msg and "layer3.22.bn3.weight" in msg
  wrong = SCorrSAN(sce_kernel_size=13, sce_features=1024)  # the PF-PASCAL configuration
  with pytest.raises(convert.ConversionError, match="shape mismatches"):
    convert.from_torch_state_dict(weights, wrong)


def _tiny_inputs(b=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return (
      jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32),
      jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32),
  )


def test_tiny_model_jits_and_vmaps_over_two_parameter_sets():
  model = SCorrSAN(**TINY)
  src, trg = _tiny_inputs()
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  stacked = jax.jit(jax.vmap(lambda k: model.init(k, src, trg)))(keys)
  apply = jax.jit(model.apply)
  flows = jax.jit(jax.vmap(apply, in_axes=(0, None, None)))(stacked, src, trg)
  assert flows.shape == (2, 2, 8, 8, 2)
  for i in range(2):
    one = jax.tree.map(lambda a: a[i], stacked)
    # vmap reassociates float32 sums; the sharp softmax amplifies that to ~1e-5 cells.
    np.testing.assert_allclose(flows[i], apply(one, src, trg), atol=1e-4)
  assert not np.allclose(flows[0], flows[1])


def test_train_mode_keeps_source_and_target_statistics_separate():
  """One batched call with train=True equals the reference's two separate backbone calls."""
  model = SCorrSAN(**TINY)
  src, trg = _tiny_inputs()
  trg = trg * 3.0 + 1.0  # different statistics from the source
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), src, trg)
  (flow, aux), updates = jax.jit(
      functools.partial(model.apply, train=True, mutable=["batch_stats"], return_aux=True)
  )(variables, src, trg)
  # Reference: backbone(src) then backbone(trg), each call with its own batch statistics and
  # each updating the running statistics (momentum 0.1, unbiased variance).
  trunk = model.bind(variables).backbone.clone(parent=None)
  run = jax.jit(functools.partial(trunk.apply, train=True, mutable=["batch_stats"]))
  bb_vars = {
      "params": variables["params"]["backbone"],
      "batch_stats": variables["batch_stats"]["backbone"],
  }
  (ref_src, _), after_src = run(bb_vars, src)
  (ref_trg, _), after_trg = run({"params": bb_vars["params"], **after_src}, trg)
  np.testing.assert_allclose(aux["src_feat"], ref_src, atol=1e-5)
  np.testing.assert_allclose(aux["trg_feat"], ref_trg, atol=1e-5)
  ours = jax.tree.map(np.asarray, updates["batch_stats"]["backbone"])
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      ours,
      jax.tree.map(np.asarray, after_trg["batch_stats"]),
  )
  assert not np.allclose(variables["batch_stats"]["backbone"]["bn1"]["mean"], ours["bn1"]["mean"])


def test_dtype_follows_inputs_and_compute_dtype():
  model = SCorrSAN(**TINY)
  src, trg = _tiny_inputs()
  variables = model.init(jax.random.PRNGKey(0), src, trg)
  assert model.apply(variables, src, trg).dtype == jnp.float32
  bf16 = SCorrSAN(**TINY, dtype=jnp.bfloat16)
  flow = bf16.apply(variables, src, trg)
  assert flow.dtype == jnp.float32  # correlation/softmax/flow stay in float32
  assert np.isfinite(np.asarray(flow)).all()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_read_state_dict_formats(tmp_path, suffix):
  sd = {
      "conv1.weight": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
      "bn1.running_var": np.ones(3, np.float32),
  }
  path = tmp_path / f"weights{suffix}"
  if suffix == ".npz":
    np.savez(path, **sd)
  else:
    from safetensors.numpy import save_file

    save_file(sd, str(path))
  back = convert.read_state_dict(path)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    convert.read_state_dict(tmp_path / "missing.npz")
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(ValueError, match="unknown state dict format"):
    convert.read_state_dict(tmp_path / "w.txt")
