"""SuperNet: K frozen members merged by one new, retrained softmax layer.

Seed 003 (Bukowski & Dzwinel, "SuperNet - an efficient method of neural networks
ensembling") concatenates the penultimate features of K trained sub-networks and
trains only a new dense softmax layer over them (K*D -> C). This module holds:

- the new layer (`init_head`; applied with `models.linear.apply_linear`) with three
  initialisations: `random`,
  `copy` (the members' `head` kernels stacked, biases averaged) and `copy_scaled`
  (copied kernels times a factor, 1/K by default, which makes the initial SuperNet
  exactly the logit average of the members);
- the whole SuperNet as one pytree `{"members": variables_K, "head": head}` with
  `supernet_apply` (used to check that the cached path equals the full one);
- head training on cached features (`cache_features`, `fit_head`, `train_head`): the
  members run once per split, after which an epoch is one step of `train.fit` (a matrix
  multiply per batch inside one `lax.scan`);
- the thesis's last-layer boost (`layerwise_boost`): retrain only the layers matching
  a list of path patterns, one stage at a time from the top (Table 3), frozen with
  `optim.freeze`;
- the partitioned networks' parameter counts (`mlp_params`, `supermodel_params`,
  `equal_param_widths`, Table 8) and the time-to-accuracy bookkeeping of Tables 10/11
  (`timed_epoch` on `train.fit`, `clock`, `time_to_accuracy`).

Every function takes any model of the contract (`models.as_model`); members must expose
features (return `Output`, or be Linen modules whose last `nn.Dense` reads them).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import data as data_lib
from ensembling import losses, members, optim, train
from ensembling import tree as tree_lib
from ensembling.models.common import Output
from ensembling.models.contract import as_model
from ensembling.models.linear import apply_linear, init_linear

PyTree = Any
INITS = ("random", "copy", "copy_scaled")


# --------------------------------------------------------------------------- features

def concat_features(features_KxNxD) -> jax.Array:
  """(K, N, D) member features -> (N, K*D), member-major within each row.

  Row n is [f_0(n), f_1(n), ..., f_{K-1}(n)]; this is the layout `init_head` and
  `PartitionedMLP` use, so the first k*D columns are the SuperNet of the first k
  members.
  """
  f = jnp.asarray(features_KxNxD)
  if f.ndim != 3:
    raise ValueError(f"Expected member features of shape (K, N, D), got {f.shape}.")
  k, n, d = f.shape
  return jnp.transpose(f, (1, 0, 2)).reshape(n, k * d)


def first_members(features_NxF, *, num_members: int, feature_dim: int):
  """The concatenated features of the first `num_members` members (a column slice)."""
  f = features_NxF
  if f.shape[-1] % feature_dim:
    raise ValueError(f"{f.shape[-1]} feature columns are not a multiple of "
                     f"feature_dim={feature_dim}.")
  total = f.shape[-1] // feature_dim
  if not 1 <= num_members <= total:
    raise ValueError(f"num_members must be in [1, {total}], got {num_members}.")
  return f[..., : num_members * feature_dim]


def cache_features(model, variables_K: PyTree,
                   splits: Mapping[str, np.ndarray], *, batch_size: int = 1000,
                   strategy: str = "auto") -> dict[str, dict[str, np.ndarray]]:
  """Runs the frozen members once per split.

  Args:
    model: the members' model (anything `models.as_model` accepts).
    variables_K: stacked member variables.
    splits: {name: x} arrays.
    batch_size: inference chunk size.
    strategy: member-parallel strategy for `members.predict`.

  Returns:
    {name: {"features": (N, K*D) float32, "logits": (K, N, C) float32}}.
  """
  out = {}
  for name, x in splits.items():
    logits, feats = members.predict(model, variables_K, x, batch_size=batch_size,
                                    strategy=strategy, with_features=True)
    out[name] = {"features": np.asarray(concat_features(feats)), "logits": logits}
  return out


# --------------------------------------------------------------------------- head

def member_heads(params_K: PyTree, *, name: str = "head") -> tuple[jax.Array, jax.Array]:
  """The members' last-layer kernels (K, D, C) and biases (K, C) from stacked params.

  Args:
    params_K: stacked member params (the `params` collection, member axis first).
    name: the top-level module name of the dense softmax layer.
  """
  if name not in params_K:
    raise ValueError(f"No layer {name!r} in the members' params; top-level names are "
                     f"{sorted(params_K)}.")
  layer = params_K[name]
  kernel, bias = layer["kernel"], layer["bias"]
  if kernel.ndim != 3 or bias.ndim != 2:
    raise ValueError(f"Expected stacked kernels (K, D, C) and biases (K, C) at {name!r}, got "
                     f"{kernel.shape} and {bias.shape}.")
  return kernel, bias


def partitioned_heads(params: PyTree) -> tuple[jax.Array, jax.Array]:
  """A `PartitionedMLP`'s per-part heads as (P, D, C) kernels and (P, C) biases."""
  head = params["parts"]["mlp"]["head"]
  return head["kernel"], head["bias"]


