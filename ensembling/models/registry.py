"""Builds one of our models by name (configs name them in `config.model`)."""

from typing import Any

from ensembling.models.cnn import CNN
from ensembling.models.mlp import MLP, PartitionedMLP
from ensembling.models.resnet import ResNet

MODELS = {"mlp": MLP, "partitioned_mlp": PartitionedMLP, "cnn": CNN, "resnet": ResNet}


def make_model(name: str, *, num_classes: int, **attributes: Any):
  """`MODELS[name](num_classes=..., **attributes)`, checking the attribute names.

  >>> make_model("mlp", num_classes=3, widths=(8,)).widths
  (8,)
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(MODELS)}.")
  cls = MODELS[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(attributes) - fields)
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; it takes {sorted(fields)}.")
  attributes = {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}
  return cls(num_classes=num_classes, **attributes)
