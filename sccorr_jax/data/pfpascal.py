"""PF-PASCAL (Ham et al., 2018) as a TFDS builder, with the reference's pair splits.

Layout (the archive distributed with the reference code; images and annotations from the
Proposal Flow site, pair lists from Rocco et al.'s WeakAlign/NC-Net splits):

    PF-PASCAL/JPEGImages/<image>.jpg
    PF-PASCAL/Annotations/<class>/<image>.mat     `kps` [n, 2] (x, y; NaN = not visible),
                                                  `bbox` [1, 4] xyxy
    PF-PASCAL/{trn,val,test}_pairs.csv            header; source, target, class id (1-based),
                                                  and in trn_pairs.csv a flip flag (0/1)

Image paths in the csv are reduced to their base name (the reference's rule), the annotation of
an image is `Annotations/<class name>/<image stem>.mat`. Keypoints with a NaN in either image
are dropped for that pair. Training pairs whose flip flag is 1 are flipped horizontally by the
training pipeline (both images, keypoints and boxes). The PCK threshold of PF-PASCAL is `img`:
the image side (256 after resizing).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import scipy.io

from sccorr_jax.data import builder_base
from sccorr_jax.data import records


def read_mat(path: str):
  """(kps [n, 2] float64, bbox [4] float32) of a PF-PASCAL annotation; `BadRecordError` else.

  `kps` may hold NaN (an invisible keypoint); anything else that is not a real number (booleans,
  infinities, cells, text) and a `bbox` that is not a non-empty xyxy box make the record bad.
  """
  if not os.path.isfile(path):
    raise records.BadRecordError(path, 'annotation file is missing')
  try:
    mat = scipy.io.loadmat(path)
    classes = {name: cls for name, _, cls in scipy.io.whosmat(path)}
  except Exception as e:  # pylint: disable=broad-except  # scipy raises many kinds
    raise records.BadRecordError(path, f'malformed .mat file ({type(e).__name__}: {e})') from e
  for field in ('kps', 'bbox'):
    if field not in mat:
      raise records.BadRecordError(path, f'missing field {field!r}')
    if classes.get(field) == 'logical':  # stored as uint8: loadmat alone would hide it
      raise records.BadRecordError(
          path, f'field {field!r}: booleans (MATLAB logical), ' 'expected numbers'
      )
  kps = records.keypoint_array(mat['kps'], "field 'kps'", path, nan_invisible=True)
  bbox = records.parse_bbox(mat['bbox'], path, 'bbox')
  return kps, bbox


def read_pairs_csv(path: str):
  """Rows of a pair csv (header skipped) as lists of stripped strings; rows that are not UTF-8
  are left out (`read_pairs_csv_numbered` keeps them, as None)."""
  return [row for _, row in read_pairs_csv_numbered(path) if row is not None]


def read_pairs_csv_numbered(path: str):
  """(line number, row) of a pair csv, header skipped; row is None when the line is not UTF-8.

  Raises:
    records.PreparationError: the file is missing or not a csv file.
  """
  return records.read_csv_rows(path)[1:]


class PfPascal(builder_base.PairDatasetBuilder):
  """PF-PASCAL: image pairs of 20 PASCAL categories; the reference's splits have 2,940 (trn,
  flipped copies included) / 308 (val) / 299 (test) pairs."""

  FOLDER = 'PF-PASCAL'
  MARKER = 'test_pairs.csv'
  # The archive the reference code downloads (Google Drive, SCOT/CATs packaging).
  URLS = {
      'pfpascal': (
          'https://drive.google.com/uc?export=download&confirm=t&id='
          '1OOwpGzJnTsFXYh-YffMQ9XKM_Kl_zdzg'
      )
  }
  CATEGORIES = records.PASCAL_CATEGORIES
  SPLITS = ('trn', 'val', 'test')
  HOMEPAGE = 'https://www.di.ens.fr/willow/research/proposalflow/'
  DESCRIPTION = 'PF-PASCAL semantic correspondence benchmark (Proposal Flow).'
  CITATION = """@article{ham2018proposal,
  title={Proposal Flow: Semantic Correspondences from Object Proposals},
  author={Ham, Bumsub and Cho, Minsu and Schmid, Cordelia and Ponce, Jean},
  journal={IEEE TPAMI}, year={2018}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put the PF-PASCAL folder (JPEGImages/, Annotations/, {trn,val,test}_pairs.csv) into the '
      'manual dir; see docs/data.md for where to get it.'
  )

  def _examples(self, root, split, guard):
    csv_path = os.path.join(root, f'{split}_pairs.csv')
    rows = read_pairs_csv_numbered(csv_path)
    for i, (lineno, row) in enumerate(rows):
      key = f'{split}-{i:05d}'
      example = guard.run(
          key, functools.partial(self._example, root, csv_path, i, row, split, guard, lineno)
      )
      if example is not None:
        yield key, example

  def _example(self, root, csv_path, i, row, split, guard, lineno=None):
    where = f'{csv_path} row {lineno if lineno is not None else i + 2}'
    if row is None:
      raise records.BadRecordError(where, 'not UTF-8 text')
    if len(row) < 3:
      raise records.BadRecordError(where, f'expected source, target, class; got {row}')
    cls_id = records.parse_int_text(row[2], where, 'class id', 1, len(self.CATEGORIES)) - 1
    flip = 0
    if split == 'trn' and len(row) > 3 and row[3] != '':
      flip = records.parse_int_text(row[3], where, 'flip flag', 0, 1)
    cls = self.CATEGORIES[cls_id]
    names = [os.path.basename(row[0]), os.path.basename(row[1])]
    imgs, sizes, kps, boxes = [], [], [], []
    for name in names:
      data, hw = records.read_encoded_image(os.path.join(root, 'JPEGImages', name))
      mat_path = os.path.join(root, 'Annotations', cls, os.path.splitext(name)[0] + '.mat')
      k, b = read_mat(mat_path)
      records.check_box_in_image(b, hw, mat_path, 'bbox')
      imgs.append(data)
      sizes.append(hw)
      kps.append(k)
      boxes.append(b)
    ann = os.path.join(root, 'Annotations', cls, os.path.splitext(names[0])[0] + '.mat')
    src_kps, trg_kps, valid = records.clean_keypoints(
        kps[0], kps[1], sizes[0], sizes[1], file=ann, record=f'{names[0]}-{names[1]}', guard=guard
    )
    return records.base_example(
        pair_id=f'{names[0]}-{names[1]}',
        src_imname=os.path.join('JPEGImages', names[0]),
        trg_imname=os.path.join('JPEGImages', names[1]),
        src_img=imgs[0],
        trg_img=imgs[1],
        src_imsize=np.array(sizes[0], np.int32),
        trg_imsize=np.array(sizes[1], np.int32),
        src_kps=src_kps,
        trg_kps=trg_kps,
        kps_valid=valid,
        src_bbox=boxes[0],
        trg_bbox=boxes[1],
        category=cls_id,
        flip=np.int32(flip),
    )