def init_head(key: jax.Array, *, num_features: int, num_classes: int,
              init: str = "random", kernels_KxDxC=None, biases_KxC=None,
              scale: float | None = None) -> dict[str, jax.Array]:
  """The SuperNet's new dense softmax layer {"kernel": (F, C), "bias": (C,)}.

  Args:
    key: PRNG key (used by `random` only).
    num_features: F = K * D, the width of the concatenated features.
    num_classes: C.
    init: `random` (LeCun-normal kernel, zero bias, like `nn.Dense`), `copy` (the
      members' kernels stacked along the feature axis, biases averaged) or
      `copy_scaled` (copied kernels times `scale`).
    kernels_KxDxC: the members' head kernels (needed by the copy inits).
    biases_KxC: the members' head biases (needed by the copy inits).
    scale: the kernel factor of `copy_scaled`; None means 1/K, which makes the
      initial SuperNet logits equal the average of the members' logits. Biases are
      averaged, never scaled.

  Returns:
    The head parameters.
  """
  if init not in INITS:
    raise ValueError(f"Unknown head init {init!r}; choose one of {INITS}.")
  if init == "random":
    return init_linear(key, num_features, num_classes)
  if kernels_KxDxC is None or biases_KxC is None:
    raise ValueError(f"init={init!r} needs the members' kernels_KxDxC and biases_KxC.")
  kernels = jnp.asarray(kernels_KxDxC, jnp.float32)
  biases = jnp.asarray(biases_KxC, jnp.float32)
  k, d, c = kernels.shape
  if k * d != num_features or c != num_classes or biases.shape != (k, c):
    raise ValueError(f"Member heads {kernels.shape} / {biases.shape} do not fit a head of "
                     f"{num_features} features and {num_classes} classes.")
  factor = 1.0
  if init == "copy_scaled":
    factor = 1.0 / k if scale is None else float(scale)
  elif scale is not None:
    raise ValueError("scale is only used with init='copy_scaled'.")
  return {"kernel": kernels.reshape(k * d, c) * factor, "bias": biases.mean(0)}


def l2_penalty(head: Mapping[str, jax.Array]) -> jax.Array:
  """sum(kernel^2) + sum(bias^2): Keras's `l2(alpha)` on weights and bias, sans alpha."""
  return jnp.sum(jnp.square(head["kernel"])) + jnp.sum(jnp.square(head["bias"]))


def head_loss(head, features_NxF, labels_N, *, l2: float = 0.0) -> jax.Array:
  """Mean cross-entropy of the head plus `l2 * l2_penalty(head)`."""
  loss = losses.softmax_cross_entropy(apply_linear(head, features_NxF), labels_N)
  return loss + l2 * l2_penalty(head) if l2 else loss


# --------------------------------------------------------------------------- the whole net

def supernet_params(variables_K: PyTree, head: PyTree) -> dict[str, PyTree]:
  """The SuperNet as one pytree: frozen members and the new head."""
  return {"members": variables_K, "head": head}


def supernet_apply(model, params: Mapping[str, PyTree], x, *,
                   strategy: str = "vmap") -> Output:
  """The full SuperNet forward pass (members in inference mode, then the head).

  Args:
    model: the members' model (anything `models.as_model` accepts).
    params: `supernet_params(variables_K, head)`.
    x: a batch (B, ...).
    strategy: `vmap` or `unroll` over members (both trace into the caller's jit).

  Returns:
    `Output(features (B, K*D), logits (B, C))`.
  """
  variables_K = params["members"]
  k = tree_lib.num_members(variables_K)
  m = as_model(model)
  one = lambda v: m.apply(v, x, train=False, with_features=True)[0].features
  if strategy == "vmap":
    feats = jax.vmap(one)(variables_K)
  elif strategy == "unroll":
    feats = jnp.stack([one(tree_lib.index(variables_K, i)) for i in range(k)])
  else:
    raise ValueError(f"supernet_apply supports strategy vmap or unroll, got {strategy!r}.")
  f = concat_features(feats)
  return Output(f, apply_linear(params["head"], f))


