"""Training data, one module per concern.

- ``pairs``: finding image/target pairs by name, and their captions.
- ``targets``: reading targets of every task; the errors of unusable data.
- ``transforms``: resizing, flipping and encoding targets (the crop policy, depth clamping).
- ``dataset``: checking every pair once, the training and validation sets, batching.
- ``order``: the reproducible sample order over processes and steps.

The public names are imported here, so ``from training.data import ...`` keeps working.
"""

from .dataset import PairDataset, build_datasets, check_pairs, collate
from .order import PlanSampler, SamplePlan, mix_seed
from .pairs import Pair, find_pairs, read_captions
from .targets import (
                      ACCEPTED_KINDS,
                      ARRAY_EXTENSIONS,
                      TARGET_EXTENSIONS,
                      DataError,
                      TargetKindError,
                      read_normals,
                      read_target,
)
from .transforms import adapter_info, encode_raw_target, encode_target, fit, fit_target, flip_target

__all__ = ["ACCEPTED_KINDS", "ARRAY_EXTENSIONS", "TARGET_EXTENSIONS", "DataError", "Pair", "PairDataset",
           "PlanSampler", "SamplePlan", "TargetKindError", "adapter_info", "build_datasets", "check_pairs", "collate",
           "encode_raw_target", "encode_target", "find_pairs", "fit", "fit_target", "flip_target", "mix_seed",
           "read_captions", "read_normals", "read_target"]
