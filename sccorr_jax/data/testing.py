"""Tiny copies of the benchmarks in their exact official on-disk layouts, for tests and smoke runs.

`write_spair71k(root)`, `write_pfpascal(root)`, `write_pfwillow(root)` create
`root/SPair-71k/`, `root/PF-PASCAL/`, `root/PF-WILLOW/` with a few small images per category
and real annotation formats (JSON, MATLAB .mat, csv), and return what they wrote (pair lists,
keypoints, boxes, image sizes) so tests can compare prepared records with hand-computed values.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List

import numpy as np
from PIL import Image
import scipy.io


def _image(path: str, size_wh, seed: int, mode: str = 'RGB', fmt: str = 'JPEG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  w, h = size_wh
  arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  img = Image.fromarray(arr, 'RGB')
  if mode != 'RGB':
    img = img.convert(mode)
  img.save(path, format=fmt)


SPAIR_IMAGES = {  # category -> {stem: (w, h)}
    'aeroplane': {'2008_000001': (40, 30), '2008_000002': (36, 28), '2008_000003': (44, 32)},
    'cat': {'2009_000001': (40, 30), '2009_000002': (30, 40)},
}


def _spair_kps(rng, w, h, n):
  return np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], 1).astype(float)


def write_spair71k(root: str) -> Dict[str, List[dict]]:
  """Writes `root/SPair-71k`; returns {split: [pair dict with name, category, src/trg stems,
  src_kps, trg_kps ([n, 2] lists), src_bbox, trg_bbox, sizes (w, h), difficulty]}."""
  base = os.path.join(root, 'SPair-71k')
  seed = 0
  for cat, imgs in SPAIR_IMAGES.items():
    for stem, wh in imgs.items():
      seed += 1
      _image(os.path.join(base, 'JPEGImages', cat, stem + '.jpg'), wh, seed)
  rng = np.random.default_rng(1)
  pairs = {
      'trn': [
          ('aeroplane', '2008_000001', '2008_000002'),
          ('aeroplane', '2008_000002', '2008_000003'),
          ('cat', '2009_000001', '2009_000002'),
          ('aeroplane', '2008_000003', '2008_000001'),
      ],
      'val': [('cat', '2009_000002', '2009_000001'), ('aeroplane', '2008_000001', '2008_000003')],
      'test': [('aeroplane', '2008_000002', '2008_000001'), ('cat', '2009_000001', '2009_000002')],
  }
  out = {}
  pid = 0
  for split, plist in pairs.items():
    os.makedirs(os.path.join(base, 'PairAnnotation', split), exist_ok=True)
    os.makedirs(os.path.join(base, 'Layout', 'large'), exist_ok=True)
    lines, out[split] = [], []
    for j, (cat, s, t) in enumerate(plist):
      pid += 1
      name = f'{pid:06d}-{s}-{t}:{cat}'
      sw, sh = SPAIR_IMAGES[cat][s]
      tw, th = SPAIR_IMAGES[cat][t]
      n = int(rng.integers(3, 8))
      src_kps, trg_kps = _spair_kps(rng, sw, sh, n), _spair_kps(rng, tw, th, n)
      src_box = [1, 2, sw - 3, sh - 1]
      trg_box = [2, 1, tw - 1, th - 4]
      diff = dict(
          viewpoint_variation=j % 3,
          scale_variation=(j + 1) % 3,
          truncation=j % 2,
          occlusion=(j + 1) % 2,
      )
      ann = dict(
          pair_id=pid,
          filename=name,
          src_imname=s + '.jpg',
          trg_imname=t + '.jpg',
          src_imsize=[sw, sh, 3],
          trg_imsize=[tw, th, 3],
          src_bndbox=src_box,
          trg_bndbox=trg_box,
          category=cat,
          src_pose='Left',
          trg_pose='Right',
          src_kps=src_kps.astype(int).tolist(),
          trg_kps=trg_kps.astype(int).tolist(),
          kps_ids=[str(i) for i in range(n)],
          mirror=0,
          **diff,
      )
      # Annotation files use ':' or '-' before the category; layout lines ':' or '-'.
      ann_name = name if j % 2 == 0 else name.replace(':', '-')
      with open(os.path.join(base, 'PairAnnotation', split, ann_name + '.json'), 'w') as f:
        json.dump(ann, f)
      lines.append(name if j != 1 else name.replace(':', '-'))
      out[split].append(
          dict(
              name=name,
              category=cat,
              src=s,
              trg=t,
              src_kps=src_kps,
              trg_kps=trg_kps,
              src_bbox=src_box,
              trg_bbox=trg_box,
              src_wh=(sw, sh),
              trg_wh=(tw, th),
              **diff,
          )
      )
    with open(os.path.join(base, 'Layout', 'large', f'{split}.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return out


PASCAL_IMAGES = {  # stem -> (class, (w, h))
    '2007_000001': ('aeroplane', (40, 30)),
    '2007_000002': ('aeroplane', (32, 24)),
    '2007_000003': ('aeroplane', (40, 36)),
    '2008_000010': ('dog', (30, 40)),
    '2008_000011': ('dog', (40, 30)),
    '2008_000012': ('dog', (36, 30)),
}
PASCAL_NUM_KPS = {'aeroplane': 6, 'dog': 5}


def write_pfpascal(root: str) -> Dict[str, List[dict]]:
  """Writes `root/PF-PASCAL`; returns {split: [pair dicts]} with the raw .mat keypoints (NaN =
  invisible), boxes, sizes, class id (0-based) and flip flag."""
  base = os.path.join(root, 'PF-PASCAL')
  rng = np.random.default_rng(2)
  anns = {}
  for i, (stem, (cls, (w, h))) in enumerate(PASCAL_IMAGES.items()):
    _image(os.path.join(base, 'JPEGImages', stem + '.jpg'), (w, h), 100 + i)
    n = PASCAL_NUM_KPS[cls]
    kps = np.stack([rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)], 1)
    kps[rng.random(n) < 0.25] = np.nan  # invisible keypoints
    bbox = np.array([[1, 1, w - 2, h - 3]], np.float64)
    os.makedirs(os.path.join(base, 'Annotations', cls), exist_ok=True)
    scipy.io.savemat(
        os.path.join(base, 'Annotations', cls, stem + '.mat'), {'kps': kps, 'bbox': bbox}
    )
    anns[stem] = dict(kps=kps, bbox=bbox[0], wh=(w, h), cls=cls)
  # PF-PASCAL's first 12 classes in its order (a csv's class id is the 1-based index).
  classes = 'aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog'.split()
  pairs = {
      'trn': [
          ('2007_000001', '2007_000002', 0),
          ('2007_000001', '2007_000002', 1),
          ('2008_000010', '2008_000011', 1),
          ('2007_000003', '2007_000001', 0),
      ],
      'val': [('2008_000011', '2008_000012', None), ('2007_000002', '2007_000003', None)],
      'test': [('2008_000012', '2008_000010', None), ('2007_000003', '2007_000002', None)],
  }
  out = {}
  for split, plist in pairs.items():
    header = ['source_image', 'target_image', 'class'] + (['flip'] if split == 'trn' else [])
    rows, out[split] = [header], []
    for s, t, flip in plist:
      cls = anns[s]['cls']
      cid = classes.index(cls)
      rows.append(
          [f'JPEGImages/{s}.jpg', f'JPEGImages/{t}.jpg', str(cid + 1)]
          + ([str(flip)] if flip is not None else [])
      )
      out[split].append(
          dict(
              src=s,
              trg=t,
              category=cid,
              flip=flip or 0,
              src_kps=anns[s]['kps'],
              trg_kps=anns[t]['kps'],
              src_bbox=anns[s]['bbox'],
              trg_bbox=anns[t]['bbox'],
              src_wh=anns[s]['wh'],
              trg_wh=anns[t]['wh'],
          )
      )
    with open(os.path.join(base, f'{split}_pairs.csv'), 'w', newline='') as f:
      csv.writer(f).writerows(rows)
  return out


WILLOW_IMAGES = {  # relative path -> (w, h)
    'car(G)/Cars_000a.png': (40, 30),
    'car(G)/Cars_001b.png': (36, 30),
    'duck(S)/Duck_000a.png': (30, 40),
    'duck(S)/Duck_001b.png': (40, 32),
}


def write_pfwillow(root: str) -> Dict[str, List[dict]]:
  """Writes `root/PF-WILLOW` (PNG images, one RGBA, one grey); returns {'test': [pairs]}."""
  base = os.path.join(root, 'PF-WILLOW')
  modes = ['RGB', 'RGBA', 'L', 'RGB']
  for i, (rel, wh) in enumerate(WILLOW_IMAGES.items()):
    _image(os.path.join(base, rel), wh, 200 + i, mode=modes[i], fmt='PNG')
  rng = np.random.default_rng(3)
  plist = [
      ('car(G)/Cars_000a.png', 'car(G)/Cars_001b.png'),
      ('duck(S)/Duck_000a.png', 'duck(S)/Duck_001b.png'),
      ('car(G)/Cars_001b.png', 'car(G)/Cars_000a.png'),
  ]
  header = (
      ['imageA', 'imageB']
      + [f'XA{i}' for i in range(1, 11)]
      + [f'YA{i}' for i in range(1, 11)]
      + [f'XB{i}' for i in range(1, 11)]
      + [f'YB{i}' for i in range(1, 11)]
  )
  rows, out = [header], []
  for s, t in plist:
    (sw, sh), (tw, th) = WILLOW_IMAGES[s], WILLOW_IMAGES[t]
    src = np.stack([rng.uniform(2, sw - 3, 10), rng.uniform(2, sh - 3, 10)], 1).round(2)
    trg = np.stack([rng.uniform(2, tw - 3, 10), rng.uniform(2, th - 3, 10)], 1).round(2)
    rows.append(
        [f'PF-dataset/{s}', f'PF-dataset/{t}']
        + [repr(float(v)) for v in src[:, 0]]
        + [repr(float(v)) for v in src[:, 1]]
        + [repr(float(v)) for v in trg[:, 0]]
        + [repr(float(v)) for v in trg[:, 1]]
    )
    out.append(
        dict(
            src=s,
            trg=t,
            category=s.split('/')[0],
            src_kps=src,
            trg_kps=trg,
            src_wh=(sw, sh),
            trg_wh=(tw, th),
        )
    )
  with open(os.path.join(base, 'test_pairs.csv'), 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return {'test': out}
