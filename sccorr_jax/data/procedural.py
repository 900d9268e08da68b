"""Procedurally generated articulated 2D objects with exact dense semantic correspondence.

The generator behind the `parts` dataset (`sccorr_jax.data.parts`), pure NumPy. Nothing is
downloaded: textures and backgrounds come from the photographs shipped in `skimage.data`.

**Categories.** Each category is a kinematic tree of rigid parts (`Part`): a quadruped, a bird
and a vehicle seen from the side, a face, a humanoid and a five-petal flower seen from the
front. A part is a tapered superellipse `|u|^e + |v / w(u)|^e <= 1`, `w(u) = 1 - taper (u + 1) / 2`,
in its own *canonical* coordinates `(u, v)` in [-1, 1] (u along the part, v across it), placed by
its parent: its joint `joint` (own (u, v)) sits on the parent's point `attach` (parent's (u, v)),
at the angle `angle` (degrees, clockwise in the image) from the parent's u axis.

**Canonical coordinates and flips.** Every object pixel has canonical coordinates
`(part, u, v)`; the same triple names the same point of the object in every instance of the
category. Part frames are anatomical (a limb's u runs from its root to its tip; a left part's
frame is the mirror image of its right partner's), so a horizontally flipped instance is the
mirror image of an instance whose parts are relabelled by the category's left/right permutation:
geometry drawn as part `g` is labelled `(perm[g], u, sign[g] v)`, where `sign` is -1 for the
parts that are their own mirror image in a frontal view (a face's head, a flower's petals: their
v axis changes side). A flipped face's left eye is therefore still its left eye, on the viewer's
right, as in SPair-71k. Side views (quadruped, bird) relabel near <-> far limbs.

**Instances.** Part lengths and widths vary (log-normal, ~12%), joints swing within
`Part.swing`, and the whole object gets a scale (45-90% of the image side), a rotation (within
the category's range), a translation (objects may leave the image: truncation) and a horizontal
flip (p=0.5). Each part is textured with one of three materials of its instance (photograph crops
in random colours, stripes, checks, dots or waves), shaded toward its outline, so two instances
never share appearance. The background is a photograph crop with random textured shapes; with
p=0.3 a textured occluder is drawn over the object.

**Dense ground truth.** For a pair (source, target) of two instances of one category, a target
object pixel `x` with canonical `(p, u, v)` matches the source point with the same canonical
coordinates, `y = A_src (u, v) + b_src` of the source part drawn as `p`; `dense_flow[x] = y - x`
(pixels, target -> source, the project's flow direction) and `dense_valid[x]` is True iff `y`
lies in the source image and the source pixel nearest to `y` shows that part (not hidden by
another part or an occluder). Background and occluder pixels are unlabelled.

**Keypoints.** Each category names 10-30 points `(part, u, v)` (`Category.keypoints`); a
keypoint is visible in an image when it lies inside it and the nearest pixel shows its part.
A pair's labels are the keypoints visible in both images: `trg_kps` is the target pixel
(integer centre) nearest the keypoint, and `src_kps = trg_kps + dense_flow[trg_kps]`, so the
sparse labels agree exactly with the dense ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from sccorr_jax.data import records
from sccorr_jax.data import synthetic

# ------------------------------------------------------------------------------------------------
# Templates.


@dataclasses.dataclass(frozen=True)
class Part:
  """One rigid part of a category template (object units: the root is about 1 long).

  Attributes:
    name: unique in the category; left/right partners are named `left_*` / `right_*`.
    parent: the part it hangs from (earlier in the template), None for the root.
    length, width: half-length along u and half-width along v, object units.
    angle: degrees from the parent's u axis to this part's u axis (the root: from the image x
      axis), clockwise in the image, mirrored under a mirrored parent.
    swing: the articulation range, `angle + U(-swing, swing)` per instance.
    attach: the parent's (u, v) where the joint sits.
    joint: this part's own (u, v) at the joint.
    slide: `attach[0] + U(-slide, slide)` per instance.
    z: drawing order (larger on top).
    exponent, taper: the superellipse `|u|^e + |v / w(u)|^e <= 1`, `w(u) = 1 - taper (u+1)/2`.
    mirror: this part's frame is the mirror image of its parent's (set on the root of the left
      copy of a frontal left/right chain; children inherit it).
    flip_sign: canonical v multiplier when an instance is flipped (-1 for parts that are their
      own mirror image in a frontal view, or map onto a rotated copy).
  """

  name: str
  parent: Optional[str]
  length: float
  width: float
  angle: float = 0.0
  swing: float = 0.0
  attach: Tuple[float, float] = (0.0, 0.0)
  joint: Tuple[float, float] = (-1.0, 0.0)
  slide: float = 0.0
  z: float = 0.0
  exponent: float = 2.0
  taper: float = 0.0
  mirror: bool = False
  flip_sign: int = 1


def _mirror_chain(parts: Sequence[Part]) -> List[Part]:
  """Left copies of a frontal right chain: names right_ -> left_, the chain's root attached
  at the mirrored point with the mirrored angle and a mirrored frame."""
  names = {p.name for p in parts}
  out = []
  for p in parts:
    parent = p.parent.replace('right_', 'left_') if p.parent in names else p.parent
    kw = dict(name=p.name.replace('right_', 'left_'), parent=parent)
    if p.parent not in names:
      kw.update(attach=(p.attach[0], -p.attach[1]), angle=-p.angle, mirror=True)
    out.append(dataclasses.replace(p, **kw))
  return out


def _far_chain(parts: Sequence[Part], dz: float, shift: float) -> List[Part]:
  """Far-side copies of a side view's near (left) chain: names left_ -> right_, drawn `dz`
  lower and attached `shift` further along the parent's u."""
  names = {p.name for p in parts}
  out = []
  for p in parts:
    parent = p.parent.replace('left_', 'right_') if p.parent in names else p.parent
    kw = dict(name=p.name.replace('left_', 'right_'), parent=parent, z=p.z - dz)
    if p.parent not in names:
      kw.update(attach=(p.attach[0] + shift, p.attach[1]))
    out.append(dataclasses.replace(p, **kw))
  return out


