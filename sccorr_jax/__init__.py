"""sccorr_jax: SCorrSAN (Huang et al., ECCV 2022) in JAX/Flax.

Semantic correspondence with sparse annotations: a ResNet feature, an efficient spatial context
encoder, a mutual-nearest-neighbour filtered 4D correlation, soft-argmax flow, and teacher-student
training (single offline teacher or two mutual online teachers).
"""

__version__ = "0.2.0"
