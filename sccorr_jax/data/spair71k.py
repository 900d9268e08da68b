"""SPair-71k (Min et al., 2019) as a TFDS builder.

Official archive layout (`SPair-71k.tar.gz`, ~220 MB):

    SPair-71k/JPEGImages/<category>/<image>.jpg
    SPair-71k/PairAnnotation/{trn,val,test}/<pair>.json
    SPair-71k/Layout/large/{trn,val,test}.txt     53,340 / 5,384 / 12,234 pairs

A layout line names a pair `<id>-<src image>-<trg image>:<category>`; the annotation file of
that pair may use `-` instead of `:` before the category (archives extracted on file systems
without `:`), and a layout may use either form: both are accepted (a pair a layout lists twice,
in either spelling, is kept once with a note). The annotation JSON gives `src_kps`/`trg_kps`
([[x, y], ...]), `src_bndbox`/`trg_bndbox` (xyxy), `category` and the difficulty levels
`viewpoint_variation`, `scale_variation` (0..2), `truncation`, `occlusion` (0..3); images are
read from `JPEGImages/<category>/` as the reference does (image names from the pair name).
The PCK threshold of SPair-71k is `bbox`: max(w, h) of the source box.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from sccorr_jax.data import builder_base
from sccorr_jax.data import records


def parse_pair_name(name: str):
  """`'000001-2008_000585-2008_002221:aeroplane'` (or with `-aeroplane`) ->
  (canonical name with ':', src image stem, trg image stem, category)."""
  if ':' in name:
    stem, category = name.rsplit(':', 1)
  else:
    stem, category = name.rsplit('-', 1)
  parts = stem.split('-')
  if len(parts) != 3 or not category:
    raise ValueError(f'not an SPair-71k pair name: {name!r}')
  return f'{stem}:{category}', parts[1], parts[2], category


class Spair71k(builder_base.PairDatasetBuilder):
  """SPair-71k: 70,958 image pairs of 18 PASCAL categories with keypoints and difficulty."""

  FOLDER = 'SPair-71k'
  MARKER = os.path.join('Layout', 'large')
  URLS = {'spair71k': 'http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz'}
  CATEGORIES = records.SPAIR_CATEGORIES
  SPLITS = ('trn', 'val', 'test')
  HOMEPAGE = 'https://cvlab.postech.ac.kr/research/SPair-71k/'
  DESCRIPTION = (
      'SPair-71k semantic correspondence benchmark: pairs of PASCAL VOC images with '
      'sparse keypoint matches, boxes and difficulty levels.'
  )
  CITATION = """@article{min2019spair,
  title={SPair-71k: A Large-scale Benchmark for Semantic Correspondence},
  author={Min, Juhong and Lee, Jongmin and Ponce, Jean and Cho, Minsu},
  journal={arXiv preprint arXiv:1908.10543}, year={2019}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download SPair-71k.tar.gz from https://cvlab.postech.ac.kr/research/SPair-71k/ and '
      'extract it into the manual dir (so that <manual_dir>/SPair-71k/Layout/large exists).'
  )

  def _examples(self, root, split, guard):
    layout = os.path.join(root, 'Layout', 'large', f'{split}.txt')
    if not os.path.isfile(layout):
      raise records.PreparationError(f'SPair-71k split file is missing: {layout}')
    ann_dir = os.path.join(root, 'PairAnnotation', split)
    seen = {}  # canonical pair name -> line number of its first listing
    for lineno, line in records.read_text_lines(layout):
      where = f'{layout} line {lineno}'
      if line is None:
        guard.run(f'line {lineno}', functools.partial(_raise_bad, where, 'not UTF-8 text'))
        continue
      try:
        key = parse_pair_name(line)[0]
      except ValueError:
        key = line
      if key in seen:
        guard.note(key, f'{where}: {line!r} repeats the pair of line {seen[key]}; kept once')
        continue
      seen[key] = lineno
      example = guard.run(key, functools.partial(self._example, root, ann_dir, line, guard, where))
      if example is not None:
        yield key, example

  def _example(self, root, ann_dir, line, guard, where='Layout'):
    try:
      name, src_stem, trg_stem, _ = parse_pair_name(line)
    except ValueError as e:
      raise records.BadRecordError(where, str(e)) from e
    stem, cat = name.rsplit(':', 1)
    candidates = [os.path.join(ann_dir, f'{stem}{sep}{cat}.json') for sep in (':', '-')]
    ann_path = next((p for p in candidates if os.path.isfile(p)), None)
    if ann_path is None:
      raise records.BadRecordError(candidates[0], "annotation file is missing (also tried '-')")
    try:
      with open(ann_path, encoding='utf-8') as f:
        ann = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8, huge ints
      raise records.BadRecordError(ann_path, f'malformed JSON ({type(e).__name__}: {e})') from e
    if not isinstance(ann, dict):
      raise records.BadRecordError(ann_path, 'annotation is not a JSON object')
    required = (
        'src_kps',
        'trg_kps',
        'src_bndbox',
        'trg_bndbox',
        'category',
        *records.DIFFICULTY_FIELDS,
    )
    missing = [k for k in required if k not in ann]
    if missing:
      raise records.BadRecordError(ann_path, f'missing field(s) {missing}')
    category = ann['category']
    if category not in self.CATEGORIES:
      raise records.BadRecordError(ann_path, f'field category: unknown category {category!r}')
    src_name = os.path.join('JPEGImages', category, src_stem + '.jpg')
    trg_name = os.path.join('JPEGImages', category, trg_stem + '.jpg')
    src_bytes, src_hw = records.read_encoded_image(os.path.join(root, src_name))
    trg_bytes, trg_hw = records.read_encoded_image(os.path.join(root, trg_name))
    src_kps, trg_kps, valid = records.clean_keypoints(
        ann['src_kps'],
        ann['trg_kps'],
        src_hw,
        trg_hw,
        file=ann_path,
        record=name,
        guard=guard,
        nan_invisible=False,
    )
    difficulty = {
        field: records.parse_level(ann[field], ann_path, field, max_level)
        for field, max_level in records.SPAIR_MAX_LEVELS.items()
    }
    return records.base_example(
        pair_id=name,
        src_imname=src_name,
        trg_imname=trg_name,
        src_img=src_bytes,
        trg_img=trg_bytes,
        src_imsize=np.array(src_hw, np.int32),
        trg_imsize=np.array(trg_hw, np.int32),
        src_kps=src_kps,
        trg_kps=trg_kps,
        kps_valid=valid,
        src_bbox=records.parse_bbox(ann['src_bndbox'], ann_path, 'src_bndbox', src_hw),
        trg_bbox=records.parse_bbox(ann['trg_bndbox'], ann_path, 'trg_bndbox', trg_hw),
        category=self.CATEGORIES.index(category),
        **difficulty,
    )


def _raise_bad(file: str, problem: str):
  raise records.BadRecordError(file, problem)
