"""PF-WILLOW (Ham et al., 2016) as a TFDS builder (test split only).

Layout (the archive distributed with the reference code):

    PF-WILLOW/test_pairs.csv          header; imageA, imageB, then 10 x- and 10 y-coordinates
                                      of A (XA1..XA10, YA1..YA10) and of B (XB1..YB10)
    PF-WILLOW/<class>/<image>.png     e.g. `car(G)/Cars_008a.png`

Image paths in the csv start with a folder (`PF-dataset/car(G)/...`) that the reference strips;
the class is the second path component. Images are PNG: they are converted to RGB and stored as
PNG. PF-WILLOW has no boxes: `src_bbox`/`trg_bbox` are the keypoints' extent boxes. Its PCK
threshold is `bbox` on that extent (real keypoints only); the reference's value, computed over
all 40 slots including the -1 padding, is available as the `legacy` threshold.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from sccorr_jax.data import builder_base
from sccorr_jax.data import pfpascal
from sccorr_jax.data import records

NUM_WILLOW_KPS = 10


class PfWillow(builder_base.PairDatasetBuilder):
  """PF-WILLOW: 900 test pairs of 10 object classes, 10 keypoints each."""

  FOLDER = 'PF-WILLOW'
  MARKER = 'test_pairs.csv'
  URLS = {
      'pfwillow': (
          'https://drive.google.com/uc?export=download&confirm=t&id='
          '1tDP0y8RO5s45L-vqnortRaieiWENQco_'
      )
  }
  CATEGORIES = records.WILLOW_CATEGORIES
  SPLITS = ('test',)
  HOMEPAGE = 'https://www.di.ens.fr/willow/research/proposalflow/'
  DESCRIPTION = 'PF-WILLOW semantic correspondence benchmark (Proposal Flow).'
  CITATION = """@inproceedings{ham2016proposal,
  title={Proposal Flow}, author={Ham, Bumsub and Cho, Minsu and Schmid, Cordelia and
  Ponce, Jean}, booktitle={CVPR}, year={2016}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put the PF-WILLOW folder (test_pairs.csv and the class folders) into the manual dir; '
      'see docs/data.md for where to get it.'
  )

  def _examples(self, root, split, guard):
    csv_path = os.path.join(root, 'test_pairs.csv')
    rows = pfpascal.read_pairs_csv_numbered(csv_path)
    for i, (lineno, row) in enumerate(rows):
      key = f'{split}-{i:05d}'
      example = guard.run(
          key, functools.partial(self._example, root, csv_path, i, row, guard, lineno)
      )
      if example is not None:
        yield key, example

  def _image_path(self, root, name):
    parts = name.replace('\\', '/').split('/')
    for cand in (
        os.path.join(root, *parts[1:]) if len(parts) > 1 else None,
        os.path.join(root, *parts),
    ):
      if cand and os.path.isfile(cand):
        return cand
    return os.path.join(root, *parts[1:]) if len(parts) > 1 else os.path.join(root, name)

  def _example(self, root, csv_path, i, row, guard, lineno=None):
    where = f'{csv_path} row {lineno if lineno is not None else i + 2}'
    if row is None:
      raise records.BadRecordError(where, 'not UTF-8 text')
    n = NUM_WILLOW_KPS
    if len(row) != 2 + 4 * n:
      raise records.BadRecordError(where, f'expected {2 + 4 * n} columns, got {len(row)}')
    try:
      coords = np.array([float(c) for c in row[2:]], np.float64)
    except ValueError as e:
      raise records.BadRecordError(where, f'a coordinate is not a number ({e})') from e
    src_kps = coords[: 2 * n].reshape(2, n).T
    trg_kps = coords[2 * n :].reshape(2, n).T
    parts = row[0].replace('\\', '/').split('/')
    category = parts[1] if len(parts) > 2 else parts[0]
    if category not in self.CATEGORIES:
      raise records.BadRecordError(where, f'unknown class {category!r} in path {row[0]!r}')
    src_path, trg_path = self._image_path(root, row[0]), self._image_path(root, row[1])
    src_bytes, src_hw = records.read_encoded_image(src_path)
    trg_bytes, trg_hw = records.read_encoded_image(trg_path)
    name = f'{os.path.basename(row[0])}-{os.path.basename(row[1])}'
    src, trg, valid = records.clean_keypoints(
        src_kps, trg_kps, src_hw, trg_hw, file=where, record=name, guard=guard, nan_invisible=False
    )
    for side, kps in (('source', src), ('target', trg)):
      box = records.keypoint_box(kps, valid)
      if max(box[2] - box[0], box[3] - box[1]) <= 0:
        raise records.BadRecordError(
            where,
            f'the {side} keypoints all lie on one point '
            f'{tuple(box[:2].tolist())}: no PCK threshold',
        )
    return records.base_example(
        pair_id=name,
        src_imname=os.path.relpath(src_path, root),
        trg_imname=os.path.relpath(trg_path, root),
        src_img=src_bytes,
        trg_img=trg_bytes,
        src_imsize=np.array(src_hw, np.int32),
        trg_imsize=np.array(trg_hw, np.int32),
        src_kps=src,
        trg_kps=trg,
        kps_valid=valid,
        src_bbox=records.keypoint_box(src, valid),
        trg_bbox=records.keypoint_box(trg, valid),
        category=self.CATEGORIES.index(category),
    )
