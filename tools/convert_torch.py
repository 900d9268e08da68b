"""Converts a PyTorch state dict into an Orbax checkpoint that sccorr_jax loads.

  python tools/convert_torch.py --input=best_model.pth --config=configs/spair.py --output=DIR

`--input` is a full reference SCorrSAN checkpoint (`feature_extraction.backbone.*`, `SCEs.0.*`,
`x_normal`, `y_normal`) or torchvision ResNet ImageNet weights (`conv1.weight`, ...; the head is
then freshly initialised), as `.pth` (needs PyTorch), `.npz` or `.safetensors`. The model is built
from the config's `model` section, so the SCE kernel/width must match the checkpoint (SPair-71k:
7/2048, PF-PASCAL: 13/1024): a mismatch is reported key by key.

DINOv2 (issue 12): an official torch-hub checkpoint (`dinov2_vitb14_pretrain.pth`, ...;
`docs/dinov2.md` says where to get them) is recognised by its keys, or forced with
`--kind=dinov2`:

  python tools/convert_torch.py --kind=dinov2 --input=dinov2_vitb14_pretrain.pth \
      --config=configs/spair_dinov2.py --output=DIR

With a DINOv2 config (`model.backbone='dinov2'`) the output is a SCorrSAN export: the backbone
from the checkpoint (its blocks after the last used one dropped), the head freshly initialised;
its preset must match the checkpoint (reported key by key). Training can also read the `.pth`
directly (`--config.model.pretrained=...`); converting first checks the file once and gives a
checkpoint that needs no PyTorch.
"""

from __future__ import annotations

import pathlib


from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sccorr_jax import checkpoint, cli, convert, models

_INPUT = flags.DEFINE_string("input", None, "state dict: .pth, .npz or .safetensors", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "output checkpoint directory", required=True)
# The default is the repository's configs/spair.py wherever the tool is run from.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "spair.py"),
    "config whose `model` section describes the network",
)
_KIND = flags.DEFINE_enum(
    "kind",
    "auto",
    ["auto", "scorrsan", "dinov2"],
    "checkpoint kind: auto (by its keys), scorrsan (reference SCorrSAN or "
    "torchvision ResNet), dinov2 (official DINOv2 torch-hub weights)",
)


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    sd = convert.read_state_dict(_INPUT.value)
    kind = _KIND.value
    if kind == "auto":
      kind = "dinov2" if convert.is_dinov2_state_dict(sd) else "scorrsan"
    dinov2_config = config.model.get("backbone", "resnet") == "dinov2"
    if (kind == "dinov2") != dinov2_config:
      raise ValueError(
          f"{_INPUT.value} is a {'DINOv2' if kind == 'dinov2' else 'SCorrSAN/ResNet'} checkpoint "
          f"but the config's model.backbone is {config.model.get('backbone', 'resnet')!r} (DINOv2 "
          "weights go with a DINOv2 config such as configs/spair_dinov2.py)"
      )
    variables = convert.from_torch_state_dict(sd, models.build_model(config))
    checkpoint.save_model_variables(_OUTPUT.value, variables, config)
  except (FileNotFoundError, ImportError, ValueError) as e:  # ConversionError, CheckpointError
    cli.fail(str(e), e)
  n = sum(v.size for v in __import__("jax").tree.leaves(variables))
  print(f"wrote {_OUTPUT.value}: {n:,} values from {_INPUT.value}")


if __name__ == "__main__":
  cli.run(main)
