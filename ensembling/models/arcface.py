"""ArcFace heads: class centres on the hypersphere, and any backbone wrapped with one.

`ArcFaceModel(backbone)` turns a model returning `Output(features, logits)` (MLP, CNN,
ResNet, ...) into `features -> Dense(embed) -> ArcFaceHead`; it returns
`Output(embeddings, scale * cos(theta))`. Train it with
`losses.arcface_loss_from_logits` (the margin is applied in the loss, not the head).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ensembling import losses
from ensembling.models.common import Output


class ArcFaceHead(nn.Module):
  """Holds the class centres `centers` (C x D) and returns `scale * cos(theta)`.

  Attributes:
    num_classes: C.
    scale: s; logits are s * cosine, so softmax(logits) is the margin-free ArcFace
      posterior.
  """
  num_classes: int
  scale: float = 64.0

  @nn.compact
  def __call__(self, embeddings_BxD):
    centers = self.param("centers", nn.initializers.xavier_uniform(),
                         (self.num_classes, embeddings_BxD.shape[-1]))
    return self.scale * losses.cosine_logits(embeddings_BxD, centers)


class ArcFaceModel(nn.Module):
  """backbone -> features -> Dense(embedding_dim, name='embed') -> ArcFaceHead('head').

  Parameters live under `backbone/`, `embed/` and `head/centers`. The backbone's own
  classification layer is not used; `with_arcface` builds it with one output so it
  costs nothing.

  Attributes:
    backbone: any Linen module with `__call__(x, *, train) -> Output`.
    num_classes: classes of the ArcFace head.
    embedding_dim: D, the embedding (and centre) dimension.
    scale: the head's s.
  """
  backbone: nn.Module
  num_classes: int = 10
  embedding_dim: int = 128
  scale: float = 64.0

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    features = self.backbone(x, train=train).features
    emb = nn.Dense(self.embedding_dim, name="embed")(features)
    logits = ArcFaceHead(self.num_classes, scale=self.scale, name="head")(emb)
    return Output(emb, logits)


def with_arcface(backbone: nn.Module, *, num_classes: int, embedding_dim: int = 128,
                 scale: float = 64.0) -> ArcFaceModel:
  """Wraps `backbone` with an embedding layer and an ArcFace head.

  If the backbone has a `num_classes` field it is rebuilt with `num_classes=1`, since
  its own head is unused.
  """
  if "num_classes" in getattr(type(backbone), "__dataclass_fields__", {}):
    backbone = backbone.clone(num_classes=1)
  return ArcFaceModel(backbone=backbone, num_classes=num_classes,
                      embedding_dim=embedding_dim, scale=scale)


def make_arcface_model(name: str, *, num_classes: int, embedding_dim: int = 128,
                       scale: float = 64.0, **attributes: Any) -> ArcFaceModel:
  """`with_arcface(make_model(name, **attributes))`: a registry backbone with an ArcFace head."""
  from ensembling.models.registry import make_model
  return with_arcface(make_model(name, num_classes=1, **attributes), num_classes=num_classes,
                      embedding_dim=embedding_dim, scale=scale)
