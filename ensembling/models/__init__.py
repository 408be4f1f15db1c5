"""Our Flax Linen models, and the contract that lets every primitive take yours.

Our models' `__call__(x, *, train)` returns `Output(features, logits)`. The member
primitives take any model through `as_model`: a Linen module (plain logits or `Output`,
with or without a `train`/`deterministic` argument), an NNX module or factory
(`from_nnx`), or a pair of pure functions (`from_functions`); see `models.contract`.
"""

from ensembling.models.common import Output, has_batch_stats
from ensembling.models.contract import Model, as_model, from_functions, from_nnx, linen
from ensembling.models.linear import apply_linear, init_linear
from ensembling.models.mlp import MLP, PartitionedMLP
from ensembling.models.cnn import CNN
from ensembling.models.resnet import ResNet
from ensembling.models.registry import make_model
from ensembling.models.arcface import ArcFaceHead, ArcFaceModel, make_arcface_model, with_arcface

__all__ = ["Output", "Model", "as_model", "from_functions", "from_nnx", "linen",
           "apply_linear", "init_linear", "MLP", "PartitionedMLP", "CNN", "ResNet",
           "make_model", "has_batch_stats", "ArcFaceHead", "ArcFaceModel", "make_arcface_model",
           "with_arcface"]
