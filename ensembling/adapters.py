"""Parameter-efficient adapters for our BERT, trained by masked-language modelling (issue 16).

`models.bert` holds the adapters themselves (LoRA on the query / value projections, a
bottleneck adapter after each feed-forward block) and `BertMLM`, the encoder with an MLM
head tied to the word embeddings. This module trains them with `train.fit`, everything
else frozen through `optim.freeze` (and a `stop_gradient`, so no gradient work is done for
frozen weights):

- `mask_tokens`: BERT masking with a fixed number P of scored positions per text (15% of
  its real tokens, at least one), 80% [MASK] / 10% a random token / 10% unchanged, or all
  [MASK] for evaluation; seeded, so evaluation texts are masked the same way every run.
- `mlm_loss` / `mlm_step`: the weighted cross-entropy over the scored positions and one
  member's step (`members.train_step`'s shape: `(state, batch, key) -> (state, metrics)`).
- `make_mlm_batch_fn`: per-member batches `{"ids", "positions", "targets", "weights"}`,
  member k reading its own texts (one domain each), a pure function of the step.
- `fit_mlm`: trains the leaves matching `trainable` of one state or of K stacked members
  (vmapped over the member axis); `init_adapters` makes K fresh adapters on shared base
  weights.

Adapters are plain pytrees (`bert.adapter_params`): they stack on a member axis, average
(`tree.weighted_sum`) and go back into base weights with `bert.with_adapter`.

References: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019);
Pfeiffer et al., "AdapterFusion" (EACL 2021, the adapter after the feed-forward block);
Hu et al., "LoRA" (ICLR 2022); Devlin et al., "BERT" (NAACL 2019, the masking).
Departures: the MLM head is not pretrained (all-MiniLM-L6-v2 ships without one), so
`fit_mlm` with `trainable="^mlm_head/"` trains its transform layer and output bias first
(the output matrix stays the tied word embeddings); no next-sentence objective.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import members, optim, train
from ensembling import tree as tree_lib
from ensembling.models import bert

PyTree = Any


# --------------------------------------------------------------------------- masking

def mask_tokens(ids_NxL: np.ndarray, *, rate: float, mask_id: int, special_ids: Sequence[int],
                vocab_size: int, seed, num_positions: int | None = None,
                replace: bool = True) -> dict[str, np.ndarray]:
  """BERT masking with P scored positions per text.

  Args:
    ids_NxL: token ids (padding and special tokens are never masked).
    rate: the share of a text's real tokens to score, in (0, 1).
    mask_id: the [MASK] id.
    special_ids: ids never chosen (pad, CLS, SEP, ...).
    vocab_size: random replacements are drawn from the non-special ids below it.
    seed: for `np.random.default_rng` (an int or a tuple, e.g. (seed, step, member)).
    num_positions: P (default ceil(rate * L)); texts with fewer chosen tokens get
      weight-0 padding positions (position 0, target 0).
    replace: True: 80% [MASK], 10% random, 10% kept (training); False: all [MASK].

  Returns:
    {"ids": masked inputs (N, L), "positions", "targets", "weights": (N, P)}.

  >>> b = mask_tokens(np.array([[2, 7, 8, 9, 3, 0]]), rate=0.3, mask_id=4,
  ...                 special_ids=(0, 2, 3), vocab_size=10, seed=0, replace=False)
  >>> b["weights"].tolist(), int((b["ids"] == 4).sum())  # round(0.3 * 3 real tokens) = 1
  ([[1.0, 0.0]], 1)
  """
  ids = np.asarray(ids_NxL)
  if ids.ndim != 2:
    raise ValueError(f"ids must be (N, L), got shape {ids.shape}.")
  if not 0.0 < rate < 1.0:
    raise ValueError(f"Masking rate must be in (0, 1), got {rate}.")
  n, length = ids.shape
  p = int(num_positions or np.ceil(rate * length))
  rng = np.random.default_rng(seed)
  special = np.asarray(sorted(set(int(s) for s in special_ids)))
  candidates = ~np.isin(ids, special)
  allowed = np.setdiff1d(np.arange(vocab_size), special)
  out = ids.copy()
  positions = np.zeros((n, p), np.int32)
  weights = np.zeros((n, p), np.float32)
  for i in range(n):
    cand = np.flatnonzero(candidates[i])
    if not len(cand):
      continue
    m = min(p, max(1, int(round(rate * len(cand)))))
    chosen = np.sort(rng.choice(cand, size=m, replace=False))
    positions[i, :m], weights[i, :m] = chosen, 1.0
    if replace:
      u = rng.random(m)
      out[i, chosen[u < 0.8]] = mask_id
      rand = chosen[(u >= 0.8) & (u < 0.9)]
      out[i, rand] = rng.choice(allowed, size=len(rand))
    else:
      out[i, chosen] = mask_id
  targets = np.take_along_axis(ids, positions, axis=1).astype(np.int32) * (weights > 0)
  return {"ids": out.astype(np.int32), "positions": positions, "targets": targets,
          "weights": weights}


def tokenizer_specials(tokenizer) -> dict[str, Any]:
  """`mask_tokens`' keyword arguments from a Hugging Face tokenizer."""
  if tokenizer.mask_token_id is None:
    raise ValueError("The tokenizer has no [MASK] token.")
  return {"mask_id": int(tokenizer.mask_token_id),
          "special_ids": tuple(int(i) for i in tokenizer.all_special_ids),
          "vocab_size": int(len(tokenizer))}


