"""Evaluation of semantic correspondence by PCK (SCorrSAN, Huang et al., ECCV 2022, Sec. 4).

* `pck`: the pure metric math: keypoint transfer with a flow and PCK (the reference's
  `flow2kps`, `classify_prd`; `pck.npz`).
* `protocol`: what is measured (`Protocol`, `Protocol.from_config`), tagged onto every number.
* `evaluator`: a model over a split, jitted and data-parallel, into sums and counts per group
  (`evaluate_model`, `evaluate_models` for stacked mutual teachers, `evaluate_checkpoint`), with
  the zero-flow reference as an option.
* `reports`: the results (`EvalResult`) and their JSON records and readable table.
* `validation`: the trainer's validation of every trained model (`Validator`), as flat scalars.
"""

from sccorr_jax.evaluation.evaluator import evaluate_checkpoint
from sccorr_jax.evaluation.evaluator import evaluate_model
from sccorr_jax.evaluation.evaluator import evaluate_models
from sccorr_jax.evaluation.evaluator import make_eval_step
from sccorr_jax.evaluation.evaluator import pair_counts
from sccorr_jax.evaluation.evaluator import PckAccumulator
from sccorr_jax.evaluation.pck import pck
from sccorr_jax.evaluation.pck import pck_correct
from sccorr_jax.evaluation.pck import transfer_keypoints
from sccorr_jax.evaluation.pck import upsample_flow
from sccorr_jax.evaluation.protocol import AVERAGINGS
from sccorr_jax.evaluation.protocol import BENCHMARK_NAMES
from sccorr_jax.evaluation.protocol import default_thresholds
from sccorr_jax.evaluation.protocol import DEFAULT_ALPHAS
from sccorr_jax.evaluation.protocol import DIFFICULTY_FIELDS
from sccorr_jax.evaluation.protocol import DIFFICULTY_LEVELS
from sccorr_jax.evaluation.protocol import DIRECTION
from sccorr_jax.evaluation.protocol import metric_key
from sccorr_jax.evaluation.protocol import metric_name
from sccorr_jax.evaluation.protocol import Protocol
from sccorr_jax.evaluation.protocol import STANDARD_THRESHOLD
from sccorr_jax.evaluation.protocol import THRESHOLD_KINDS
from sccorr_jax.evaluation.reports import EvalResult
from sccorr_jax.evaluation.validation import validation_metrics
from sccorr_jax.evaluation.validation import Validator