class Category:
  """A category: its parts (parents first), named keypoints and flip tables.

  Attributes:
    name: category name.
    parts: tuple of `Part`.
    keypoints: tuple of (name, part name, u, v).
    rotation: instances are rotated by U(-rotation, rotation) degrees.
    part_perm: [P] int, the left/right partner of each part (itself if none).
    part_sign: [P] int, canonical v multiplier under a flip.
    kp_part: [K] int, kp_uv: [K, 2] float: the keypoints' part and canonical (u, v).
    kp_perm: [K] int, the keypoint that keypoint k becomes in a mirrored image.
  """

  def __init__(
      self,
      name: str,
      parts: Sequence[Part],
      keypoints,
      rotation: float,
      swaps: Sequence[Tuple[str, str]] = (),
  ):
    self.name = name
    self.parts = tuple(parts)
    self.keypoints = tuple(keypoints)
    self.rotation = float(rotation)
    index = {p.name: i for i, p in enumerate(self.parts)}
    if len(index) != len(self.parts):
      raise ValueError(f'{name}: duplicate part names')
    self.parent = np.array([index[p.parent] if p.parent else -1 for p in self.parts])
    if (self.parent >= np.arange(len(self.parts))).any() or self.parent[0] != -1:
      raise ValueError(f'{name}: parents must come before their children, the root first')
    perm = np.arange(len(self.parts))
    pairs = [(n, n.replace('left_', 'right_')) for n in index if n.startswith('left_')]
    for a, b in list(pairs) + list(swaps):
      perm[index[a]], perm[index[b]] = index[b], index[a]
    self.part_perm = perm
    self.part_sign = np.array([p.flip_sign for p in self.parts])
    if (self.part_sign != self.part_sign[perm]).any() or (perm[perm] != np.arange(len(perm))).any():
      raise ValueError(f'{name}: the flip must be an involution with equal signs on partners')
    if not 10 <= len(self.keypoints) <= 30:
      raise ValueError(f'{name}: {len(self.keypoints)} keypoints, expected 10-30')
    self.kp_part = np.array([index[k[1]] for k in self.keypoints])
    self.kp_uv = np.array([[k[2], k[3]] for k in self.keypoints], np.float64)
    kp_perm = []
    for k in range(len(self.keypoints)):
      p = perm[self.kp_part[k]]
      uv = self.kp_uv[k] * [1, self.part_sign[p]]
      hit = np.nonzero((self.kp_part == p) & (np.abs(self.kp_uv - uv).max(1) < 1e-9))[0]
      if len(hit) != 1:
        raise ValueError(f'{name}: keypoint {self.keypoints[k][0]} has no mirror keypoint')
      kp_perm.append(int(hit[0]))
    self.kp_perm = np.array(kp_perm)

  @property
  def keypoint_names(self) -> Tuple[str, ...]:
    return tuple(k[0] for k in self.keypoints)


# The templates are tables, kept one part or keypoint a line.
# fmt: off
def _quadruped() -> Category:
  body = [
      Part('torso', None, 1.0, 0.42, exponent=2.5, swing=5),
      Part('neck', 'torso', 0.35, 0.17, angle=-50, swing=15, attach=(0.8, -0.45), z=0.2),
      Part('head', 'neck', 0.42, 0.3, angle=45, swing=20, attach=(0.9, 0.0), joint=(-0.6, 0.0),
           z=0.3),
      Part('snout', 'head', 0.25, 0.15, angle=15, swing=8, attach=(0.75, 0.2),
           joint=(-0.8, 0.0), taper=0.4, z=0.35),
      Part('tail', 'torso', 0.45, 0.09, angle=200, swing=35, attach=(-0.95, -0.3), taper=0.6,
           z=-0.1),
  ]
  ear = [Part('left_ear', 'head', 0.24, 0.11, angle=-100, swing=20, attach=(-0.3, -0.75),
              taper=0.9, exponent=3, z=0.4)]
  legs = []
  for end, u in (('front', 0.6), ('hind', -0.65)):
    legs += [
        Part(f'left_{end}_upper_leg', 'torso', 0.33, 0.12, angle=90, swing=25,
             attach=(u, 0.65), z=0.5),
        Part(f'left_{end}_lower_leg', f'left_{end}_upper_leg', 0.3, 0.085, swing=30,
             attach=(0.9, 0.0), joint=(-0.9, 0.0), taper=0.3, z=0.55),
    ]
  parts = body + ear + _far_chain(ear, 0.2, 0.25) + legs + _far_chain(legs, 1.0, 0.1)
  kps = [('nose', 'snout', 0.9, 0.0), ('head_top', 'head', 0.0, -0.85),
         ('jaw', 'head', 0.1, 0.85), ('withers', 'torso', 0.55, -0.8),
         ('belly', 'torso', 0.0, 0.85), ('tail_base', 'tail', -0.8, 0.0),
         ('tail_tip', 'tail', 0.85, 0.0)]
  for side in ('left', 'right'):
    kps.append((f'{side}_ear_tip', f'{side}_ear', 0.8, 0.0))
    for end, root in (('front', 'shoulder'), ('hind', 'hip')):
      kps += [(f'{side}_{end}_{root}', f'{side}_{end}_upper_leg', -0.7, 0.0),
              (f'{side}_{end}_knee', f'{side}_{end}_upper_leg', 0.85, 0.0),
              (f'{side}_{end}_paw', f'{side}_{end}_lower_leg', 0.85, 0.0)]
  return Category('quadruped', parts, kps, rotation=20)


def _bird() -> Category:
  body = [
      Part('body', None, 0.8, 0.45, swing=10),
      Part('head', 'body', 0.32, 0.3, angle=-20, swing=20, attach=(0.85, -0.45),
           joint=(0.0, 0.0), z=0.2),
      Part('beak', 'head', 0.3, 0.13, angle=10, swing=10, attach=(0.85, 0.1), taper=0.95,
           z=0.25),
      Part('tail', 'body', 0.45, 0.2, angle=170, swing=25, attach=(-0.9, -0.1), taper=-0.8,
           z=-0.05),
  ]
  wing = [Part('left_wing', 'body', 0.6, 0.22, angle=200, swing=40, attach=(0.1, -0.2),
               taper=0.6, z=0.3)]
  leg = [Part('left_leg', 'body', 0.3, 0.05, angle=95, swing=20, attach=(0.0, 0.85),
              exponent=4, z=0.1),
         Part('left_foot', 'left_leg', 0.15, 0.05, angle=-80, swing=15, attach=(0.95, 0.0),
              exponent=4, z=0.12)]
  parts = body + wing + _far_chain(wing, 0.6, 0.15) + leg + _far_chain(leg, 0.2, 0.2)
  kps = [('beak_tip', 'beak', 0.85, 0.0), ('crown', 'head', 0.0, -0.85),
         ('throat', 'head', 0.3, 0.8), ('nape', 'head', -0.85, -0.2),
         ('breast', 'body', 0.7, 0.45), ('belly', 'body', 0.0, 0.85),
         ('back', 'body', 0.0, -0.85), ('tail_base', 'tail', -0.7, 0.0),
         ('tail_tip', 'tail', 0.9, 0.0)]
  for side in ('left', 'right'):
    kps += [(f'{side}_wing_root', f'{side}_wing', -0.7, 0.0),
            (f'{side}_wing_tip', f'{side}_wing', 0.85, 0.0),
            (f'{side}_leg_root', f'{side}_leg', -0.7, 0.0),
            (f'{side}_ankle', f'{side}_leg', 0.85, 0.0),
            (f'{side}_toe', f'{side}_foot', 0.85, 0.0)]
  return Category('bird', parts, kps, rotation=20)