# --------------------------------------------------------------------------- loss and step

def token_log_probs(logits_BxPxV, targets_BxP):
  """log p(target) at every scored position: (B, P)."""
  logp = jax.nn.log_softmax(logits_BxPxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_BxP[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mlm_loss(logits_BxPxV, targets_BxP, weights_BxP):
  """Mean cross-entropy over the positions of weight > 0 (their weighted mean)."""
  nll = -token_log_probs(logits_BxPxV, targets_BxP)
  return jnp.sum(nll * weights_BxP) / jnp.maximum(jnp.sum(weights_BxP), 1.0)


def mlm_step(state: dict, batch: dict, key: jax.Array, *, model, tx: optax.GradientTransformation,
             trainable: PyTree | None = None) -> tuple[dict, dict]:
  """One MLM step of one member (a `train.init_pytree_state` / `members.init_state` state).

  Args:
    state: {"params", "opt_state", "step", ...}.
    batch: `mask_tokens` output for B texts.
    key: the dropout key.
    model: a `bert.BertMLM`.
    tx: the optimizer (frozen leaves: `optim.freeze` with the same mask).
    trainable: tree of bools like the params; False leaves get `stop_gradient`.

  Returns:
    (new state, {"loss", "accuracy" (of the scored tokens), "grad_norm"}).
  """
  def loss_of(params):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    logits = model.apply({"params": params}, batch["ids"], batch["positions"], train=True,
                         rngs={"dropout": key}).logits
    return mlm_loss(logits, batch["targets"], batch["weights"]), logits

  (loss, logits), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  w = batch["weights"]
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w) / jnp.maximum(w.sum(), 1.0)
  return ({**state, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state, "step": state["step"] + 1},
          {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)})


def make_mlm_batch_fn(ids_per_member: Sequence[np.ndarray], *, seed: int, batch_size: int,
                      rate: float = 0.15, stacked: bool = True, **mask_kwargs
                      ) -> Callable[[int], dict]:
  """`batch_fn(step)`: member k's B texts from `ids_per_member[k]`, masked afresh each step.

  Each member has its own shuffle per epoch of its own texts; the masking is seeded by
  (seed, step, k), so the batches are a pure function of the step (exact resumption).

  Args:
    ids_per_member: K arrays (N_k, L) of token ids (one domain's texts each).
    seed: data order and masking.
    batch_size: texts per member and step.
    rate: masking rate.
    stacked: True: arrays (K, B, ...); False (K = 1 only): (B, ...).
    **mask_kwargs: `mask_id`, `special_ids`, `vocab_size` (`tokenizer_specials`).
  """
  if not len(ids_per_member):
    raise ValueError("Need at least one member's texts.")
  if not stacked and len(ids_per_member) != 1:
    raise ValueError("stacked=False is for one member.")
  for k, ids in enumerate(ids_per_member):
    if len(ids) < batch_size:
      raise ValueError(f"Member {k} has {len(ids)} texts, fewer than batch_size={batch_size}.")
  from ensembling import data
  orders = [data.batch_indices_fn(seed + k, num_examples=len(ids), batch_size=batch_size,
                                  num_members=1)[0] for k, ids in enumerate(ids_per_member)]

  def batch_fn(step: int) -> dict:
    parts = [mask_tokens(ids[order(step)[0]], rate=rate, seed=(seed, int(step), k),
                         **mask_kwargs)
             for k, (ids, order) in enumerate(zip(ids_per_member, orders))]
    out = {n: np.stack([p[n] for p in parts]) for n in parts[0]}
    return out if stacked else {n: v[0] for n, v in out.items()}

  return batch_fn


