"""Builds a model from a config block (`config.model`)."""

from typing import Any, Mapping

from ensembling.models.cnn import CNN
from ensembling.models.mlp import MLP, PartitionedMLP
from ensembling.models.resnet import ResNet

MODELS = {"mlp": MLP, "partitioned_mlp": PartitionedMLP, "cnn": CNN, "resnet": ResNet}


def make_model(model_config: Mapping[str, Any], *, num_classes: int):
  """`model_config` holds `name` plus the module's attributes (e.g. widths, dropout)."""
  cfg = dict(model_config)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(MODELS)}.")
  cls = MODELS[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; it takes {sorted(fields)}.")
  for k, v in cfg.items():
    if isinstance(v, list):
      cfg[k] = tuple(v)
  return cls(num_classes=num_classes, **cfg)
