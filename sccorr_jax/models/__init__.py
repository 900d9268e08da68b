"""SCorrSAN network modules (NHWC)."""

from sccorr_jax.models.backbone import ResNet, resnet  # noqa: F401
from sccorr_jax.models.batchnorm import BatchNorm  # noqa: F401
from sccorr_jax.models.scorrsan import SCorrSAN  # noqa: F401
from sccorr_jax.models.build import build_model, init_variables, input_shape  # noqa: F401
