"""Constants shared by the data pipeline, the model's users and the evaluator (one home each)."""

from __future__ import annotations

# ImageNet normalisation of RGB images in [0, 1] (the pretrained backbones' statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The benchmark's standard PCK threshold kind (see `sccorr_jax.evaluation.protocol`).
STANDARD_THRESHOLD = {"spair71k": "bbox", "pfpascal": "img", "pfwillow": "bbox",
                      "synthetic": "bbox", "parts": "bbox"}
BENCHMARK_NAMES = {"spair71k": "SPair-71k", "pfpascal": "PF-PASCAL", "pfwillow": "PF-WILLOW",
                   "synthetic": "synthetic (skimage.data warps)",
                   "parts": "parts (procedural articulated objects)"}

# SPair-71k's difficulty annotations (0 for datasets without them), and their level names.
DIFFICULTY_FIELDS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
DIFFICULTY_LEVELS = {
    "viewpoint_variation": ("easy", "medium", "hard"),
    "scale_variation": ("easy", "medium", "hard"),
    "truncation": ("none", "src truncated", "trg truncated", "both truncated"),
    "occlusion": ("none", "src occluded", "trg occluded", "both occluded"),
}
