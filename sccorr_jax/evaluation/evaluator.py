"""The evaluator: a model over a split, jitted and data-parallel, into sums and counts per group.

Evaluators accumulate per-pair counts (correct and valid keypoints) on the host and divide once
at the end; padding of ragged keypoints (`kps_valid`) and of the last batch (`pair_valid`) is
masked, never dropped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from sccorr_jax import checkpoint as ckpt_lib
from sccorr_jax import data as data_lib
from sccorr_jax import geometry
from sccorr_jax import sharding
from sccorr_jax.data import cache_features
from sccorr_jax.evaluation.pck import pck_correct
from sccorr_jax.evaluation.pck import transfer_keypoints
from sccorr_jax.evaluation.protocol import DIFFICULTY_FIELDS
from sccorr_jax.evaluation.protocol import Protocol
from sccorr_jax.evaluation.reports import _Sums
from sccorr_jax.evaluation.reports import EvalResult


def pair_counts(
    flow,
    batch: Mapping[str, Any],
    alphas: Sequence[float],
    thresholds: Sequence[str],
    img_size: geometry.SizeLike = 256,
):
  """Per-pair keypoint counts of one batch (jittable; the device part of the evaluator).

  Args:
    flow: [b, h, w, 2] float, predicted (x, y) flow target -> source in grid cells.
    batch: the batch contract: `trg_kps`, `src_kps` [b, n, 2] (pixels of the `img_size`
      image), `kps_valid` [b, n] bool, `pckthres_<kind>` [b] for every kind in `thresholds`
      (`pckthres_bbox`, `pckthres_img`, `pckthres_bbox_legacy`).
    alphas: A PCK alphas (static).
    thresholds: K threshold kinds (static).
    img_size: the image the keypoints live in.

  Returns:
    dict: `n_valid` [b] int32 valid keypoints per pair; `n_correct` [K, A, b] int32 correct
    keypoints per pair for each threshold kind and alpha. Pair padding is *not* applied here
    (the accumulator masks with `pair_valid`).
  """
  est = transfer_keypoints(flow, batch["trg_kps"], img_size)
  valid = jnp.asarray(batch["kps_valid"], bool)
  per_kind = []
  for kind in thresholds:
    thr = batch[f"pckthres_{kind}"]
    per_kind.append(
        jnp.stack(
            [
                jnp.sum(pck_correct(est, batch["src_kps"], valid, thr, a), axis=-1, dtype=jnp.int32)
                for a in alphas
            ]
        )
    )
  return {"n_valid": jnp.sum(valid, axis=-1, dtype=jnp.int32), "n_correct": jnp.stack(per_kind)}


class PckAccumulator:
  """Accumulates per-pair counts into sums and counts per group; divides once in `result`.

  Groups: 'all'; `category=<name>` per category; `<field>=<level>` per SPair-71k difficulty
  field present in the batches (with `difficulty=True`). Padding pairs (`pair_valid` False)
  are masked: they add nothing, whatever their values; padded keypoint slots never count
  (`pair_counts` masks them with `kps_valid`).
  """

  def __init__(
      self,
      protocol: Protocol,
      category_names: Optional[Sequence[str]] = None,
      difficulty: Optional[bool] = None,
  ):
    """Args:
    protocol: what is measured.
    category_names: names of the category ids (index = id); ids are used if None.
    difficulty: report per difficulty level; default: only for SPair-71k.
    """
    self.protocol = protocol
    self.category_names = None if category_names is None else list(category_names)
    self.difficulty = (protocol.benchmark == "spair71k") if difficulty is None else difficulty
    self._shape = (len(protocol.thresholds), len(protocol.alphas))
    self.groups: Dict[str, _Sums] = {"all": _Sums(self._shape)}
    self.num_padding_pairs = 0

  def _group(self, name: str) -> _Sums:
    if name not in self.groups:
      self.groups[name] = _Sums(self._shape)
    return self.groups[name]

  def category_name(self, cat: int) -> str:
    if self.category_names is not None and 0 <= cat < len(self.category_names):
      return self.category_names[cat]
    return str(cat)

  def update(self, counts: Mapping[str, Any], batch: Mapping[str, Any]):
    """Adds one batch.

    Args:
      counts: `pair_counts` output (host or device arrays): `n_valid` [b], `n_correct`
        [K, A, b].
      batch: the batch's `pair_valid` [b] bool (all True if absent), `category` [b] int and,
        for difficulty reports, the fields of `DIFFICULTY_FIELDS` [b] int.
    """
    n_valid = np.asarray(counts["n_valid"]).astype(np.int64)
    n_correct = np.asarray(counts["n_correct"]).astype(np.int64)
    b = n_valid.shape[0]
    if n_correct.shape != self._shape + (b,):
      raise ValueError(f"n_correct has shape {n_correct.shape}, expected {self._shape + (b,)}")
    pair_valid = np.asarray(batch.get("pair_valid", np.ones(b, bool)), bool).reshape(b)
    self.num_padding_pairs += int((~pair_valid).sum())

    def add(name, mask):
      mask = mask & pair_valid
      if mask.any():
        self._group(name).add(n_valid[mask], n_correct[..., mask])

    add("all", np.ones(b, bool))
    if "category" in batch:
      cats = np.asarray(batch["category"]).reshape(b)
      for c in np.unique(cats[pair_valid]):
        add(f"category={self.category_name(int(c))}", cats == c)
    if self.difficulty:
      for field in DIFFICULTY_FIELDS:
        if field not in batch:
          continue
        levels = np.asarray(batch[field]).reshape(b)
        for lv in np.unique(levels[pair_valid]):
          add(f"{field}={int(lv)}", levels == lv)

  def result(self) -> "EvalResult":
    return EvalResult(
        self.protocol, {k: self.groups[k] for k in self.groups}, self.num_padding_pairs
    )


def _batch_keys(protocol: Protocol) -> tuple:
  return (
      "src_img",
      "trg_img",
      "src_kps",
      "trg_kps",
      "kps_valid",
      *(f"pckthres_{k}" for k in protocol.thresholds),
  )


def make_eval_step(
    model, protocol: Protocol, zero_flow: bool = False, num_models: Optional[int] = None
) -> Callable:
  """`(variables, batch) -> pair_counts` of the model's flow, jitted.

  Args:
    model: a `SCorrSAN` (or any module whose `apply(variables, src_img, trg_img)` is a flow
      [b, S, S, 2] target -> source in cells of the S grid).
    protocol: alphas, thresholds and resolution.
    zero_flow: also count the zero flow (every target keypoint stays where it is), the trivial
      reference a trained model must beat, on the same pairs; returned under `'zero_flow'`.
    num_models: None: `variables` are one model's. N: the variables of N models stacked on a
      leading axis (a mutual-teacher state's); each model's counts, in one program, under
      `'models'` (a list, model i's at i).

  Returns:
    A jitted function; under a mesh, shard the batch along its first axis and replicate the
    variables, and XLA runs it data-parallel.
  """
  alphas, kinds, size = protocol.alphas, protocol.thresholds, protocol.img_size

  def flow_counts(variables, batch):
    flow = model.apply(variables, batch["src_img"], batch["trg_img"])
    return flow, pair_counts(flow, batch, alphas, kinds, size)

  def step(variables, batch):
    if num_models is None:
      flow, counts = flow_counts(variables, batch)
    else:
      each = [
          flow_counts(jax.tree.map(lambda x, i=i: x[i], variables), batch)
          for i in range(num_models)
      ]
      flow, counts = each[0][0], {"models": [c for _, c in each]}
    if zero_flow:
      counts["zero_flow"] = pair_counts(jnp.zeros_like(flow), batch, alphas, kinds, size)
    return counts

  return jax.jit(step)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  reps = np.repeat(x[-1:], n - x.shape[0], axis=0)
  return np.concatenate([x, reps], axis=0)


def evaluate_model(
    model,
    variables,
    batches: Iterable[Mapping[str, Any]],
    protocol: Protocol,
    *,
    category_names: Optional[Sequence[str]] = None,
    num_pairs: Optional[int] = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
    mesh: Optional[jax.sharding.Mesh] = None,
    eval_step: Optional[Callable] = None,
    zero_flow: bool = False,
) -> EvalResult:
  """Runs the model over batches and accumulates PCK for every protocol variant.

  Data-parallel: the batch is sharded over a 1-D `('data',)` mesh of all devices (padded on
  the host with masked copies when its size does not divide the device count), the variables
  are replicated. The per-pair counts come back to the host, where sums and counts are kept.

  Args:
    model: the network (see `make_eval_step`).
    variables: its `{'params', 'batch_stats'}` (host or device arrays).
    batches: iterable of batch dicts (the batch contract; `create_eval_iterator`).
    protocol: what to measure.
    category_names: names of the category ids.
    num_pairs: number of real pairs, for the progress bar's total (optional).
    max_batches: stop after this many batches (smoke runs).
    progress: show a tqdm progress bar over the pairs.
    mesh: the device mesh (default: all devices on one 'data' axis).
    eval_step: a prebuilt `make_eval_step(model, protocol, zero_flow)` (reuses its
      compilation).
    zero_flow: also evaluate the zero flow on the same pairs (`result.zero_flow`).

  Returns:
    The `EvalResult`; with `zero_flow`, its `zero_flow` attribute is the zero flow's.
  """
  step = eval_step or make_eval_step(model, protocol, zero_flow)
  (result,) = _evaluate(
      step,
      variables,
      batches,
      protocol,
      None,
      category_names=category_names,
      num_pairs=num_pairs,
      max_batches=max_batches,
      progress=progress,
      mesh=mesh,
      zero_flow=zero_flow,
  )
  return result


def evaluate_models(
    model,
    variables,
    batches: Iterable[Mapping[str, Any]],
    protocol: Protocol,
    num_models: Optional[int],
    *,
    max_batches: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    eval_step: Optional[Callable] = None,
    zero_flow: bool = False,
) -> List[EvalResult]:
  """`evaluate_model` of N models stacked on a leading axis (a mutual-teacher state's), in one
  pass: each batch is read, transferred and run once for all of them, and the variables stay
  where they are (a training state's, on the mesh already, are not copied).

  Args:
    num_models: N; None: one unstacked model, as `evaluate_model` (one result).
    variables: `{'params', 'batch_stats'}`, every leaf [num_models, ...].
    eval_step: a prebuilt `make_eval_step(model, protocol, zero_flow, num_models)`.
    The others: as `evaluate_model`.

  Returns:
    One `EvalResult` per model; with `zero_flow`, the first one's `zero_flow` attribute is the
    zero flow's.
  """
  step = eval_step or make_eval_step(model, protocol, zero_flow, num_models)
  return _evaluate(
      step,
      variables,
      batches,
      protocol,
      num_models,
      max_batches=max_batches,
      progress=False,
      mesh=mesh,
      zero_flow=zero_flow,
  )


def _evaluate(
    step,
    variables,
    batches,
    protocol: Protocol,
    num_models: Optional[int],
    *,
    category_names=None,
    num_pairs=None,
    max_batches=None,
    progress=True,
    mesh=None,
    zero_flow=False,
) -> List[EvalResult]:
  """The loop of `evaluate_model` / `evaluate_models`: one result per model."""
  if mesh is None:
    mesh = sharding.make_mesh()
  multihost = jax.process_count() > 1
  # Several processes: each holds its own rows (`create_eval_iterator(process_index=...)`),
  # padded to a multiple of its local devices; the per-pair counts and metadata of all processes
  # are gathered so every process accumulates the same global result.
  ndev = jax.local_device_count() if multihost else mesh.devices.size
  data_sharding = sharding.batch_sharded(mesh)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  accs = [PckAccumulator(protocol, category_names) for _ in range(num_models or 1)]
  zero_acc = PckAccumulator(protocol, category_names) if zero_flow else None
  keys = _batch_keys(protocol)
  total = num_pairs
  bar = None
  if progress:
    bar = tqdm.tqdm(
        desc=f"eval {protocol.benchmark}/{protocol.split}",
        unit="pair",
        total=total,
        dynamic_ncols=True,
    )
  try:
    for i, batch in enumerate(batches):
      if max_batches is not None and i >= max_batches:
        break
      missing = [k for k in keys if k not in batch]
      if missing:
        raise KeyError(
            f"the batch lacks {missing} needed by the protocol "
            f"(thresholds {protocol.thresholds})"
        )
      b = np.asarray(batch["src_img"]).shape[0]
      padded = -(-b // ndev) * ndev
      meta = {
          k: np.asarray(batch[k])
          for k in ("pair_valid", "category", *DIFFICULTY_FIELDS)
          if k in batch
      }
      meta.setdefault("pair_valid", np.ones(b, bool))
      meta = {k: _pad_rows(v, padded) for k, v in meta.items()}
      meta["pair_valid"] = meta["pair_valid"].copy()
      meta["pair_valid"][b:] = False
      dev_batch = sharding.global_batch(
          {k: _pad_rows(np.asarray(batch[k]), padded) for k in keys}, data_sharding
      )
      if multihost:
        counts = multihost_utils.process_allgather(step(variables, dev_batch), tiled=True)
        meta = multihost_utils.process_allgather(meta, tiled=True)
        b = int(np.asarray(meta["pair_valid"]).shape[0])
        padded = b  # the gathered rows; their padding is masked by pair_valid already
      else:
        counts = jax.device_get(step(variables, dev_batch))
      per_model = counts["models"] if num_models else [counts]
      for accumulator, c in (*zip(accs, per_model), (zero_acc, counts.get("zero_flow"))):
        if accumulator is not None:
          accumulator.update(c, meta)
          accumulator.num_padding_pairs -= padded - b  # only the data's own padding pairs
      if bar is not None:
        bar.update(int(np.asarray(batch.get("pair_valid", np.ones(b, bool))).sum()))
  finally:
    if bar is not None:
      bar.close()
  results = [acc.result() for acc in accs]
  if zero_acc is not None:
    results[0].zero_flow = zero_acc.result()
  return results


def evaluate_checkpoint(
    config,
    checkpoint: str,
    workdir: Optional[str] = None,
    *,
    split: Optional[str] = None,
    model_index=None,
    max_batches: Optional[int] = None,
    progress: bool = True,
    batch_size: Optional[int] = None,
) -> EvalResult:
  """Evaluates a checkpoint on `config.data` and writes the JSON report and the table.

  The *model* is built from the checkpoint's own config when it has one (so PF-WILLOW is
  evaluated with the PF-PASCAL model that the checkpoint holds); the *data* and the protocol
  come from `config`. A head trained on cached features (`model.inputs='features'`) reads
  the feature cache of the evaluated split (`cache_features.open_for_config`).

  Args:
    config: experiment config (`configs/*.py`): `data` and `eval` (the model is the
      checkpoint's own).
    checkpoint: a trainer workdir, a checkpoint step directory or an exported model (see
      `sccorr_jax.checkpoint.load_model_variables`).
    workdir: where `eval_<benchmark>_<split>.{json,txt}` are written (None: nothing written).
    split: split to evaluate (default `config.eval.split`; PF-WILLOW has only 'test').
    model_index: mutual-teacher checkpoints: 0, 1, 'best' or None (the recorded best).
    max_batches: evaluate only this many batches (smoke runs).
    progress: progress bar.
    batch_size: global eval batch size (default `config.eval.batch_size`).

  Returns:
    The `EvalResult`.
  """
  # Verified (checksums), shape-checked against the model: one-line CheckpointError otherwise.
  model, variables, ckpt_config = ckpt_lib.load_model(checkpoint, model_index=model_index)
  protocol = Protocol.from_config(config, split)
  bs = int(batch_size or config.eval.batch_size)
  data = data_lib.resolve(config.data)
  if getattr(model, "inputs", "images") == "features":  # The head alone: read the cache.
    cache_config = ckpt_config.copy_and_resolve_references()
    with cache_config.unlocked():
      cache_config.data = config.data.copy_and_resolve_references()
    data = data.with_features(cache_features.open_for_config(cache_config, [protocol.split], data))
  batches = data_lib.create_eval_iterator(
      data,
      protocol.split,
      batch_size=bs,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  n = data.num_examples(protocol.split)
  names = list(data.category_names)
  start = time.time()
  result = evaluate_model(
      model,
      variables,
      batches,
      protocol,
      category_names=names,
      num_pairs=n if max_batches is None else min(n, max_batches * bs),
      max_batches=max_batches,
      progress=progress,
  )
  if workdir is not None and jax.process_index() == 0:
    tag = f"eval_{protocol.benchmark}_{protocol.split}"
    result.write(
        workdir,
        tag,
        checkpoint=os.path.abspath(checkpoint),
        model_index=None if model_index is None else str(model_index),
        model_config=_to_dict(ckpt_config.get("model") if ckpt_config else config.model),
        wall_time_s=round(time.time() - start, 2),
        devices=[str(d) for d in jax.devices()],
    )
  return result


def _to_dict(cfg) -> Any:
  if cfg is None:
    return None
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return json.loads(json.dumps(cfg, default=str))
