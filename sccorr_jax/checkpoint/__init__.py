"""Checkpoints: the trainer's Orbax manager, model exports, their integrity, and loading a model.

`integrity` (names, checksums, the checks before reading), `manager` (the trainer's manager:
save, resume, the best step) and `loading` (exports, loading one model); the names below are
this package's API.

Trainer checkpoints live in `<workdir>/checkpoints/<step>/` with three Orbax items:

* `state`: the `train_step.TrainState` (parameters, BatchNorm statistics and optimiser state of
  every trained model, stacked [2, ...] for 'mt'; the fixed teacher's variables for 'st'; step;
  non-finite counters);
* `meta`: JSON with `step`, `epoch` (epochs completed), the validation metrics of the checkpoint,
  `best_model` (which mutual teacher won: 0 = a, 1 = b), and `config` (the resolved config as
  JSON);
* `data`: the grain training iterator's state (mid-epoch exact).

The manager keeps the two latest steps and the best one by `select_metric(config)`
(`val/pck@<eval.select_alpha>`, the metric that also picks the better mutual teacher), with
`AnyPreservationPolicy([LatestN(2), BestN(1)])`; `best_step()` is asked from it. Saves are
asynchronous if asked. Restores always go against an abstract target (`jax.ShapeDtypeStruct`
with the sharding wanted here), so a checkpoint written on a GPU or TPU slice loads on one CPU.

Integrity: every step and every export holds `checksums.json`, the size and CRC-32 of each of
its files, written into Orbax's temporary directory just before the atomic rename (so a crash
mid-save leaves no step at all, and async saves are sealed in their background thread). Reading
a checkpoint first checks it: every item present, its JSON files parseable, the tree metadata
non-empty, and every file as the manifest says. Checkpoints written before the manifest existed
get the structural checks and Orbax's own. Resuming (`restore`) takes the newest intact of the two
latest steps, logs one line naming each damaged step, file and problem, and moves the damaged
steps to `<workdir>/checkpoints_damaged/`; the best step is not a resume point. Loading a model
(`load_model_variables`, `load_model`) from a damaged checkpoint raises a one-line
`CheckpointError` naming the file and the problem. A checkpoint that does not fit a config is
reported with the config keys that differ, and as "another config" only when they do.

Model exports (`save_model_variables`) hold one model's `{'params', 'batch_stats'}` (item
`variables`) and the config (item `config`), written atomically. `load_model_variables` reads
an export, a trainer workdir (its best step) or one checkpoint step directory.
"""

from sccorr_jax.checkpoint.integrity import CHECKPOINT_DIR
from sccorr_jax.checkpoint.integrity import CheckpointError
from sccorr_jax.checkpoint.integrity import config_differences
from sccorr_jax.checkpoint.integrity import CONFIG
from sccorr_jax.checkpoint.integrity import DAMAGED_DIR
from sccorr_jax.checkpoint.integrity import DATA
from sccorr_jax.checkpoint.integrity import MANIFEST
from sccorr_jax.checkpoint.integrity import META
from sccorr_jax.checkpoint.integrity import PathLike
from sccorr_jax.checkpoint.integrity import STATE
from sccorr_jax.checkpoint.integrity import VARIABLES
from sccorr_jax.checkpoint.integrity import verify
from sccorr_jax.checkpoint.integrity import write_manifest
from sccorr_jax.checkpoint.loading import abstract_like
from sccorr_jax.checkpoint.loading import abstract_model_variables
from sccorr_jax.checkpoint.loading import check_variables
from sccorr_jax.checkpoint.loading import load_model
from sccorr_jax.checkpoint.loading import load_model_variables
from sccorr_jax.checkpoint.loading import ModelIndex
from sccorr_jax.checkpoint.loading import save_model_variables
from sccorr_jax.checkpoint.manager import best_checkpoint
from sccorr_jax.checkpoint.manager import KEEP_LATEST
from sccorr_jax.checkpoint.manager import latest_step
from sccorr_jax.checkpoint.manager import make_manager
from sccorr_jax.checkpoint.manager import restore
from sccorr_jax.checkpoint.manager import save
from sccorr_jax.checkpoint.manager import select_metric
