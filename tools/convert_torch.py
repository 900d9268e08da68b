"""Converts a PyTorch state dict into an Orbax checkpoint that sccorr_jax loads.

  python tools/convert_torch.py --input=best_model.pth --config=configs/spair.py --output=DIR

`--input` is a full reference SCorrSAN checkpoint (`feature_extraction.backbone.*`, `SCEs.0.*`,
`x_normal`, `y_normal`) or torchvision ResNet ImageNet weights (`conv1.weight`, ...; the head is
then freshly initialised), as `.pth` (needs PyTorch), `.npz` or `.safetensors`. The model is built
from the config's `model` section, so the SCE kernel/width must match the checkpoint (SPair-71k:
7/2048, PF-PASCAL: 13/1024): a mismatch is reported key by key.
"""

from __future__ import annotations

import os
import sys


from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sccorr_jax import checkpoint, convert, models

_INPUT = flags.DEFINE_string("input", None, "state dict: .pth, .npz or .safetensors", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "output checkpoint directory", required=True)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/spair.py",
                                          "config whose `model` section describes the network")


def main(argv):
  del argv
  config = _CONFIG.value
  model = models.build_model(config)
  try:
    sd = convert.read_state_dict(_INPUT.value)
    variables = convert.from_torch_state_dict(sd, model)
    checkpoint.save_model_variables(_OUTPUT.value, variables, config)
  except (FileNotFoundError, ImportError, ValueError) as e:  # ConversionError, CheckpointError
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  n = sum(v.size for v in __import__("jax").tree.leaves(variables))
  print(f"wrote {_OUTPUT.value}: {n:,} values from {_INPUT.value}")


if __name__ == "__main__":
  app.run(main)
