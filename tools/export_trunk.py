"""Writes a trained model's ResNet backbone as a torchvision-named state dict (`.safetensors`).

  python tools/export_trunk.py --checkpoint=runs/pretrain --out=weights/parts_trunk.safetensors

The file holds the backbone's parameters and BatchNorm running statistics under torchvision's
names (`conv1.weight`, `layer1.0.bn1.running_mean`, ...), the format of converted ImageNet
ResNet weights: a config loads it with `--config.model.pretrained=FILE`, through the one loader
of pretrained backbones (`models.build.init_variables` -> `convert.from_torch_state_dict`), and
each network starts its head fresh. By default the last step of a workdir is exported
(`--step` picks another; a pretraining run is not selected on any benchmark split). The SHA-256
of the written file is printed.
"""

from __future__ import annotations

import hashlib
import pathlib

from absl import flags
import numpy as np

from sccorr_jax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "trainer workdir or checkpoint step " "directory", required=True
)
_OUT = flags.DEFINE_string("out", None, "output .safetensors file", required=True)
_STEP = flags.DEFINE_integer(
    "step", None, "with a workdir: the step to export (default: the " "latest)"
)
_MODEL_INDEX = flags.DEFINE_integer(
    "model_index", None, "mutual-teacher checkpoints: 0 or 1 " "(default: the recorded best)"
)


def sha256(path) -> str:
  """Hex SHA-256 of a file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top  # after flag parsing: `--help` stays fast
  from safetensors.numpy import save_file
  from sccorr_jax import checkpoint, convert, models

  out = pathlib.Path(_OUT.value)
  if out.suffix != ".safetensors":
    cli.fail(f"--out={out}: must end in .safetensors")
  if out.is_dir():
    cli.fail(f"--out={out}: is a directory")
  path = pathlib.Path(_CHECKPOINT.value)
  step = _STEP.value
  if step is None:
    step = checkpoint.latest_step(path)  # None for a step directory: it is loaded itself
  try:
    variables, config = checkpoint.load_model_variables(path, _MODEL_INDEX.value, step=step)
    model = models.build_model(config)
    if getattr(model, "backbone_type", "resnet") != "resnet":
      raise ValueError(
          f"{path}: holds a {model.backbone_type} model; only ResNet backbones "
          "are exported as torchvision state dicts"
      )
    sd = convert.backbone_state_dict(__import__("jax").device_get(variables), model)
  except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
    cli.fail(str(e), e)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(sd.items())}, str(tmp))
  tmp.replace(out)  # atomic: a crash never leaves a half-written file under the name
  n = sum(v.size for v in sd.values())
  print(
      f"wrote {out}: {len(sd)} arrays, {n:,} values from {path}"
      f"{'' if step is None else f' (step {step})'}; sha256 {sha256(out)}"
  )


if __name__ == "__main__":
  cli.run(main)
