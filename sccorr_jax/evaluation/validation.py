"""Validation during training: every trained model of a run on the validation split, as the flat
scalars the training logs and the checkpoint manager use (`val/pck@0.1`, ...).

The mutual teachers of an 'mt' run are validated together: one pass over the split, each batch
decoded and transferred once, one compiled step for both networks, their parameters taken from
the training state where they are (on the devices). The better of the two by
`val/pck@<eval.select_alpha>` is the run's model; its numbers are also logged unscoped.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

from sccorr_jax import data as data_lib
from sccorr_jax.constants import metric_key
from sccorr_jax.evaluation.evaluator import evaluate_model
from sccorr_jax.evaluation.evaluator import evaluate_models
from sccorr_jax.evaluation.evaluator import make_eval_step
from sccorr_jax.evaluation.protocol import Protocol
from sccorr_jax.evaluation.reports import EvalResult


def scalars(
    result: EvalResult, protocol: Protocol, prefix: str = 'val/', zero_flow: bool = False
) -> Dict[str, float]:
  """The flat scalars of one model's result: `{prefix + 'pck@<alpha>': per-pair mean PCK in
  percent (the reference's number), prefix + 'pck@<alpha>/per_keypoint': per keypoint,
  prefix + 'num_pairs': pairs}` and, with `zero_flow`, `prefix + 'zero_flow/pck@<alpha>'`
  (`constants.metric_key`), at the protocol's first threshold kind."""
  kind = protocol.thresholds[0]
  out = {f'{prefix}num_pairs': float(result.groups['all'].pairs)}
  for a in protocol.alphas:
    out[metric_key(a, scope=prefix)] = result.pck(kind, a, 'per_pair')
    out[metric_key(a, averaging='per_keypoint', scope=prefix)] = result.pck(kind, a, 'per_keypoint')
  if zero_flow:
    for a in protocol.alphas:
      out[metric_key(a, scope=prefix + 'zero_flow')] = result.zero_flow.pck(kind, a, 'per_pair')
  return out


def validation_metrics(
    model,
    variables,
    data_iter,
    protocol: Protocol,
    *,
    mesh=None,
    eval_step=None,
    max_batches: Optional[int] = None,
    prefix: str = 'val/',
    zero_flow: bool = False,
) -> Dict[str, float]:
  """PCK of one model over an evaluation iterator, as flat scalars (`scalars`).

  Args:
    model: the network.
    variables: one model's `{'params', 'batch_stats'}`.
    data_iter: iterable of eval batches (`data.create_eval_iterator`; padding rows masked by
      `pair_valid`, padded keypoints by `kps_valid`).
    protocol: alphas, threshold kind, resolution (`Protocol.from_config(.., validation=True)`).
    mesh: device mesh (default all devices).
    eval_step: a prebuilt `evaluation.make_eval_step(model, protocol, zero_flow)`.
    max_batches: stop early (smoke runs).
    prefix: key prefix.
    zero_flow: also report the PCK of the zero flow (identity transfer) on the same pairs.
  """
  result = evaluate_model(
      model,
      variables,
      data_iter,
      protocol,
      mesh=mesh,
      eval_step=eval_step,
      max_batches=max_batches,
      progress=False,
      zero_flow=zero_flow,
  )
  return scalars(result, protocol, prefix, zero_flow)


class Validator:
  """Validation of every trained model of a run (one compiled evaluation step)."""

  def __init__(self, config, model, mesh: jax.sharding.Mesh, data: data_lib.ResolvedData):
    """Args:
    config: the run's config (`eval`, `learning_mode`; the protocol also reads `data`).
    model: the network.
    mesh: the run's device mesh.
    data: the run's resolved data section, with the validation split's feature cache when
      the model runs on cached features (`model.inputs='features'`).
    """
    self.config, self.model, self.mesh, self.data = config, model, mesh, data
    self.mutual = config.learning_mode == 'mt'
    self.protocol = Protocol.from_config(config, validation=True)
    # One compiled step for the run's model(s): an 'mt' run's two networks, stacked.
    num_models = 2 if self.mutual else None
    step = make_eval_step(model, self.protocol, zero_flow=True, num_models=num_models)
    self.evaluate = functools.partial(
        evaluate_models,
        model,
        protocol=self.protocol,
        num_models=num_models,
        mesh=mesh,
        eval_step=step,
    )

  def __call__(self, variables: Mapping[str, Any], epoch: int, zero_flow: bool) -> Dict[str, float]:
    """`val/...` scalars of the model(s) in `variables` (`{'params', 'batch_stats'}` of the
    training state, stacked [2, ...] for 'mt'); for 'mt' also `val/a/...`, `val/b/...` and
    `val/best_model` (the better one by `val/pck@<eval.select_alpha>`, whose numbers are the
    `val/pck@...` ones); with `zero_flow`, the zero flow's PCK on the same pairs."""
    c, t = self.config, time.time()
    batches = data_lib.create_eval_iterator(
        self.data,
        c.eval.split,
        batch_size=int(c.eval.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    results = self.evaluate(
        variables, batches, max_batches=c.eval.get('max_batches'), zero_flow=zero_flow
    )
    if not self.mutual:
      out = scalars(results[0], self.protocol, 'val/', zero_flow)
    else:
      out = {}
      for i, (name, result) in enumerate(zip('ab', results)):
        out.update(scalars(result, self.protocol, f'val/{name}/', zero_flow and i == 0))
      out = {k.replace('val/a/zero_flow/', 'val/zero_flow/'): v for k, v in out.items()}
      sel = [out[metric_key(c.eval.select_alpha, scope=f'val/{m}')] for m in 'ab']
      winner = int(np.nanargmax(sel)) if np.isfinite(sel).any() else 0
      for a in self.protocol.alphas:
        out[metric_key(a, scope='val')] = out[metric_key(a, scope=f'val/{"ab"[winner]}')]
      out['val/best_model'] = float(winner)
    out['val/epoch'] = float(epoch)
    out['time/eval_s'] = time.time() - t
    return out