# --------------------------------------------------------------------------- boosting steps

def frozen_stats_step(state, batch, key, *, model, tx: optax.GradientTransformation,
                      loss_fn: Callable = losses.softmax_cross_entropy):
  """`members.train_step` that leaves BatchNorm statistics untouched.

  Used with `optim.freeze` when most layers are frozen: the frozen layers' running
  statistics must not drift either (Keras freezes BN the same way).
  """
  new_state, metrics = members.train_step(state, batch, key, model=model, tx=tx,
                                          loss_fn=loss_fn)
  return {**new_state, "batch_stats": state["batch_stats"]}, metrics


# --------------------------------------------------------------------------- head training

def feature_dropout(key: jax.Array, features, rate: float):
  """Inverted dropout on cached features: what a member's last Dropout does in training.

  Each entry is zeroed with probability `rate` and the rest scaled by 1 / (1 - rate), so
  the expectation is unchanged; `rate=0` returns the features as they are.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
  if rate == 0.0:
    return features
  keep = jax.random.bernoulli(key, 1.0 - rate, features.shape)
  return jnp.where(keep, features / (1.0 - rate), 0.0)


@functools.lru_cache(maxsize=16)
def _head_epoch_step(tx: optax.GradientTransformation, l2: float, dropout: float) -> Callable:
  """One head-training epoch as one `train.fit` step: a `lax.scan` over its batches."""
  def step(state, batch, key):
    features, labels, idx_SxB = batch["features"], batch["labels"], batch["idx"]

    def body(carry, xs):
      h, o = carry
      idx, k = xs
      f = feature_dropout(k, features[idx], dropout)
      loss, grads = jax.value_and_grad(head_loss)(h, f, labels[idx], l2=l2)
      updates, o = tx.update(grads, o, h)
      return (optax.apply_updates(h, updates), o), loss

    keys = jax.random.split(key, idx_SxB.shape[0])
    (head, opt_state), losses_S = jax.lax.scan(body, (state["params"], state["opt_state"]),
                                               (idx_SxB, keys))
    return ({"params": head, "opt_state": opt_state, "step": state["step"] + 1},
            {"loss": losses_S.mean()})
  return jax.jit(step)


@jax.jit
def _head_eval(head, features, labels):
  logits = apply_linear(head, features)
  logp = jax.nn.log_softmax(logits)
  nll_N = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
  acc = jnp.mean(jnp.argmax(logits, -1) == labels)
  return acc, nll_N.mean()


def head_batches(seed: int, epoch: int, *, num_examples: int, batch_size: int) -> np.ndarray:
  """The (steps, batch_size) example indices of one head-training epoch."""
  return data_lib.member_batch_indices(seed, epoch, num_examples=num_examples,
                                       batch_size=batch_size, num_members=1)[:, 0]


def fit_head(head: PyTree, features_NxF, labels_N, *, tx: optax.GradientTransformation,
             epochs: int, batch_size: int = 128, seed: int = 0, l2: float = 0.0,
             dropout: float = 0.0, eval_sets: Mapping[str, tuple[Any, Any]] | None = None,
             best_by: str | None = None, progress: bool = False) -> tuple[PyTree, list[dict]]:
  """Trains only the SuperNet head on cached (frozen) features, with `train.fit`.

  Each epoch is one jitted `lax.scan` over shuffled mini-batches of the cached
  features (one `fit` step): no member forward pass.

  Args:
    head: initial head (see `init_head`).
    features_NxF: cached concatenated training features.
    labels_N: training labels.
    tx: the head's optimizer (a fresh state is made here).
    epochs: passes over the cached features.
    batch_size: examples per step; the last incomplete batch is dropped.
    seed: data order (epoch e uses `head_batches(seed, e, ...)`).
    l2: weight of `l2_penalty` in the loss (0 disables it).
    dropout: `feature_dropout` rate on the cached features during training (evaluation
      sees them intact). With the members' own dropout rate this is what training a new
      layer over frozen Keras sub-models does (their Dropout stays active in `fit`), for
      the Dropout right before the head; the earlier layers' dropout is not replayed.
      Epoch e's masks come from `jax.random.split(fold_in(key(seed), e), steps)`.
    eval_sets: {name: (features, labels)} evaluated after each epoch (and at epoch 0).
    best_by: e.g. "val_accuracy": return the head of the epoch with the highest value
      (ties: earliest) instead of the last one.
    progress: a progress bar over the epochs.

  Returns:
    (head, history): one record per epoch (0 = before training) with `epoch`,
    `train_loss`, and `<name>_accuracy` / `<name>_nll` for each eval set.
  """
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
  feats = jnp.asarray(features_NxF, jnp.float32)
  labels = jnp.asarray(labels_N, jnp.int32)
  if feats.ndim != 2 or labels.shape != (feats.shape[0],):
    raise ValueError(f"Expected features (N, F) and labels (N,), got {feats.shape} and "
                     f"{labels.shape}.")
  if feats.shape[1] != head["kernel"].shape[0]:
    raise ValueError(f"Head expects {head['kernel'].shape[0]} features, got {feats.shape[1]}.")
  evals = {n: (jnp.asarray(f, jnp.float32), jnp.asarray(y, jnp.int32))
           for n, (f, y) in (eval_sets or {}).items()}

  def evaluate(state):
    out = {}
    for n, (f, y) in evals.items():
      acc, nll = _head_eval(state["params"], f, y)
      out[f"{n}_accuracy"], out[f"{n}_nll"] = float(acc), float(nll)
    return out

  batch_fn = lambda epoch: {"features": feats, "labels": labels, "idx": jnp.asarray(
      head_batches(seed, epoch, num_examples=feats.shape[0], batch_size=batch_size))}
  state, _, history = train.fit(
      train.init_pytree_state(head, tx), step_fn=_head_epoch_step(tx, float(l2), float(dropout)),
      batch_fn=batch_fn, num_steps=int(epochs), key=jax.random.key(seed), eval_fn=evaluate,
      eval_every=1, eval_at_start=True, eval_split=None, best_by=best_by, progress=progress,
      desc="SuperNet head")
  return state["params"], [{"epoch": r.pop("step"), **r} for r in history]


def head_optimizer(name: str, learning_rate: float, *, schedule: str = "constant",
                   steps: int = 1) -> optax.GradientTransformation:
  """The head's optimizer: Adam or SGD (momentum 0.9), constant or cosine-decayed to 0.

  Cached: the same arguments give the same transformation object, so every head of one
  feature width reuses one compiled epoch.
  """
  return _head_tx(name, float(learning_rate), schedule, max(int(steps), 1))


@functools.lru_cache(maxsize=8)
def _head_tx(name: str, lr: float, schedule: str, steps: int) -> optax.GradientTransformation:
  if schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, steps)
  elif schedule != "constant":
    raise ValueError(f"Unknown head schedule {schedule!r}; use constant or cosine.")
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f"Unknown head optimizer {name!r}; use adam or sgd.")


def train_head(cache: Mapping[str, Mapping[str, Any]], heads: tuple, *, num_members: int,
               init: str, tx: optax.GradientTransformation, epochs: int, batch_size: int,
               seed: int, key: jax.Array, l2: float = 0.0, scale: float | None = None,
               dropout: float = 0.0, best_by: str | None = None,
               eval_splits: Sequence[str] = ("val", "test")) -> tuple[PyTree, list[dict]]:
  """A SuperNet head over the first `num_members` members' cached features.

  Args:
    cache: `cache_features` output with labels added: {split: {"features", "y"}}; needs
      "train" and the `eval_splits`.
    heads: the members' (kernels (K, D, C), biases (K, C)) from `member_heads`.
    num_members: how many of the first members the head reads.
    init, scale: see `init_head` (`scale` only for copy_scaled).
    tx, epochs, batch_size, seed, l2, dropout, best_by: see `fit_head`.
    key: the random init's key.
    eval_splits: splits of `cache` evaluated every epoch.

  Returns:
    (head, history) as `fit_head`.
  """
  kern, bias = heads
  d = kern.shape[1]
  sel = lambda f: first_members(f, num_members=num_members, feature_dim=d)
  head0 = init_head(key, num_features=num_members * d, num_classes=kern.shape[2], init=init,
                    kernels_KxDxC=kern[:num_members], biases_KxC=bias[:num_members],
                    scale=scale if init == "copy_scaled" else None)
  return fit_head(head0, sel(cache["train"]["features"]), cache["train"]["y"], tx=tx,
                  epochs=epochs, batch_size=batch_size, seed=seed, l2=l2, dropout=dropout,
                  eval_sets={n: (sel(cache[n]["features"]), cache[n]["y"]) for n in eval_splits},
                  best_by=best_by)


def head_probs(head: PyTree, features_NxF) -> np.ndarray:
  """softmax of the head's logits, as NumPy (N, C)."""
  return np.asarray(jax.nn.softmax(apply_linear(head, jnp.asarray(features_NxF)), -1))


