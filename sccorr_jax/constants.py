"""Constants shared by the data pipeline, the model's users and the evaluator (one home each)."""

from __future__ import annotations

from typing import NamedTuple, Optional

# ImageNet normalisation of RGB images in [0, 1] (the pretrained backbones' statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The benchmark's standard PCK threshold kind (see `sccorr_jax.evaluation.protocol`).
STANDARD_THRESHOLD = {
    "spair71k": "bbox",
    "pfpascal": "img",
    "pfwillow": "bbox",
    "synthetic": "bbox",
    "parts": "bbox",
}
BENCHMARK_NAMES = {
    "spair71k": "SPair-71k",
    "pfpascal": "PF-PASCAL",
    "pfwillow": "PF-WILLOW",
    "synthetic": "synthetic (skimage.data warps)",
    "parts": "parts (procedural articulated objects)",
}

# SPair-71k's difficulty annotations (0 for datasets without them), and their level names.
DIFFICULTY_FIELDS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
DIFFICULTY_LEVELS = {
    "viewpoint_variation": ("easy", "medium", "hard"),
    "scale_variation": ("easy", "medium", "hard"),
    "truncation": ("none", "src truncated", "trg truncated", "both truncated"),
    "occlusion": ("none", "src occluded", "trg occluded", "both occluded"),
}

# The direction PCK is measured in: target keypoints moved to the source by the flow.
DIRECTION = "trg->src"

# The PCK threshold kinds and averagings (`sccorr_jax.evaluation.protocol` says what each is).
THRESHOLD_KINDS = ("bbox", "img", "bbox_legacy")
AVERAGINGS = ("per_pair", "per_keypoint")


def metric_key(
    alpha: float,
    threshold: Optional[str] = None,
    averaging: Optional[str] = None,
    img_size: Optional[int] = None,
    direction: Optional[str] = None,
    group: str = "all",
    scope: str = "",
) -> str:
  """The one key scheme of every PCK number, in training logs and evaluation reports alike:
  `[<scope>/]pck@<alpha>[/<threshold>][/<averaging>][/<img_size>px][/<direction>][/<group>]`.

  Evaluation reports name every part of their protocol (`pck@0.1/bbox/per_pair/256px/trg->src`,
  `.../category=cat`; `evaluation.metric_name`). Training logs leave out the parts their
  validation protocol fixes (the benchmark's standard threshold, per-pair averaging, the run's
  `data.img_size`, trg->src) and name what differs: `val/pck@0.1`, `val/pck@0.1/per_keypoint`,
  `val/a/pck@0.1` (mt network a), `val/zero_flow/pck@0.1` (the zero flow on the same pairs),
  `test/pck@0.1` (`--mode=eval`).
  """
  parts = (
      f"pck@{float(alpha):g}",
      threshold,
      averaging,
      f"{int(img_size)}px" if img_size else None,
      direction,
      None if group == "all" else group,
  )
  key = "/".join(p for p in parts if p)
  return f"{scope.rstrip('/')}/{key}" if scope else key


class MetricKey(NamedTuple):
  """The parts of a `metric_key` (its arguments, in order): `metric_key(*parts)` is the key."""

  alpha: float
  threshold: Optional[str] = None
  averaging: Optional[str] = None
  img_size: Optional[int] = None
  direction: Optional[str] = None
  group: str = "all"
  scope: str = ""


def parse_metric_key(key: str) -> Optional[MetricKey]:
  """The inverse of `metric_key`: `'val/a/pck@0.1/per_keypoint'` -> `MetricKey(0.1,
  averaging='per_keypoint', scope='val/a')`; None for a key that is not a PCK (`val/epoch`)."""
  parts = key.split("/")
  at = next((i for i, p in enumerate(parts) if p.startswith("pck@")), None)
  if at is None:
    return None
  try:
    alpha = float(parts[at][len("pck@") :])
  except ValueError:
    return None
  rest, found = parts[at + 1 :], {}
  for name, fits in (
      ("threshold", THRESHOLD_KINDS.__contains__),
      ("averaging", AVERAGINGS.__contains__),
      ("img_size", lambda p: p.endswith("px") and p[:-2].isdigit()),
      ("direction", lambda p: "->" in p),
  ):
    if rest and fits(rest[0]):
      found[name] = rest.pop(0)
  if "img_size" in found:
    found["img_size"] = int(found["img_size"][:-2])
  return MetricKey(alpha, **found, group="/".join(rest) or "all", scope="/".join(parts[:at]))
