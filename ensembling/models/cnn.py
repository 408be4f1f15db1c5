"""The SuperNet thesis's convolutional network (seed 003, Table 2)."""

from typing import Sequence

import flax.linen as nn

from ensembling.models.common import Output


class CNN(nn.Module):
  """conv 32,32 -> pool -> 64,64 -> pool -> 128,128 -> pool -> dense.

  Each convolution is 3x3 'same', ELU, then BatchNorm (Keras order of the thesis);
  each pooling is 2x2 max followed by dropout 0.2 / 0.3 / 0.4. L2 (alpha = 1e-4 in the
  thesis) belongs to the optimizer (`optim.weight_decay`). Features are the flattened
  output of the last block.

  Attributes:
    stages: filters per stage; two convolutions per stage.
    dropouts: dropout after each stage's pooling.
    batch_norm: use BatchNorm (False gives the benchmark's plain conv stack).
  """
  num_classes: int = 10
  stages: Sequence[int] = (32, 64, 128)
  dropouts: Sequence[float] = (0.2, 0.3, 0.4)
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Output:
    if x.ndim == 3:
      x = x[..., None]
    for s, (filters, rate) in enumerate(zip(self.stages, self.dropouts)):
      for j in range(2):
        x = nn.Conv(filters, (3, 3), padding="SAME", name=f"conv{s}_{j}")(x)
        x = nn.elu(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.99,
                           name=f"bn{s}_{j}")(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      if rate > 0:
        x = nn.Dropout(rate, deterministic=not train)(x)
    features = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes, name="head")(features)
    return Output(features, logits)