def _vehicle() -> Category:
  parts = [
      Part('body', None, 1.2, 0.3, exponent=6),
      Part('cabin', 'body', 0.6, 0.3, attach=(-0.1, -0.95), joint=(0.0, 1.0), slide=0.2,
           taper=0.4, exponent=6, z=-0.1),
      Part('window', 'cabin', 0.45, 0.16, attach=(0.0, -0.1), joint=(0.0, 0.0), taper=0.4,
           exponent=4, z=-0.05),
      Part('front_wheel', 'body', 0.3, 0.3, attach=(0.65, 0.9), joint=(0.0, 0.0), slide=0.08,
           z=0.2),
      Part('rear_wheel', 'body', 0.3, 0.3, attach=(-0.65, 0.9), joint=(0.0, 0.0), slide=0.08,
           z=0.2),
      Part('headlight', 'body', 0.06, 0.1, attach=(0.95, -0.35), joint=(0.0, 0.0), z=0.3),
      Part('taillight', 'body', 0.05, 0.12, attach=(-0.96, -0.35), joint=(0.0, 0.0), z=0.3),
  ]
  kps = [('body_front_bottom', 'body', 0.93, 0.7), ('body_rear_bottom', 'body', -0.93, 0.7),
         ('body_front_top', 'body', 0.9, -0.75), ('body_rear_top', 'body', -0.9, -0.75),
         ('roof_front', 'cabin', 0.55, -0.85), ('roof_rear', 'cabin', -0.75, -0.85),
         ('window_centre', 'window', 0.0, 0.0), ('headlight', 'headlight', 0.0, 0.0),
         ('taillight', 'taillight', 0.0, 0.0)]
  for wheel in ('front', 'rear'):
    kps += [(f'{wheel}_wheel_centre', f'{wheel}_wheel', 0.0, 0.0),
            (f'{wheel}_wheel_top', f'{wheel}_wheel', 0.0, -0.85),
            (f'{wheel}_wheel_bottom', f'{wheel}_wheel', 0.0, 0.85),
            (f'{wheel}_wheel_front', f'{wheel}_wheel', 0.85, 0.0)]
  return Category('vehicle', parts, kps, rotation=15)


def _face() -> Category:
  # The head's u points down the face, its v to the viewer's left (the face's right).
  mid = dict(flip_sign=-1)
  parts = [
      Part('head', None, 1.0, 0.8, angle=90, swing=10, exponent=2.2, **mid),
      Part('neck', 'head', 0.35, 0.35, attach=(0.9, 0.0), swing=8, exponent=6, z=-0.2, **mid),
      Part('nose', 'head', 0.25, 0.15, attach=(0.1, 0.0), swing=8, taper=-0.6, z=0.2, **mid),
      Part('mouth', 'head', 0.09, 0.3, attach=(0.6, 0.0), joint=(0.0, 0.0), swing=6, z=0.2,
           slide=0.05, **mid),
  ]
  right = [
      Part('right_ear', 'head', 0.28, 0.2, angle=90, swing=15, attach=(-0.05, 0.92),
           joint=(-0.8, 0.0), z=-0.1),
      Part('right_eye', 'head', 0.11, 0.2, swing=8, attach=(-0.2, 0.38), joint=(0.0, 0.0),
           slide=0.05, z=0.2),
      Part('right_brow', 'head', 0.05, 0.22, swing=12, attach=(-0.48, 0.38), joint=(0.0, 0.0),
           slide=0.05, exponent=4, z=0.2),
  ]
  parts += right + _mirror_chain(right)
  kps = [('chin', 'head', 0.92, 0.0), ('forehead', 'head', -0.9, 0.0),
         ('nose_tip', 'nose', 0.85, 0.0), ('nose_bridge', 'nose', -0.85, 0.0),
         ('mouth_top', 'mouth', -0.8, 0.0), ('mouth_bottom', 'mouth', 0.8, 0.0),
         ('neck_bottom', 'neck', 0.85, 0.0),
         ('right_mouth_corner', 'mouth', 0.0, 0.9), ('left_mouth_corner', 'mouth', 0.0, -0.9),
         ('right_cheek', 'head', 0.35, 0.6), ('left_cheek', 'head', 0.35, -0.6)]
  for side in ('left', 'right'):
    kps += [(f'{side}_eye_outer', f'{side}_eye', 0.0, 0.85),
            (f'{side}_eye_inner', f'{side}_eye', 0.0, -0.85),
            (f'{side}_brow_outer', f'{side}_brow', 0.0, 0.85),
            (f'{side}_brow_inner', f'{side}_brow', 0.0, -0.85),
            (f'{side}_ear_tip', f'{side}_ear', 0.8, 0.0)]
  return Category('face', parts, kps, rotation=25)


def _humanoid() -> Category:
  mid = dict(flip_sign=-1)
  parts = [
      Part('torso', None, 0.7, 0.38, angle=90, swing=10, exponent=3, taper=0.2, **mid),
      Part('head', 'torso', 0.3, 0.24, attach=(-1.0, 0.0), joint=(0.95, 0.0), swing=12, z=0.1,
           **mid),
  ]
  right = [
      Part('right_upper_arm', 'torso', 0.32, 0.09, angle=20, swing=35, attach=(-0.8, 0.9),
           z=0.1),
      Part('right_forearm', 'right_upper_arm', 0.3, 0.075, angle=-10, swing=40,
           attach=(0.95, 0.0), joint=(-0.95, 0.0), taper=0.2, z=0.15),
      Part('right_thigh', 'torso', 0.4, 0.13, angle=8, swing=15, attach=(0.95, 0.5), z=-0.05),
      Part('right_shin', 'right_thigh', 0.38, 0.1, swing=20, attach=(0.95, 0.0),
           joint=(-0.95, 0.0), taper=0.3, z=-0.04),
  ]
  parts += right + _mirror_chain(right)
  kps = [('head_top', 'head', -0.9, 0.0), ('chin', 'head', 0.9, 0.0),
         ('neck', 'torso', -0.9, 0.0), ('pelvis', 'torso', 0.85, 0.0),
         ('right_ear', 'head', 0.0, 0.9), ('left_ear', 'head', 0.0, -0.9)]
  for side in ('left', 'right'):
    kps += [(f'{side}_shoulder', f'{side}_upper_arm', -0.7, 0.0),
            (f'{side}_elbow', f'{side}_upper_arm', 0.9, 0.0),
            (f'{side}_wrist', f'{side}_forearm', 0.85, 0.0),
            (f'{side}_hip', f'{side}_thigh', -0.6, 0.0),
            (f'{side}_knee', f'{side}_thigh', 0.9, 0.0),
            (f'{side}_ankle', f'{side}_shin', 0.85, 0.0)]
  return Category('humanoid', parts, kps, rotation=20)


