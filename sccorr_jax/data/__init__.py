"""Data: TFDS builders of SPair-71k, PF-PASCAL, PF-WILLOW and two embedded datasets (`parts`,
procedural articulated objects with dense ground truth; `synthetic`, warps of photographs), read
through grain pipelines that apply the reference's preprocessing and the training label budget.

Public API (see `docs/data.md`):

    default_data_config(name)            ConfigDict of every data option (`config_lib`'s)
    resolve(cfg) -> ResolvedData         the data section resolved once (builder, splits,
                                         options, feature caches); the functions below take
                                         it or the config
    create_train_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1)
    create_eval_iterator(cfg, split, *, batch_size, process_index=0, process_count=1)
    num_examples(cfg, split), category_names(cfg), data_source(cfg, split), get_builder(cfg)
"""

from sccorr_jax.config_lib import default_data_config
from sccorr_jax.data.pipeline import category_names
from sccorr_jax.data.pipeline import check_cached_features
from sccorr_jax.data.pipeline import create_eval_iterator
from sccorr_jax.data.pipeline import create_train_iterator
from sccorr_jax.data.pipeline import data_source
from sccorr_jax.data.pipeline import DATASETS
from sccorr_jax.data.pipeline import DENSE_TRUTH_DATASETS
from sccorr_jax.data.pipeline import get_builder
from sccorr_jax.data.pipeline import has_dense_truth
from sccorr_jax.data.pipeline import num_examples
from sccorr_jax.data.pipeline import resolve
from sccorr_jax.data.pipeline import ResolvedData
from sccorr_jax.data.records import BadRecordError
from sccorr_jax.data.records import BadRecordPolicy
from sccorr_jax.data.records import MAX_KPS
from sccorr_jax.data.records import PreparationError
from sccorr_jax.data.transforms import keypoints_to_flow_np
from sccorr_jax.data.transforms import preprocess_pair
from sccorr_jax.data.transforms import PreprocessOptions