# --------------------------------------------------------------------------- last-layer boost

class _CallOrder:
  """Records the names of the top-level submodules in the order they are first called."""

  def __init__(self):
    self.names: list[str] = []

  def __call__(self, next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and path[0] not in self.names:
      self.names.append(path[0])
    return next_fun(*args, **kwargs)


def layers_from_top(model, variables: PyTree, sample_input) -> list[str]:
  """Top-level layer names of a Linen model's params, last called first.

  Traces one inference pass (`jax.eval_shape`, no compute) and records the order in
  which the top-level submodules are called, so for the MLP this is
  ["head", "Dense_{n-1}", ..., "Dense_0"] (a BN-MLP interleaves "bn_i" after "Dense_i",
  and "Dense_10" comes after "Dense_9"). Only layers with parameters are listed.

  Args:
    model: a Linen module (or its `.apply`).
    variables: one member's variables ({"params", ...}).
    sample_input: an example batch.
  """
  import flax.linen as nn
  m = as_model(model)
  if m.kind != "linen":
    raise ValueError("layers_from_top reads Linen call order; list the layers yourself for "
                     f"a {m.kind} model.")
  order = _CallOrder()
  with nn.intercept_methods(order):
    jax.eval_shape(lambda v, x: m.apply(v, x, train=False)[0].logits, variables,
                   jnp.asarray(sample_input))
  return [n for n in reversed(order.names) if n in variables["params"]]


def layerwise_boost(state_K: PyTree, *, model,
                    stages: Sequence[tuple[str | Sequence[str], int]],
                    make_tx: Callable[[int], optax.GradientTransformation],
                    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                    strategy: str = "vmap", eval_fn: Callable | None = None,
                    loss_fn: Callable = losses.softmax_cross_entropy,
                    progress: bool = False) -> tuple[PyTree, list[dict]]:
  """Retrains only some layers of every member, one stage after another (Table 3).

  Each stage makes a fresh optimizer `optim.freeze(make_tx(stage_steps), params,
  trainable=patterns)`, so only the leaves matching that stage's path patterns move;
  BatchNorm statistics are kept frozen (`frozen_stats_step`). All members are boosted at
  once with `train.fit`.

  Args:
    state_K: stacked member states (`params`, `batch_stats`, ...; `opt_state` is
      replaced per stage).
    model: the members' model (anything `models.as_model` accepts).
    stages: [(patterns, epochs), ...], e.g. [("^head/", 3), ("^Dense_2/", 3)].
    make_tx: `steps -> optax transformation` for one stage of `steps` steps.
    x, y: training data.
    batch_size: per member.
    seed: data order; stage s uses seed + 1000 * s (dropout keys: seed + s).
    strategy: member-parallel strategy.
    eval_fn: `state_K -> {name: (K,) array}` run after every stage (and before).
    loss_fn: training loss.
    progress: progress bars.

  Returns:
    (state_K, history): history[0] is the evaluation before boosting, then one
    record per stage with its patterns, epochs and evaluation.
  """
  k = tree_lib.num_members(state_K["step"])
  history = [{"stage": 0, "patterns": None, "epochs": 0,
              **({n: np.asarray(v).tolist() for n, v in eval_fn(state_K).items()}
                 if eval_fn else {})}]
  for s, (patterns, epochs) in enumerate(stages, start=1):
    batch_fn, spe = train.make_batch_fn(x, y, seed=seed + 1000 * s, batch_size=batch_size,
                                        num_members=k)
    steps = spe * int(epochs)
    params0 = tree_lib.index(state_K["params"], 0)
    tx = optim.freeze(make_tx(steps), params0, trainable=patterns)
    opt_state = jax.jit(jax.vmap(tx.init))(state_K["params"])
    state_K = {**state_K, "opt_state": opt_state, "step": jnp.zeros_like(state_K["step"])}
    step_fn = members.ensemble_step(model=model, tx=tx, num_members=k, strategy=strategy,
                                    loss_fn=loss_fn, step_fn=frozen_stats_step, donate=True)
    if steps:
      state_K, _, _ = train.fit(state_K, step_fn=step_fn, batch_fn=batch_fn, num_steps=steps,
                                key=jax.random.key(seed + s), progress=progress,
                                desc=f"boost {patterns}")
    rec = {"stage": s, "patterns": patterns, "epochs": int(epochs)}
    if eval_fn:
      rec.update({n: np.asarray(v).tolist() for n, v in eval_fn(state_K).items()})
    history.append(rec)
  return state_K, history


# --------------------------------------------------------------------------- loss statistics

def loss_quantiles(probs_NxC, labels_N, *, quantiles=(0.9, 0.95)) -> dict[str, float]:
  """Per-example cross-entropy statistics of the thesis's "loss dilemma" (Table 5).

  Returns accuracy, loss mean/std and the requested percentiles of the per-example
  loss -log p(y) (probabilities clipped at 1e-12).
  """
  probs = np.asarray(probs_NxC, np.float64)
  labels = np.asarray(labels_N)
  if probs.ndim != 2 or labels.shape != (probs.shape[0],):
    raise ValueError(f"Expected probs (N, C) and labels (N,), got {probs.shape} and "
                     f"{labels.shape}.")
  loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))
  out = {"accuracy": float(np.mean(probs.argmax(-1) == labels)),
         "loss_mean": float(loss.mean()), "loss_std": float(loss.std())}
  for q in quantiles:
    out[f"loss_p{int(round(q * 100))}"] = float(np.quantile(loss, q))
  return out


