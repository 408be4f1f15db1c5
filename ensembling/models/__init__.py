"""Flax Linen models. Each `__call__(x, *, train)` returns `Output(features, logits)`."""

from ensembling.models.common import Output, has_batch_stats
from ensembling.models.mlp import MLP, PartitionedMLP
from ensembling.models.cnn import CNN
from ensembling.models.resnet import ResNet
from ensembling.models.registry import make_model
from ensembling.models.arcface import ArcFaceHead, ArcFaceModel, make_arcface_model, with_arcface

__all__ = ["Output", "MLP", "PartitionedMLP", "CNN", "ResNet", "make_model", "has_batch_stats",
           "ArcFaceHead", "ArcFaceModel", "make_arcface_model", "with_arcface"]
