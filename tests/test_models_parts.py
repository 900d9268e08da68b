"""Context encoder, correlation, upsampling and soft-argmax against the reference fixtures.

float64 runs (`jax.enable_x64`) on the float64 upcast of the stored float32 inputs and compare at
the fixture README's x64 tolerances (~1e-10: only summation order differs); float32 runs compare
at its float32 tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sccorr_jax.models import context, correlation, flow

nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
DTYPES = [("x64", np.float64), ("f32", np.float32)]


def _reference(fixtures_dir, name, case):
  """`key -> array` of case `case` of the reference fixture `<name>.npz`."""
  fx = np.load(fixtures_dir / f"{name}.npz")
  return lambda k: fx[f"{case}/{k}"]


def _sce_apply(feat, weight, bias, k):
  kernel = weight[:, :, 0, 0].T  # OIHW 1x1 -> [cin, cout]
  mod = context.SpatialContextEncoder(k, weight.shape[0])
  return mod.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, feat)


@pytest.mark.parametrize("case", ["k7", "k5_rect"])
@pytest.mark.parametrize("mode,dtype", DTYPES)
def test_sce(fixtures_dir, case, mode, dtype):
  g = _reference(fixtures_dir, "sce", case)
  k = int(g("kernel_size"))
  with jax.enable_x64(mode == "x64"):
    feat = jnp.asarray(nhwc(g("feature")).astype(dtype))
    sim = np.asarray(jax.jit(context.self_similarity, static_argnums=1)(feat, k))
    out = np.asarray(_sce_apply(feat, g("weight").astype(dtype), g("bias").astype(dtype), k))
  assert sim.dtype == dtype and out.dtype == dtype
  tol = dict(atol=1e-10, rtol=1e-10) if mode == "x64" else dict(atol=1e-5, rtol=0)
  np.testing.assert_allclose(sim, nhwc(g("selfsim")), **tol)
  np.testing.assert_allclose(out, nhwc(g("output")), **tol)


def test_context_offsets_order():
  off = context.context_offsets(3)
  expected = [
      (-1, -1),
      (0, 0),
      (1, 1),  # diagonal
      (-1, 0),
      (0, 0),
      (1, 0),  # vertical
      (-1, 1),
      (0, 0),
      (1, -1),  # anti-diagonal
      (0, -1),
      (0, 0),
      (0, 1),
  ]  # horizontal
  np.testing.assert_array_equal(off, np.array(expected))
  with pytest.raises(ValueError, match="odd"):
    context.context_offsets(4)


@pytest.mark.parametrize("case", ["signed", "relu_zero"])
@pytest.mark.parametrize("mode,dtype", DTYPES)
def test_correlation(fixtures_dir, case, mode, dtype):
  g = _reference(fixtures_dir, "correlation", case)
  with jax.enable_x64(mode == "x64"):
    src = jnp.asarray(nhwc(g("src_feat")).astype(dtype))
    trg = jnp.asarray(nhwc(g("trg_feat")).astype(dtype))
    src_l2 = np.asarray(correlation.l2_normalize(src))
    corr = jax.jit(correlation.correlate)(src, trg)
    mnn = np.asarray(jax.jit(correlation.mutual_nn_filter)(corr))
    corr = np.asarray(corr)
  b, hs, ws, ht, wt = corr.shape
  tol = dict(atol=1e-10, rtol=1e-10) if mode == "x64" else dict(atol=1e-5, rtol=0)
  np.testing.assert_allclose(src_l2, nhwc(g("src_l2")), **tol)
  np.testing.assert_allclose(corr.reshape(b, hs * ws, ht * wt), g("corr"), **tol)
  np.testing.assert_allclose(mnn.reshape(b, hs * ws, ht * wt), g("corr_mnn"), **tol)


def test_mutual_nn_keeps_reciprocal_maxima():
  rng = np.random.default_rng(0)
  corr = rng.uniform(0.1, 1.0, (1, 3, 3, 3, 3))
  out = np.asarray(correlation.mutual_nn_filter(jnp.asarray(corr, jnp.float32)))
  flat_c, flat_o = corr.reshape(9, 9), out.reshape(9, 9)
  for s in range(9):
    t = flat_c[s].argmax()
    if flat_c[:, t].argmax() == s:  # reciprocal maximum: unchanged
      np.testing.assert_allclose(flat_o[s, t], flat_c[s, t], rtol=1e-6)
  assert np.all(flat_o <= flat_c + 1e-7)


@pytest.mark.parametrize("mode,dtype", DTYPES)
def test_upsample_rect(fixtures_dir, mode, dtype):
  g = _reference(fixtures_dir, "upsample", "rect_to12")
  fs = int(g("feature_size"))
  with jax.enable_x64(mode == "x64"):
    out = np.asarray(flow.upsample_correlation(jnp.asarray(g("corr").astype(dtype)), fs))
  ref = g("output").reshape(out.shape)
  tol = dict(atol=1e-10, rtol=1e-10) if mode == "x64" else dict(atol=1e-5, rtol=0)
  np.testing.assert_allclose(out, ref, **tol)


@pytest.mark.parametrize("mode,dtype", DTYPES)
def test_upsample_16_to_64(fixtures_dir, mode, dtype):
  g = _reference(fixtures_dir, "upsample", "sq16_to64")
  fs = int(g("feature_size"))
  with jax.enable_x64(mode == "x64"):
    out = np.asarray(
        jax.jit(flow.upsample_correlation, static_argnums=1)(
            jnp.asarray(g("corr").astype(dtype)), fs
        )
    )
  b = out.shape[0]
  out = out.reshape(b, fs * fs, fs, fs)
  x64 = mode == "x64"
  tol = dict(atol=1e-10, rtol=1e-10) if x64 else dict(atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.reshape(-1)[g("sample_flat_index")], g("sample_values"), **tol)
  y, x = g("target_slice_yx")
  np.testing.assert_allclose(out[:, :, y, x], g("target_slice"), **tol)
  np.testing.assert_allclose(out[:, int(g("source_slice_index"))], g("source_slice"), **tol)
  sum_tol = dict(rtol=1e-10 if x64 else 1e-5)
  np.testing.assert_allclose(out.sum(axis=1, dtype=np.float64), g("sum_over_source"), **sum_tol)
  np.testing.assert_allclose(
      out.sum(axis=(2, 3), dtype=np.float64), g("sum_over_target"), **sum_tol
  )


@pytest.mark.parametrize("case", ["fs16_peaky", "fs20_soft"])
@pytest.mark.parametrize("mode,dtype", DTYPES)
def test_soft_argmax(fixtures_dir, case, mode, dtype):
  g = _reference(fixtures_dir, "soft_argmax", case)
  fs = int(g("feature_size"))
  x64 = mode == "x64"
  with jax.enable_x64(x64):
    corr = jnp.asarray(g("corr").astype(dtype)).reshape(-1, fs, fs, fs, fs)
    xn = jnp.asarray(g("x_normal").astype(dtype))
    grid = np.asarray(flow.soft_argmax(corr, xn, xn, float(g("beta"))))
    out = np.asarray(jax.jit(flow.soft_argmax_flow)(corr, xn, xn, float(g("beta"))))
  np.testing.assert_allclose(grid[..., 0], g("grid_x")[:, 0], atol=1e-10 if x64 else 1e-5)
  np.testing.assert_allclose(grid[..., 1], g("grid_y")[:, 0], atol=1e-10 if x64 else 1e-5)
  np.testing.assert_allclose(out, nhwc(g("flow")), atol=1e-9 if x64 else 1e-4)


def test_soft_argmax_of_one_hot_returns_its_location():
  fs = 8
  rng = np.random.default_rng(1)
  target = rng.integers(0, fs, (fs, fs, 2))  # (y, x) of the source match of each target cell
  corr = np.zeros((1, fs, fs, fs, fs), np.float32)
  for yt in range(fs):
    for xt in range(fs):
      corr[0, target[yt, xt, 0], target[yt, xt, 1], yt, xt] = 1.0
  coords = jnp.linspace(-1.0, 1.0, fs)
  out = np.asarray(flow.soft_argmax_flow(jnp.asarray(corr), coords, coords))
  ys, xs = np.meshgrid(np.arange(fs), np.arange(fs), indexing="ij")
  np.testing.assert_allclose(out[0, ..., 0], target[..., 1] - xs, atol=1e-4)
  np.testing.assert_allclose(out[0, ..., 1], target[..., 0] - ys, atol=1e-4)


@pytest.mark.parametrize("sigma", [None, 3.0])
def test_fused_chunked_path_equals_full_volume(sigma):
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    corr = jnp.asarray(rng.uniform(0, 1, (2, 4, 4, 4, 4)))
    coords = jnp.linspace(-1.0, 1.0, 16)
    full = flow.soft_argmax_flow(flow.upsample_correlation(corr, 16), coords, coords, 0.02, sigma)
    for chunks in (1, 4):
      fused = flow.upsampled_soft_argmax_flow(corr, 16, coords, coords, 0.02, sigma, chunks)
      np.testing.assert_allclose(np.asarray(fused), np.asarray(full), atol=1e-12)
      g_full = jax.grad(
          lambda c: flow.soft_argmax_flow(flow.upsample_correlation(c, 16), coords, coords).sum()
      )(corr)
      g_fused = jax.grad(
          lambda c: flow.upsampled_soft_argmax_flow(
              c, 16, coords, coords, target_chunks=chunks
          ).sum()
      )(corr)
      np.testing.assert_allclose(np.asarray(g_fused), np.asarray(g_full), atol=1e-9)


def test_kernel_soft_argmax_prefers_the_argmax_peak():
  """Two near-equal peaks: the Gaussian window around the arg-max suppresses the far one."""
  fs = 16
  corr = np.zeros((1, fs, fs, 1, 1), np.float32)
  corr[0, 2, 2] = 1.0
  corr[0, 12, 12] = 0.99
  coords = jnp.linspace(-1.0, 1.0, fs)
  peak = float(coords[2])
  plain = np.asarray(flow.soft_argmax(jnp.asarray(corr), coords, coords, beta=0.05))
  kern = np.asarray(
      flow.soft_argmax(jnp.asarray(corr), coords, coords, beta=0.05, kernel_sigma=2.0)
  )
  # The plain soft-argmax is pulled half-way towards the second peak; the kernel one is not.
  assert np.abs(plain[0, 0, 0] - peak).max() > 0.5
  np.testing.assert_allclose(kern[0, 0, 0], [peak, peak], atol=1e-3)
