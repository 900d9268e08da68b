"""L2-normalised 4D correlation and the mutual-nearest-neighbour filter (paper Sec. 3.1).

Reference semantics (`FeatureL2Norm`, `MutualMatching` of Rocco et al.):

* L2 normalisation over channels with the epsilon *inside* the square root:
  `x / sqrt(sum_c x^2 + 1e-6)`.
* `corr[b, ys, xs, yt, xt] = sum_c src[b, ys, xs, c] * trg[b, yt, xt, c]`.
* Mutual-NN: `corr * (corr / max_target corr) * (corr / max_source corr)`, where a maximum that is
  exactly zero is replaced by 1e-30. No clamping of negatives (the network's features are
  non-negative after the context encoder's ReLU, so it does not arise there).
"""

from __future__ import annotations

import jax.numpy as jnp

L2_EPS = 1e-6
MNN_EPS = 1e-30


def l2_normalize(x, eps: float = L2_EPS):
  """Channel L2 normalisation: `[..., c]` -> `[..., c]`, `x / sqrt(sum_c x^2 + eps)`."""
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def correlate(src, trg, *, precision=None):
  """4D correlation of the L2-normalised features.

  Args:
    src: [b, hs, ws, c] source features.
    trg: [b, ht, wt, c] target features.
    precision: optional `jax.lax.Precision` for the contraction.

  Returns:
    [b, hs, ws, ht, wt] cosine-like similarities (in [-1, 1] up to the epsilon).
  """
  return jnp.einsum("bijc,bklc->bijkl", l2_normalize(src), l2_normalize(trg), precision=precision)


def mutual_nn_filter(corr):
  """Soft mutual-nearest-neighbour filtering of a 4D correlation.

  Args:
    corr: [b, hs, ws, ht, wt].

  Returns:
    [b, hs, ws, ht, wt]: `corr * (corr / max_t corr) * (corr / max_s corr)`; reciprocal maxima
    keep their value, everything else is scaled down.
  """
  max_over_target = jnp.max(corr, axis=(3, 4), keepdims=True)  # per source position
  max_over_source = jnp.max(corr, axis=(1, 2), keepdims=True)  # per target position
  eps = jnp.asarray(MNN_EPS, corr.dtype)
  max_over_target = jnp.where(max_over_target == 0, eps, max_over_target)
  max_over_source = jnp.where(max_over_source == 0, eps, max_over_source)
  return corr * (corr / max_over_target) * (corr / max_over_source)