def _flower(n: int = 5) -> Category:
  # The centre's u points up; petal i points 360 i / n degrees clockwise from it. A mirror image
  # maps petal i onto petal n - i with its v axis reversed (flip_sign -1).
  mid = dict(flip_sign=-1)
  parts = [Part('centre', None, 0.3, 0.3, angle=-90, swing=5, z=0.2, **mid)]
  for i in range(n):
    a = np.deg2rad(360.0 * i / n)
    parts.append(Part(f'petal_{i}', 'centre', 0.45, 0.25, angle=360.0 * i / n, swing=10,
                      attach=(0.6 * np.cos(a), 0.6 * np.sin(a)), taper=-0.4, z=0.1 + 0.01 * i,
                      **mid))
  parts.append(Part('stem', 'centre', 0.8, 0.06, angle=180, swing=12, attach=(-0.9, 0.0),
                    exponent=4, z=-0.2, **mid))
  right = [Part('right_leaf', 'stem', 0.35, 0.13, angle=130, swing=20, attach=(0.3, 0.8),
                taper=0.5, z=-0.15)]
  parts += right + _mirror_chain(right)
  kps = [('centre', 'centre', 0.0, 0.0), ('stem_bottom', 'stem', 0.9, 0.0),
         ('right_leaf_tip', 'right_leaf', 0.85, 0.0), ('left_leaf_tip', 'left_leaf', 0.85, 0.0)]
  for i in range(n):
    kps += [(f'petal_{i}_tip', f'petal_{i}', 0.85, 0.0),
            (f'petal_{i}_cw', f'petal_{i}', 0.3, 0.85),
            (f'petal_{i}_ccw', f'petal_{i}', 0.3, -0.85)]
  swaps = [(f'petal_{i}', f'petal_{n - i}') for i in range(1, (n + 1) // 2)]
  return Category('flower', parts, kps, rotation=35, swaps=swaps)
# fmt: on


CATEGORIES: Tuple[Category, ...] = (
    _quadruped(),
    _bird(),
    _vehicle(),
    _face(),
    _humanoid(),
    _flower(),
)
CATEGORY_NAMES: Tuple[str, ...] = tuple(c.name for c in CATEGORIES)
FLIP_P = 0.5
OCCLUDER_P = 0.3


def category(name_or_id) -> Category:
  """A category by id or name: 0-5 (or their names) the benchmark's six, `NOVEL_BASE + i` (or
  `novel_category_name(i)`) the `i`-th procedurally generated novel category."""
  if isinstance(name_or_id, (int, np.integer)):
    i = int(name_or_id)
    return CATEGORIES[i] if i < NOVEL_BASE else novel_category(i - NOVEL_BASE)
  if name_or_id.startswith(_NOVEL_PREFIX):
    return novel_category(int(name_or_id[len(_NOVEL_PREFIX) :]))
  return CATEGORIES[CATEGORY_NAMES.index(name_or_id)]


# ------------------------------------------------------------------------------------------------
# Novel categories: random kinematic trees, for pretraining on categories disjoint from the six.

NOVEL_BASE = 1000  # Category id of novel category 0 (`category(NOVEL_BASE + i)`).
_NOVEL_PREFIX = 'novel_'
_NOVEL_SEED = 20221023  # Fixed: novel category i is the same tree on every machine and run.
_EXPONENTS = (2.0, 2.0, 2.5, 3.0, 4.0, 6.0)


def novel_category_name(i: int) -> str:
  return f'{_NOVEL_PREFIX}{int(i):05d}'


def _novel_part(rng, name, parent, root: bool = False) -> Part:
  """A random part: a root body, or a limb hanging from a point of its parent's outline."""
  shape = dict(exponent=float(rng.choice(_EXPONENTS)), taper=float(rng.uniform(-0.6, 0.9)))
  if root:
    return Part(
        name,
        None,
        float(rng.uniform(0.6, 1.2)),
        float(rng.uniform(0.25, 0.6)),
        swing=float(rng.uniform(0, 10)),
        **shape,
    )
  side = float(rng.choice([-1.0, 1.0]))
  centred = rng.random() < 0.2  # a part centred on its joint (a wheel, an eye) or a limb
  return Part(
      name,
      parent,
      float(rng.uniform(0.15, 0.6)),
      float(rng.uniform(0.05, 0.3)),
      angle=float(rng.uniform(-150, 150)),
      swing=float(rng.uniform(0, 35)),
      attach=(float(rng.uniform(-0.9, 0.9)), side * float(rng.uniform(0.3, 0.95))),
      joint=(0.0, 0.0) if centred else (-0.9, 0.0),
      slide=float(rng.uniform(0, 0.1)),
      z=float(rng.uniform(-0.5, 0.5)),
      **shape,
  )


def _novel_keypoints(rng, parts: Sequence[Part]) -> List[Tuple[str, str, float, float]]:
  """10-30 keypoints: the tip of every part, then roots, side points and centres at random;
  a far (right_) copy of a near (left_) part gets its partner's keypoints (flip tables)."""
  choices = ((0.85, 0.0), (-0.7, 0.0), (0.0, 0.85), (0.0, -0.85), (0.0, 0.0), (0.5, 0.6))
  own = [p for p in parts if not p.name.startswith('right_')]
  per_part = {p.name: [choices[0]] for p in own}
  n_total = lambda: sum(
      len(v) * (2 if k.startswith('left_') else 1) for k, v in per_part.items()  # noqa: E731
  )
  target = int(rng.integers(10, 25))
  for _ in range(100):
    if n_total() >= target:
      break
    p = own[int(rng.integers(len(own)))]
    uv = choices[int(rng.integers(1, len(choices)))]
    if uv not in per_part[p.name] and n_total() + (2 if p.name.startswith('left_') else 1) <= 30:
      per_part[p.name].append(uv)
  kps = []
  for name, uvs in per_part.items():
    for j, (u, v) in enumerate(uvs):
      kps.append((f'{name}_kp{j}', name, u, v))
      if name.startswith('left_'):
        partner = name.replace('left_', 'right_', 1)
        kps.append((f'{partner}_kp{j}', partner, u, v))
  return kps


@functools.lru_cache(maxsize=None)
def novel_category(i: int) -> Category:
  """Novel category `i`: a random kinematic tree of 3-9 parts, drawn from `(seed, i)` alone.

  A root body and limbs hanging from points of earlier parts (random lengths, widths,
  superellipse exponents, tapers, angles and articulation ranges); with p=0.5 a side-view
  near/far pair of limb chains (`left_*` / `right_*`, as the quadruped's legs), so flips swap
  them. Keypoints: 10-30 named points on the parts (`_novel_keypoints`). None of these trees is
  one of the six benchmark categories: it shares no template, only the generator's rules.
  """
  rng = np.random.default_rng([_NOVEL_SEED, int(i)])
  for _ in range(50):
    parts = [_novel_part(rng, 'body', None, root=True)]
    for k in range(int(rng.integers(2, 7))):
      parent = parts[int(rng.integers(len(parts))) if rng.random() < 0.5 else 0]
      parts.append(_novel_part(rng, f'part{k}', parent.name))
    if rng.random() < 0.5:  # a near/far pair of limb chains attached to the body
      limb = [_novel_part(rng, 'left_limb0', 'body')]
      if rng.random() < 0.6:
        limb.append(
            dataclasses.replace(
                _novel_part(rng, 'left_limb1', 'left_limb0'), attach=(0.9, 0.0), joint=(-0.9, 0.0)
            )
        )
      parts += limb + _far_chain(limb, float(rng.uniform(0.3, 1.0)), float(rng.uniform(0, 0.3)))
    try:
      return Category(
          novel_category_name(i),
          parts,
          _novel_keypoints(rng, parts),
          rotation=float(rng.uniform(10, 40)),
      )
    except ValueError:  # too few keypoints for the 10-30 rule: draw again
      continue
  raise RuntimeError(f'novel category {i}: no valid draw')  # not reached for the fixed seed


def keypoint_names(name_or_id) -> Tuple[str, ...]:
  """The category's keypoint names; index = the records' `kps_ids`."""
  return category(name_or_id).keypoint_names


def flip_permutation(name_or_id) -> np.ndarray:
  """[K] int: keypoint `k` of an image is keypoint `perm[k]` of its mirror image.

  A one-sided flip augmentation relabels the flipped image's keypoint ids through it (left eye
  <-> right eye, near leg <-> far leg, petal i <-> petal n - i); flipping both images of a pair
  keeps the pair's slot-to-slot labels. `perm[perm] == identity`.
  """
  return category(name_or_id).kp_perm.copy()


# ------------------------------------------------------------------------------------------------
# Instances: geometry.


def _rot(deg: float) -> np.ndarray:
  t = np.deg2rad(deg)
  c, s = np.cos(t), np.sin(t)
  return np.array([[c, -s], [s, c]])


def _half_width(u, taper):
  return 1.0 - taper * (u + 1.0) / 2.0


def _radius(u, v, exponent, taper):
  """Superellipse 'radius' of local points; <= 1 inside the part."""
  w = _half_width(np.clip(u, -1.0, 1.0), taper)
  return (np.abs(u) ** exponent + np.abs(v / w) ** exponent) ** (1.0 / exponent)


def _outline(exponent: float, taper: float, n: int = 32) -> np.ndarray:
  """[n, 2] local (u, v) points on the part's boundary."""
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  c, s = np.cos(t), np.sin(t)
  u = np.sign(c) * np.abs(c) ** (2.0 / exponent)
  v = np.sign(s) * np.abs(s) ** (2.0 / exponent) * _half_width(u, taper)
  return np.stack([u, v], -1)


@dataclasses.dataclass
class Instance:
  """One posed instance of a category in an image.

  Attributes:
    category: category id.
    flip: mirrored (parts relabelled by the category's flip tables).
    mat: [P, 2, 2], off: [P, 2]: part g's local (u, v) -> image (x, y) pixels,
      `x = mat[g] @ (u, v) + off[g]` (geometry index g; see `labels`).
    scale: image pixels per object unit; rotation: degrees.
    obj_to_img: [2, 3] the global affine object units -> pixels (flip included).
    half_px: [P, 2] the parts' half-length and half-width in pixels.
  """

  category: int
  flip: bool
  mat: np.ndarray
  off: np.ndarray
  scale: float
  rotation: float
  obj_to_img: np.ndarray
  half_px: np.ndarray

  def geometry_of(self, part, v):
    """Canonical (part, v) -> (geometry index, local v) in this instance; arrays broadcast."""
    cat = category(self.category)
    part = np.asarray(part)
    if not self.flip:
      return part, v
    return cat.part_perm[part], v * cat.part_sign[part]

  def label_of(self, geometry, v):
    """Geometry index and local v -> canonical (part, v); the inverse of `geometry_of`."""
    return self.geometry_of(geometry, v)  # an involution with equal signs on partners

  def to_image(self, part, uv) -> np.ndarray:
    """Canonical (part [..] int, uv [.., 2]) -> [.., 2] image (x, y) pixels."""
    uv = np.asarray(uv, np.float64)
    g, v = self.geometry_of(part, uv[..., 1])
    local = np.stack([uv[..., 0], v], -1)
    return np.einsum('...ij,...j->...i', self.mat[g], local) + self.off[g]


def sample_instance(cat_id: int, rng: np.random.Generator, size: int) -> Instance:
  """A random instance of category `cat_id` posed in a `size` x `size` image."""
  cat = category(cat_id)
  n = len(cat.parts)
  centre = np.zeros((n, 2))
  theta = np.zeros(n)
  mirror = np.ones(n)
  half = np.zeros((n, 2))
  obj_mat = np.zeros((n, 2, 2))
  length = np.exp(rng.normal(0, 0.12, n))
  width = np.exp(rng.normal(0, 0.12, n))
  swing = rng.uniform(-1, 1, n)
  slide = rng.uniform(-1, 1, n)
  for i, p in enumerate(cat.parts):
    half[i] = p.length * length[i], p.width * width[i]
    art = p.angle + p.swing * swing[i]
    j = cat.parent[i]
    if j < 0:
      theta[i], mirror[i], anchor = art, (-1.0 if p.mirror else 1.0), np.zeros(2)
    else:
      a = np.array([p.attach[0] + p.slide * slide[i], p.attach[1]])
      anchor = obj_mat[j] @ a + centre[j]
      theta[i] = theta[j] + mirror[j] * art
      mirror[i] = mirror[j] * (-1.0 if p.mirror else 1.0)
    obj_mat[i] = _rot(theta[i]) @ np.diag([half[i, 0], mirror[i] * half[i, 1]])
    centre[i] = anchor - obj_mat[i] @ np.asarray(p.joint, np.float64)
  flip = bool(rng.random() < FLIP_P)
  rotation = float(rng.uniform(-cat.rotation, cat.rotation))
  glob = _rot(rotation) @ np.diag([-1.0 if flip else 1.0, 1.0])
  pts = (
      np.concatenate(
          [
              np.einsum('ij,nj->ni', obj_mat[i], _outline(p.exponent, p.taper)) + centre[i]
              for i, p in enumerate(cat.parts)
          ]
      )
      @ glob.T
  )
  lo, hi = pts.min(0), pts.max(0)
  scale = rng.uniform(0.45, 0.9) * size / float((hi - lo).max())
  target = rng.uniform(0.25, 0.75, 2) * (size - 1)
  shift = target - scale * (lo + hi) / 2
  lin = scale * glob
  mat = np.einsum('ij,njk->nik', lin, obj_mat)
  off = centre @ lin.T + shift
  return Instance(
      category=cat_id,
      flip=flip,
      mat=mat,
      off=off,
      scale=float(scale),
      rotation=rotation,
      obj_to_img=np.concatenate([lin, shift[:, None]], 1),
      half_px=half * scale,
  )


def _footprint(mat, off, exponent, taper, size):
  """Pixels of a superellipse placed by `x = mat @ (u, v) + off`.

  Returns:
    (ys, xs, uv, r) of the pixels inside it ([m] int, [m] int, [m, 2] local coordinates, [m]
    radius), or None when it misses the image.
  """
  pts = _outline(exponent, taper, 24) @ mat.T + off
  # The outline polygon of a convex-ish shape; pad by a pixel for the sampled boundary.
  x0, y0 = np.maximum(np.floor(pts.min(0)) - 1, 0).astype(int)
  x1, y1 = np.minimum(np.ceil(pts.max(0)) + 1, size - 1).astype(int)
  if x0 > x1 or y0 > y1:
    return None
  ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  rel = np.stack([xs - off[0], ys - off[1]], -1)
  uv = rel @ np.linalg.inv(mat).T
  r = _radius(uv[:, 0], uv[:, 1], exponent, taper)
  inside = (r <= 1.0) & (np.abs(uv[:, 0]) <= 1.0)
  if not inside.any():
    return None
  return ys[inside], xs[inside], uv[inside], r[inside]


def render_geometry(inst: Instance, size: int):
  """Which part is drawn where (z order: occlusion between parts).

  Returns:
    geo: [size, size] int16, the geometry index drawn at each pixel, -1 background.
    uv: [size, size, 2] float64, that part's local (u, v) there (0 on background).
    rad: [size, size] float64, its superellipse radius there.
  """
  cat = category(inst.category)
  geo = np.full((size, size), -1, np.int16)
  uv = np.zeros((size, size, 2))
  rad = np.zeros((size, size))
  order = np.argsort([p.z for p in cat.parts], kind='stable')
  for g in order:
    p = cat.parts[g]
    fp = _footprint(inst.mat[g], inst.off[g], p.exponent, p.taper, size)
    if fp is None:
      continue
    ys, xs, loc, r = fp
    geo[ys, xs] = g
    uv[ys, xs] = loc
    rad[ys, xs] = r
  return geo, uv, rad


def canonical_maps(inst: Instance, geo: np.ndarray, uv: np.ndarray):
  """Geometry maps -> canonical maps: `part` [S, S] int16 (-1 unlabelled) and `uv` [S, S, 2]."""
  part = geo.copy()
  obj = geo >= 0
  cuv = uv.copy()
  p, v = inst.label_of(geo[obj], uv[obj][:, 1])
  part[obj] = p
  cuv[obj, 1] = v
  cuv[~obj] = 0
  return part, cuv


def truncated(inst: Instance, size: int) -> bool:
  """Whether part of the object lies outside the image (beyond half a pixel)."""
  cat = category(inst.category)
  for g, p in enumerate(cat.parts):
    pts = _outline(p.exponent, p.taper, 24) @ inst.mat[g].T + inst.off[g]
    if (pts < -0.5).any() or (pts > size - 0.5).any():
      return True
  return False


def keypoint_visibility(inst: Instance, geo: np.ndarray):
  """The category's keypoints in this image.

  Returns:
    xy: [K, 2] float64 image (x, y) pixels; inside: [K] bool, within the image;
    visible: [K] bool, inside and the nearest pixel shows the keypoint's part.
  """
  cat = category(inst.category)
  size = geo.shape[0]
  xy = inst.to_image(cat.kp_part, cat.kp_uv)
  ix = np.floor(xy + 0.5).astype(int)
  inside = ((ix >= 0) & (ix < size)).all(1)
  g, _ = inst.geometry_of(cat.kp_part, np.zeros(len(cat.kp_part)))
  visible = inside.copy()
  visible[inside] = geo[ix[inside, 1], ix[inside, 0]] == g[inside]
  return xy, inside, visible


def dense_correspondence(
    src: Instance, src_geo: np.ndarray, trg: Instance, trg_part: np.ndarray, trg_uv: np.ndarray
):
  """Exact dense ground truth of a pair (see the module docstring).

  Args:
    src: the source instance; src_geo: its `render_geometry` map (occluders applied).
    trg: the target instance; trg_part, trg_uv: its canonical maps.

  Returns:
    flow: [S, S, 2] float32, target pixel -> its source match, (x, y) pixels (0 where the target
      pixel is unlabelled); valid: [S, S] bool, the match is visible in the source.
  """
  del trg  # the target's canonical maps say all that is needed of it
  size = trg_part.shape[0]
  obj = trg_part >= 0
  ys, xs = np.nonzero(obj)
  match = src.to_image(trg_part[obj].astype(int), trg_uv[obj])
  flow = np.zeros((size, size, 2), np.float32)
  flow[ys, xs] = match - np.stack([xs, ys], -1)
  ix = np.floor(match + 0.5).astype(int)
  inside = ((ix >= 0) & (ix < size)).all(1)
  g, _ = src.geometry_of(trg_part[obj].astype(int), np.zeros(len(ys)))
  ok = inside.copy()
  ok[inside] = src_geo[ix[inside, 1], ix[inside, 0]] == g[inside]
  valid = np.zeros((size, size), bool)
  valid[ys, xs] = ok
  return flow, valid


# ------------------------------------------------------------------------------------------------
# Appearance.


@functools.lru_cache(maxsize=None)
def texture_photo(name: str, max_side: int = 320) -> np.ndarray:
  """[h, w, 3] float32 in [0, 1]: a `skimage.data` photograph, shrunk to `max_side`."""
  img = synthetic.load_photo(name)
  shrink = max_side / max(img.shape[:2])
  if shrink < 1:
    img = np.asarray(
        Image.fromarray(img).resize(
            (round(img.shape[1] * shrink), round(img.shape[0] * shrink)), Image.BILINEAR
        )
    )
  return img.astype(np.float32) / 255.0


def _reflect(c, n):
  period = 2 * (n - 1)
  c = np.mod(c, period)
  return np.where(c > n - 1, period - c, c)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Samples [h, w, 3] at (x, y) [m] with mirrored borders -> [m, 3]."""
  h, w = img.shape[:2]
  x = _reflect(x, w)
  y = _reflect(y, h)
  x0 = np.minimum(np.floor(x).astype(int), w - 2)
  y0 = np.minimum(np.floor(y).astype(int), h - 2)
  fx = (x - x0)[:, None]
  fy = (y - y0)[:, None]
  top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
  bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


_PATTERNS = ('stripes', 'checker', 'dots', 'waves')


def sample_material(rng: np.random.Generator, photos: Sequence[str]) -> dict:
  """A random material: a photograph crop in random colours, or a procedural pattern."""
  colours = rng.uniform(0.05, 0.95, (2, 3))
  ang = rng.uniform(0, 360)
  if rng.random() < 0.6:
    name = photos[int(rng.integers(len(photos)))]
    img = texture_photo(name)
    return dict(
        kind='photo',
        photo=name,
        origin=rng.uniform(0, 1, 2) * img.shape[1::-1],
        mat=_rot(ang) * rng.uniform(25, 90),
        tint=rng.uniform(0.5, 1.4, 3),
        gray=bool(rng.random() < 0.3),
    )
  return _pattern(rng, colours, ang)


def _pattern(rng: np.random.Generator, colours: np.ndarray, ang: float) -> dict:
  """A procedural pattern material (stripes, checks, dots or waves) of two colours."""
  return dict(
      kind=_PATTERNS[int(rng.integers(len(_PATTERNS)))],
      colours=colours,
      mat=_rot(ang) * rng.uniform(1.5, 5.0),
      phase=rng.uniform(0, 1, 3),
      dirs=np.stack([_rot(rng.uniform(0, 360))[:, 0] for _ in range(3)]),
  )


# Appearance models of the parts (`render(..., appearance=)`): 'random', every part of every
# instance draws an arbitrary material (shape is the only cue: the first benchmark); 'category',
# each part of a category has a typical material that instances vary (`CATEGORY_MATERIAL_P`).
APPEARANCES = ('random', 'category')
CATEGORY_MATERIAL_P = 0.75  # A part shows its category's material (varied), else a random one.
_APPEARANCE_SEED = 20221024


@functools.lru_cache(maxsize=None)
def category_materials(cat_id: int) -> Tuple[dict, ...]:
  """The typical material of each part of a category (`appearance='category'`), drawn from the
  category id alone: a procedural pattern in two colours (no photograph, so the same in every
  split); left/right partners share one, as a face's eyes or a car's wheels do."""
  cat = category(cat_id)
  rng = np.random.default_rng([_APPEARANCE_SEED, int(cat_id)])
  out = []
  for p in range(len(cat.parts)):
    partner = int(cat.part_perm[p])
    out.append(
        out[partner]
        if partner < p
        else _pattern(rng, rng.uniform(0.05, 0.95, (2, 3)), rng.uniform(0, 360))
    )
  return tuple(out)


def _vary(rng: np.random.Generator, base: dict) -> dict:
  """An instance's version of a typical material: colours within about 20%, the pattern's
  scale within 18% and its angle within about 15 degrees, a new phase."""
  colours = np.clip(
      base['colours'] * rng.uniform(0.8, 1.2, (2, 3)) + rng.normal(0, 0.04, (2, 3)), 0, 1
  )
  mat = _rot(rng.normal(0, 15)) @ base['mat'] * rng.uniform(0.85, 1.18)
  return dict(base, colours=colours, mat=mat, phase=rng.uniform(0, 1, 3))


def shade(material: dict, q: np.ndarray) -> np.ndarray:
  """Colour of a material at texture coordinates q [m, 2] (object units) -> [m, 3] in [0, 1]."""
  t = q @ material['mat'].T
  if material['kind'] == 'photo':
    img = texture_photo(material['photo'])
    rgb = _bilinear(img, t[:, 0] + material['origin'][0], t[:, 1] + material['origin'][1])
    if material['gray']:
      rgb = np.repeat(rgb.mean(1, keepdims=True), 3, 1)
    return np.clip(rgb * material['tint'], 0, 1)
  kind = material['kind']
  ph = material['phase']
  if kind == 'stripes':
    a = 0.5 + 0.5 * np.sin(2 * np.pi * (t[:, 0] + ph[0]))
  elif kind == 'checker':
    a = (np.floor(t[:, 0] + ph[0]) + np.floor(t[:, 1] + ph[1])) % 2
  elif kind == 'dots':
    f = np.mod(t + ph[:2], 1.0) - 0.5
    a = (np.hypot(f[:, 0], f[:, 1]) < 0.3).astype(np.float64)
  else:  # waves: three plane waves, a smooth random field
    a = 0.5 + np.sin(2 * np.pi * (t @ material['dirs'].T + ph)).sum(1) / 6
  c0, c1 = material['colours']
  return c0 * (1 - a[:, None]) + c1 * a[:, None]


def _background(rng: np.random.Generator, photos: Sequence[str], size: int) -> np.ndarray:
  """[size, size, 3] float64 in [0, 1]: a photograph crop with random textured shapes."""
  img = texture_photo(photos[int(rng.integers(len(photos)))])
  h, w = img.shape[:2]
  side = int(rng.uniform(0.3, 1.0) * min(h, w))
  y0 = int(rng.integers(0, h - side + 1))
  x0 = int(rng.integers(0, w - side + 1))
  crop = (img[y0 : y0 + side, x0 : x0 + side] * 255).astype(np.uint8)
  bg = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), np.float64) / 255
  for _ in range(int(rng.integers(2, 6))):
    _paint_blob(rng, bg, photos, size, centre=rng.uniform(0, size, 2))
  return bg


def _paint_blob(rng, img, photos, size, centre, geo=None):
  """Paints a random textured superellipse at `centre` (marks `geo` -2 under it)."""
  half = rng.uniform(0.06, 0.22, 2) * size
  mat = _rot(rng.uniform(0, 360)) @ np.diag(half)
  exponent = float(rng.choice([2.0, 4.0, 8.0]))
  taper = float(rng.uniform(-0.5, 0.8))
  fp = _footprint(mat, centre, exponent, taper, size)
  material = sample_material(rng, photos)
  if fp is None:
    return
  ys, xs, _, _ = fp
  img[ys, xs] = shade(material, np.stack([xs, ys], -1) / 30.0)
  if geo is not None:
    geo[ys, xs] = -2


def render(
    inst: Instance,
    rng: np.random.Generator,
    photos: Sequence[str],
    size: int,
    appearance: str = 'random',
):
  """Draws an instance over a cluttered background, with an occluder with p=`OCCLUDER_P`.

  Args:
    inst: the instance.
    rng: appearance stream.
    photos: `skimage.data` names the textures and background may use.
    size: image side S.
    appearance: 'random' (each part one of the instance's three random materials) or
      'category' (with p=`CATEGORY_MATERIAL_P` a part shows its category's typical material,
      varied per instance, else one of the three; `category_materials`).

  Returns:
    img: [S, S, 3] uint8; geo: [S, S] int16 geometry index (-1 background, -2 occluder);
    uv: [S, S, 2] local coordinates of the drawn part; occluded: whether an occluder hides part
    of the object; object_box: [4] xyxy extent of the object's pixels before occlusion.
  """
  cat = category(inst.category)
  img = _background(rng, photos, size)
  geo, uv, rad = render_geometry(inst, size)
  obj = geo >= 0
  materials = [sample_material(rng, photos) for _ in range(3)]
  own = rng.integers(0, 3, len(cat.parts))
  part_material = np.where(rng.random(len(cat.parts)) < 0.5, 0, own)
  if appearance == 'category':  # geometry g is drawn as canonical part label[g]
    label, _ = inst.label_of(np.arange(len(cat.parts)), np.zeros(len(cat.parts)))
    typical = category_materials(inst.category)
    for g in np.nonzero(rng.random(len(cat.parts)) < CATEGORY_MATERIAL_P)[0]:
      part_material[g] = len(materials)
      materials.append(_vary(rng, typical[label[g]]))
  elif appearance != 'random':
    raise ValueError(f'appearance must be one of {APPEARANCES}, got {appearance!r}')
  lin = inst.obj_to_img[:, :2]
  ys, xs = np.nonzero(obj)
  q = (np.stack([xs, ys], -1) - inst.obj_to_img[:, 2]) @ np.linalg.inv(lin).T
  dark = rng.uniform(0.2, 0.6)
  g_all = geo[ys, xs]
  for g in np.unique(g_all):
    sel = g_all == g
    rgb = shade(materials[part_material[g]], q[sel])
    r = rad[ys[sel], xs[sel]]
    edge = 1.0 - 1.3 / max(float(inst.half_px[g].min()), 1.3)
    light = np.where(r > edge, dark, 1.0 - 0.3 * r**4)
    img[ys[sel], xs[sel]] = rgb * light[:, None]
  if len(ys):
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
  else:
    box = np.array([0, 0, size - 1, size - 1], np.float32)
  occluded = False
  if len(ys) and rng.random() < OCCLUDER_P:
    k = int(rng.integers(len(ys)))
    before = (geo >= 0).sum()
    _paint_blob(rng, img, photos, size, centre=np.array([xs[k], ys[k]], np.float64), geo=geo)
    occluded = bool((geo >= 0).sum() < before)
  gain = rng.uniform(0.85, 1.15, 3)
  gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
  img = 255.0 * (np.clip(img, 0, 1) ** gamma) * gain + rng.uniform(-15, 15)
  img = img + rng.normal(0, 3.0, img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), geo, uv, occluded, box


# ------------------------------------------------------------------------------------------------
# Pairs.


def _difficulty(src: Instance, trg: Instance, src_flags, trg_flags) -> Dict[str, np.int32]:
  """SPair-71k-style difficulty levels of a pair (`evaluation.DIFFICULTY_LEVELS`).

  viewpoint: 0 easy .. 2 hard = (the instances' flips differ) + (rotations differ by >= 25
  degrees), at most 2; scale: object scale ratio < 1.25 easy, < 1.6 medium, else hard;
  truncation / occlusion: 0 none, 1 source, 2 target, 3 both.
  """
  drot = abs((src.rotation - trg.rotation + 180) % 360 - 180)
  view = min(2, int(src.flip != trg.flip) + int(drot >= 25))
  ratio = max(src.scale, trg.scale) / min(src.scale, trg.scale)
  scale = 0 if ratio < 1.25 else (1 if ratio < 1.6 else 2)
  return dict(
      viewpoint_variation=np.int32(view),
      scale_variation=np.int32(scale),
      truncation=np.int32(int(src_flags[0]) + 2 * int(trg_flags[0])),
      occlusion=np.int32(int(src_flags[1]) + 2 * int(trg_flags[1])),
  )


def _image(cat_id, rng, photos, size, appearance):
  inst = sample_instance(cat_id, rng, size)
  img, geo, uv, occluder, box = render(inst, rng, photos, size, appearance)
  part, cuv = canonical_maps(inst, geo, uv)
  xy, inside, visible = keypoint_visibility(inst, geo)
  # Occluded: an occluder covers the object, or a fifth of the keypoints in view are hidden.
  hidden = (inside & ~visible).sum() / max(int(inside.sum()), 1)
  flags = (truncated(inst, size), occluder or hidden >= 0.2)
  return dict(
      inst=inst, img=img, geo=geo, part=part, uv=cuv, kps=xy, visible=visible, box=box, flags=flags
  )


def make_pair(
    cat_id: int,
    rng: np.random.Generator,
    size: int,
    photos: Sequence[str],
    min_kps: int = 4,
    max_tries: int = 20,
    name: str = 'pair',
    appearance: str = 'random',
) -> dict:
  """A pair of two instances of category `cat_id` with its labels and dense ground truth.

  Args:
    cat_id: a category id (`category`: 0-5 the benchmark's, `NOVEL_BASE + i` novel ones).
    rng: the pair's random stream (deterministic given its seed).
    size: image side S, pixels.
    photos: `skimage.data` names for textures and backgrounds (the split's).
    min_kps: redraw the pair until at least this many keypoints are visible in both images.
    max_tries: give up after this many draws.
    name: the record's name, for the error.
    appearance: the parts' appearance model, 'random' or 'category' (`render`).

  Returns:
    Record fields: `src_img`, `trg_img` [S, S, 3] uint8; `src_kps`, `trg_kps` [40, 2] float32
    (pixels; target keypoints on integer pixel centres); `kps_valid` [40] bool (a prefix);
    `kps_ids` [40] int32 (keypoint index in the category, -1 padding); `src_bbox`, `trg_bbox`
    [4] float32 (extent of each object's pixels); `dense_flow` [S, S, 2] float32;
    `dense_valid` [S, S] bool; the four difficulty levels; and, for tests and visualisation,
    `src`, `trg`: dicts with the `Instance` (`inst`) and canonical maps (`part`, `uv`).

  Raises:
    records.BadRecordError: no draw had `min_kps` common keypoints.
  """
  for _ in range(max_tries):
    src = _image(cat_id, rng, photos, size, appearance)
    trg = _image(cat_id, rng, photos, size, appearance)
    flow, valid = dense_correspondence(src['inst'], src['geo'], trg['inst'], trg['part'], trg['uv'])
    pix = np.floor(trg['kps'] + 0.5).astype(int)
    both = trg['visible'] & src['visible']
    pix_c = np.clip(pix, 0, size - 1)
    both &= valid[pix_c[:, 1], pix_c[:, 0]]
    both &= trg['part'][pix_c[:, 1], pix_c[:, 0]] == category(cat_id).kp_part
    ids = np.nonzero(both)[0]
    if len(ids) >= min_kps:
      break
  else:
    raise records.BadRecordError(
        name, f'no draw of {max_tries} had {min_kps} keypoints ' 'visible in both images'
    )
  n = len(ids)
  trg_kps = pix[ids].astype(np.float32)
  src_kps = trg_kps + flow[pix[ids, 1], pix[ids, 0]]

  def pad(a):
    return np.concatenate([a, np.zeros((records.MAX_KPS - n, 2), np.float32)])

  kps_ids = np.full(records.MAX_KPS, -1, np.int32)
  kps_ids[:n] = ids
  out = dict(
      src_img=src['img'],
      trg_img=trg['img'],
      src_kps=pad(src_kps),
      trg_kps=pad(trg_kps),
      kps_valid=np.arange(records.MAX_KPS) < n,
      kps_ids=kps_ids,
      src_bbox=src['box'],
      trg_bbox=trg['box'],
      dense_flow=flow,
      dense_valid=valid,
      src=src,
      trg=trg,
  )
  out.update(_difficulty(src['inst'], trg['inst'], src['flags'], trg['flags']))
  return out