# --------------------------------------------------------------------------- parameter counts

def mlp_params(in_dim: int, widths: Sequence[int], *, num_classes: int) -> int:
  """Parameters (kernels and biases) of a dense `models.MLP(widths)` on `in_dim` inputs.

  >>> mlp_params(784, (512, 512), num_classes=10)
  669706
  """
  dims = [int(in_dim), *(int(w) for w in widths), int(num_classes)]
  return int(sum(a * b + b for a, b in zip(dims[:-1], dims[1:])))


def supermodel_params(in_dim: int, widths: Sequence[int], *, num_classes: int,
                      parts: int) -> int:
  """Parameters of a SuperModel: P members of `widths / P` and the SuperNet head over them.

  The members' own heads are not counted (the SuperNet replaces them); the head has
  P * (widths[-1] / P) * C weights and C biases.

  Args:
    in_dim: input size.
    widths: the total neurons per hidden layer (each divisible by `parts`).
    num_classes: C.
    parts: P.

  Returns:
    The parameter count.

  >>> supermodel_params(784, (512, 512), num_classes=10, parts=1)  # one member: the MLP
  669706
  >>> supermodel_params(784, (512, 512), num_classes=10, parts=2)
  538634
  """
  if any(int(w) % int(parts) for w in widths):
    raise ValueError(f"widths {tuple(widths)} are not divisible by parts={parts}.")
  sub = [int(w) // int(parts) for w in widths]
  body = mlp_params(in_dim, sub, num_classes=num_classes) - (sub[-1] * num_classes + num_classes)
  return parts * body + parts * sub[-1] * num_classes + num_classes


def equal_param_widths(in_dim: int, widths: Sequence[int], *, num_classes: int,
                       target: int) -> tuple[int, ...]:
  """`widths` scaled by one common factor so that the dense MLP has about `target` params.

  Bisection over the factor in [0.01, 4] (60 halvings); widths are rounded, at least 1.

  Args:
    in_dim: input size.
    widths: the hidden widths to scale.
    num_classes: C.
    target: the parameter count to match (e.g. `supermodel_params`).

  Returns:
    The scaled widths: the smallest factor whose MLP has at least `target` parameters.

  >>> equal_param_widths(784, (512, 512), num_classes=10, target=669706)
  (512, 512)
  """
  lo, hi = 0.01, 4.0
  for _ in range(60):
    mid = (lo + hi) / 2
    n = mlp_params(in_dim, [max(1, round(w * mid)) for w in widths], num_classes=num_classes)
    lo, hi = (mid, hi) if n < target else (lo, mid)
  return tuple(max(1, round(w * hi)) for w in widths)


# --------------------------------------------------------------------------- time to accuracy

def timed_epoch(state: PyTree, *, step_fn: Callable, batch_fn: Callable[[int], Any],
                epoch: int, steps_per_epoch: int, key: jax.Array,
                desc: str = "timed epoch") -> tuple[PyTree, float, float]:
  """Epoch `epoch` of `train.fit`, continuing in memory from step epoch * steps_per_epoch.

  Seconds are wall-clock until the state is ready. In epoch 0 the very first step (its
  compilation) runs as its own, untimed `fit` call: its seconds are returned apart, and
  the epoch's seconds cover the remaining steps (Tables 10/11 exclude compilation).

  Args:
    state: the state to train (stacked member state or single state).
    step_fn, batch_fn, key: as `train.fit` (the same in every epoch, so the run equals
      one uninterrupted `fit`).
    epoch: the 0-based epoch to run.
    steps_per_epoch: steps of one epoch.
    desc: the log label.

  Returns:
    (state, seconds, first_step_seconds); `first_step_seconds` is 0 after epoch 0.
  """
  start, first = int(epoch) * int(steps_per_epoch), 0.0
  fit = lambda s, n, start_step: train.fit(s, step_fn=step_fn, batch_fn=batch_fn,
                                           num_steps=n, key=key, start_step=start_step,
                                           progress=False, desc=desc)[0]
  if start == 0:
    t0 = time.perf_counter()
    state = jax.block_until_ready(fit(state, 1, 0))
    first, start = time.perf_counter() - t0, 1
  t0 = time.perf_counter()
  state = jax.block_until_ready(fit(state, (int(epoch) + 1) * int(steps_per_epoch), start))
  return state, time.perf_counter() - t0, first


def clock(records: Sequence[Mapping[str, Any]]) -> list[dict]:
  """The cumulative wall clock of an epoch-by-epoch run (Tables 10 and 11).

  Each record holds `train_seconds` (that epoch's training) and, for a SuperNet,
  `build_seconds` (that epoch's build: feature caching and head training).

  Args:
    records: one per epoch, in order.

  Returns:
    Copies with `member_seconds` (training up to this epoch), `seconds` (that plus this
    epoch's build: when this epoch's model would be ready had no earlier one been built)
    and, where builds are given, `seconds_all_builds` (training plus every build so far).

  >>> [r["seconds"] for r in clock([{"train_seconds": 2.0, "build_seconds": 1.0},
  ...                               {"train_seconds": 3.0, "build_seconds": 0.5}])]
  [3.0, 5.5]
  """
  out, trained, built = [], 0.0, 0.0
  for r in records:
    trained += float(r["train_seconds"])
    rec = {**r, "member_seconds": trained, "seconds": trained}
    if "build_seconds" in r:
      built += float(r["build_seconds"])
      rec.update(seconds=trained + float(r["build_seconds"]), seconds_all_builds=trained + built)
    out.append(rec)
  return out


def time_to_accuracy(curve: Sequence[Mapping[str, Any]], targets: Sequence[float], *,
                     metric: str = "val_accuracy",
                     fields: Sequence[str] = ("epoch", "seconds", "val_accuracy", "val_nll")
                     ) -> dict[str, dict | None]:
  """For each target, the first record of `curve` whose `metric` reaches it.

  Args:
    curve: records in time order (see `clock`).
    targets: accuracies to reach.
    metric: the record entry compared with the targets (>=).
    fields: the entries of the record kept in the answer.

  Returns:
    {str(target): {field: value} of the first record with metric >= target, or None}.

  >>> curve = [{"epoch": 1, "seconds": 2.0, "val_accuracy": 0.8},
  ...          {"epoch": 2, "seconds": 5.0, "val_accuracy": 0.9}]
  >>> time_to_accuracy(curve, [0.85, 0.95], fields=("epoch", "seconds"))
  {'0.85': {'epoch': 2, 'seconds': 5.0}, '0.95': None}
  """
  out = {}
  for t in targets:
    hit = next((r for r in curve if r[metric] >= t), None)
    out[str(t)] = None if hit is None else {f: hit[f] for f in fields if f in hit}
  return out