# --------------------------------------------------------------------------- training

def init_adapters(params: PyTree, model: bert.BertMLM, *, num: int, seed: int) -> PyTree:
  """`num` fresh adapters of `model` (its lora_rank / adapter_size), stacked: (num, ...).

  Args:
    params: base params (without the "params" key); only their shapes matter here.
    model: a `BertMLM` with adapters switched on.
    num: how many.
    seed: adapter k is initialised from `split(key(seed), num)[k]`.
  """
  if not (model.lora_rank or model.adapter_size):
    raise ValueError("The model has no adapters: set lora_rank or adapter_size.")
  ids = jnp.full((1, 4), model.cfg.pad_token_id + 1, jnp.int32)
  init = lambda k: bert.adapter_params(model.init(k, ids, train=False)["params"])
  keys = jax.random.split(jax.random.key(seed), members.check_num_members(num))
  return jax.jit(jax.vmap(init))(keys)  # one compiled program, not op-by-op dispatch


class FitResult(NamedTuple):
  """What `fit_mlm` returns: the trained params (stacked for K members), the records, seconds."""
  params: PyTree
  history: list
  seconds: float


def fit_mlm(params: PyTree, model: bert.BertMLM, batch_fn: Callable[[int], dict], *,
            trainable: str | Sequence[str], tx: optax.GradientTransformation, num_steps: int,
            seed: int = 0, stacked: bool = False, workdir: str | None = None,
            progress: bool = False, desc: str = "MLM") -> FitResult:
  """Trains the leaves of `params` matching `trainable` by MLM through `train.fit`.

  Args:
    params: one model's params, or K members' stacked on axis 0 (`stacked=True`; then
      the step is vmapped over the member axis and member k reads batch k).
    model: the `BertMLM` the params belong to.
    batch_fn: `make_mlm_batch_fn` (stacked like the params).
    trainable: regexes over "a/b/c" paths, e.g. "^mlm_head/" or `bert.ADAPTER_PATTERN`;
      every other leaf is frozen (`optim.freeze`: zero updates, no optimizer state).
    tx: the optimizer of the trained leaves.
    num_steps: optimizer steps.
    seed: dropout keys.
    stacked: whether `params` has a member axis.
    workdir: `train.fit`'s (metrics.jsonl, checkpoints; None: nothing written).
    progress, desc: the progress bar.

  Returns:
    A `FitResult`; frozen leaves are bit-identical to the input.
  """
  one = tree_lib.index(params, 0) if stacked else params
  mask = optim.trainable_mask(one, trainable)
  tx = optim.freeze(tx, one, trainable=mask)
  step_fn = lambda s, b, k: mlm_step(s, b, k, model=model, tx=tx, trainable=mask)
  if stacked:
    num = tree_lib.num_members(params)
    state = members.init_states({"params": params}, tx)
    step = members.MemberStep(step_fn, strategy="vmap", num_members=num, donate=True)
  else:
    state = train.init_pytree_state(params, tx)
    step = jax.jit(step_fn)
  t0 = time.perf_counter()
  state, _, history = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=int(num_steps),
                                key=jax.random.key(seed), workdir=workdir,
                                eval_every=max(1, int(num_steps) // 10), progress=progress,
                                desc=desc)
  return FitResult(state["params"], history, time.perf_counter() - t0)
