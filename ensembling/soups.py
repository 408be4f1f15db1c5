"""Model soups: one model whose weights average several fine-tuned ingredients.

Wortsman et al. (2022), "Model soups", and the pruned soup of seed 002:

- `uniform_soup`: the plain average of all ingredients;
- `greedy_soup`: go through the ingredients (sorted by held-out score, or in a random
  or given order) and add one only if the held-out score of the soup does not drop
  (Recipe 1: the first ingredient is always taken);
- `pruned_soup`: start from the uniform soup and, for `passes` passes, remove one
  ingredient at a time if the held-out score does not drop;
- `learned_soup`: softmax mixing coefficients (global or one set per parameter leaf)
  and an output temperature, trained with optax on held-out batches.

Ingredients are a list of identically shaped pytrees or one stacked pytree (member
axis first). Ingredients with NaN/inf values are skipped with a warning. Every soup
returns a `SoupResult`: the params, the ingredients used (indices into the input),
their mixing weights, and the held-out scores that were seen.

Candidate soups are evaluated in batches: `eval_fn` is traced once and vmapped over the
candidates' mixing weights, so one pass over K candidates is one jitted call instead of
K. The greedy and pruned loops stay exactly the sequential algorithms: the candidates
of a batch are only valid until one of them is accepted, and everything after an
accepted candidate is re-evaluated against the new soup (speculative evaluation;
`evaluation="loop"` evaluates one candidate at a time and gives the same result).
On a 2-core CPU batching measured slower than the loop (the forward passes are
compute bound and speculation re-does work after each acceptance), so the default
"auto" picks "loop" on CPU and "vmap" on accelerators.

Soups of models with BatchNorm must recompute the batch statistics of the averaged
weights; do that inside `eval_fn` (and again for the returned soup).

Around the recipes: `compare_soups` makes every soup of one set of ingredients (what the
soups experiment tabulates), `accuracy_fn` / `temperature_loss_fn` / `held_out_batches`
build its scores from any model of the contract (`models.as_model`), and
`random_hyperparams` / `finetune_state` / `finetune_step` fine-tune K ingredients from one
model in one member-parallel run, each with its own learning rate, weight decay, number
of steps and augmentation (seed 002).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import checks, losses, members, optim, train
from ensembling import tree as tree_lib
from ensembling.data import augment
from ensembling.models.contract import as_model

PyTree = Any
EVALUATIONS = ("auto", "vmap", "loop", "python")


class SoupResult(NamedTuple):
  """What a soup procedure returns.

  Attributes:
    params: the soup (one pytree, same structure as one ingredient).
    indices: the ingredients in the soup, as indices into the input, in the order
      they were added (greedy) or kept (others).
    weights: mixing weights over all input ingredients, shape (K,) (0 for unused
      ones); for a per-layer learned soup, (L, K) with one row per parameter leaf.
    score: held-out score of the soup (NaN when no `eval_fn` was given).
    individual_scores: (K,) held-out score of every ingredient (NaN for skipped
      ones, or None when not computed).
    history: every candidate evaluated, as (indices, score, accepted) tuples.
    info: method-specific extras (temperature, loss curve, ...).
  """
  params: PyTree
  indices: tuple[int, ...]
  weights: np.ndarray
  score: float
  individual_scores: np.ndarray | None
  history: tuple
  info: dict


# --------------------------------------------------------------------------- input

def prepare_ingredients(ingredients: PyTree | Sequence[PyTree], *,
                        stacked: bool | None = None) -> tuple[PyTree, np.ndarray, int]:
  """Validates ingredients; returns (finite ingredients stacked, their indices, K).

  Raises ValueError on an empty list, mismatched structures, shapes or dtypes (say
  float16 and float32 of one leaf), non-float leaves, a pytree that is one unstacked
  model rather than K stacked ones, or when no ingredient is finite. Non-finite
  ingredients are dropped with a warning.

  Args:
    ingredients: a list of pytrees, or one stacked pytree (member axis first).
    stacked: for a pytree, True confirms it is stacked even when some leaf would be a
      scalar per member (otherwise taken for one unstacked model and refused).
  """
  if isinstance(ingredients, (list, tuple)):
    if len(ingredients) == 0:
      raise ValueError("Expected at least one soup ingredient, got an empty list.")
    tree_lib.check_same_structure(list(ingredients), what="ingredients")
    ref = tree_lib.named_leaves(ingredients[0])
    for i, t in enumerate(ingredients[1:], start=1):
      for (name, a), (_, b) in zip(ref, tree_lib.named_leaves(t)):
        if jnp.asarray(a).dtype != jnp.asarray(b).dtype:
          raise ValueError(f"ingredients 0 and {i} differ in dtype at '{name}': "
                           f"{jnp.asarray(a).dtype} vs {jnp.asarray(b).dtype}; cast them to "
                           "one dtype first.")
  if not jax.tree.leaves(ingredients):
    raise ValueError("Soup ingredients have no array leaves.")
  if not isinstance(ingredients, (list, tuple)):
    leaves = tree_lib.named_leaves(ingredients)
    leading = {np.shape(x)[0] if np.ndim(x) else None for _, x in leaves}
    if len(leading) != 1 or None in leading:
      raise ValueError("Soup ingredients given as one pytree must be stacked (member axis "
                       f"first), but its leaves' leading sizes differ ({sorted(map(str, leading))})"
                       ": this looks like one unstacked model. Pass a list of models, or "
                       "tree.stack(models).")
    scalars = [n for n, x in leaves if np.ndim(x) == 1]
    if scalars and stacked is not True:
      raise ValueError(f"Soup ingredients look like one unstacked model: as a stack of "
                       f"{len(leading and [0]) and next(iter(leading))} members, leaf "
                       f"'{scalars[0]}' would be a scalar per member. Pass a list of models, "
                       "or stacked=True if it really is a stack.")
  stacked = tree_lib.as_stacked(ingredients)
  for name, x in tree_lib.named_leaves(stacked):
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
      raise ValueError(f"Soup ingredients must be floating point; '{name}' is {x.dtype}.")
  k = tree_lib.num_members(stacked)
  finite = tree_lib.finite_members(stacked)
  valid = np.flatnonzero(finite)
  if len(valid) == 0:
    raise ValueError(f"All {k} soup ingredients contain NaN or inf values.")
  if len(valid) < k:
    warnings.warn(f"Skipping soup ingredient(s) {np.flatnonzero(~finite).tolist()} of {k}: "
                  "they contain NaN or inf values.", RuntimeWarning, stacklevel=3)
    stacked = tree_lib.take(stacked, valid)
  return stacked, valid, k


def _uniform_rows(sets: Sequence[Sequence[int]], n: int) -> np.ndarray:
  w = np.zeros((len(sets), n), np.float32)
  for r, s in enumerate(sets):
    w[r, list(s)] = 1.0 / len(s)
  return w


@functools.lru_cache(maxsize=16)
def _batched_eval(eval_fn: Callable, batch_size: int | None) -> Callable:
  """jit(candidate weights -> scores), cached so repeated soups with one `eval_fn`
  compile once."""
  def many(s, w_CxK):
    one = lambda w: jnp.asarray(eval_fn(tree_lib.weighted_sum(s, w)), jnp.float32)
    if batch_size:
      return jax.lax.map(one, w_CxK, batch_size=batch_size)
    return jax.vmap(one)(w_CxK)
  return jax.jit(many)


@functools.lru_cache(maxsize=16)
def _single_eval(eval_fn: Callable) -> Callable:
  return jax.jit(lambda s, w: jnp.asarray(eval_fn(tree_lib.weighted_sum(s, w)), jnp.float32))


class _Evaluator:
  """Scores candidate soups given as rows of mixing weights over the ingredients."""

  def __init__(self, stacked: PyTree, eval_fn: Callable, evaluation: str,
               batch_size: int | None):
    if evaluation not in EVALUATIONS:
      raise ValueError(f"Unknown evaluation {evaluation!r}; choose one of {EVALUATIONS}.")
    self.stacked, self.eval_fn, self.evaluation = stacked, eval_fn, evaluation
    self.n = tree_lib.num_members(stacked)
    self.why = ""
    if evaluation == "auto":  # measured: benchmarks/soup_candidates.py, docs/results_soups.md
      evaluation = "loop" if jax.default_backend() == "cpu" else "vmap"
      try:  # a plain Python eval_fn (float(), NumPy) cannot be traced: call it as it is
        jax.eval_shape(lambda w: eval_fn(tree_lib.weighted_sum(stacked, w)),
                       jnp.full((self.n,), 1.0 / self.n, jnp.float32))
      except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
              jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError) as e:
        evaluation = "python"
        self.why = f"eval_fn cannot be traced ({type(e).__name__}); called in Python"
    self.evaluation = evaluation
    # candidates scored per call: all of a pass when batched; one at a time otherwise
    # (no speculation, so nothing is evaluated twice)
    self.window = None if evaluation == "vmap" else 1
    self.calls = 0
    if evaluation == "vmap":
      self._many = _batched_eval(eval_fn, batch_size)
    elif evaluation == "loop":
      self._one = _single_eval(eval_fn)

  def __call__(self, w_CxK: np.ndarray, *, pad_to: int | None = None) -> np.ndarray:
    c = len(w_CxK)
    if self.evaluation in ("loop", "python"):
      out = []
      for w in w_CxK:
        if self.evaluation == "loop":
          out.append(float(self._one(self.stacked, jnp.asarray(w))))
        else:
          out.append(float(self.eval_fn(tree_lib.weighted_sum(self.stacked, jnp.asarray(w)))))
        self.calls += 1
      return np.asarray(out, np.float64)
    if pad_to and c < pad_to:  # one compiled shape for every pass
      w_CxK = np.concatenate([w_CxK, np.repeat(w_CxK[:1], pad_to - c, axis=0)])
    self.calls += 1
    return np.asarray(self._many(self.stacked, jnp.asarray(w_CxK)), np.float64)[:c]

  def describe(self) -> str:
    """How candidates were scored, for `SoupResult.info["evaluation"]`."""
    return f"{self.evaluation}: {self.why}" if self.why else self.evaluation


def _check_scores(scores: np.ndarray, what: str) -> None:
  """Every score NaN means the held-out evaluation is broken: say so, never soup on it."""
  s = np.asarray(scores, np.float64)
  if s.size and np.isnan(s).all():
    raise ValueError(f"eval_fn returned NaN for every {what}; check the held-out evaluation "
                     "(data, BatchNorm statistics) before making a soup.")
  if np.isnan(s).any():
    warnings.warn(f"eval_fn returned NaN for {int(np.isnan(s).sum())} of {s.size} {what}; "
                  "they never win a comparison.", RuntimeWarning, stacklevel=3)


def _resolve_order(order, scores: np.ndarray, n: int, key) -> list[int]:
  """Local positions 0..n-1 in the order the procedure visits them."""
  if isinstance(order, str):
    if order == "sorted":  # decreasing held-out score, ties by index
      return sorted(range(n), key=lambda i: (-scores[i], i))
    if order == "ascending":
      return sorted(range(n), key=lambda i: (scores[i], i))
    if order == "given":
      return list(range(n))
    if order == "random":
      if key is None:
        raise ValueError("order='random' needs a `key` (a jax PRNG key or an int seed).")
      seed = key if isinstance(key, (int, np.integer)) else int(
          jax.random.randint(key, (), 0, 2**31 - 1))
      return np.random.default_rng(seed).permutation(n).tolist()
    raise ValueError(f"Unknown order {order!r}; use 'sorted', 'ascending', 'random', "
                     "'given' or a sequence of ingredient indices.")
  raise TypeError("internal: explicit orders are mapped before _resolve_order")


def _explicit_order(order, valid: np.ndarray, k: int) -> list[int] | None:
  """Maps an explicit order (input indices) to local positions; None for named orders."""
  if isinstance(order, str):
    return None
  idx = [int(i) for i in order]
  if sorted(idx) != sorted(set(idx)) or any(not 0 <= i < k for i in idx):
    raise ValueError(f"order must list distinct ingredient indices in [0, {k}), got {idx}.")
  pos = {int(g): p for p, g in enumerate(valid)}
  return [pos[i] for i in idx if i in pos]  # skipped (non-finite) ingredients drop out


def _weights_over_all(local_w: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
  w = np.zeros(local_w.shape[:-1] + (k,), np.float32)
  w[..., valid] = local_w
  return w


def _individual_scores(evaluate: _Evaluator, n: int) -> np.ndarray:
  return evaluate(np.eye(n, dtype=np.float32), pad_to=n)


def _full_scores(local: np.ndarray | None, valid, k) -> np.ndarray | None:
  if local is None:
    return None
  s = np.full((k,), np.nan)
  s[valid] = local
  return s


# --------------------------------------------------------------------------- soups

def uniform_soup(ingredients: PyTree | Sequence[PyTree], eval_fn: Callable | None = None
                 ) -> SoupResult:
  """The equal-weight average of all (finite) ingredients.

  Args:
    ingredients: list of pytrees, or one stacked pytree (member axis first).
    eval_fn: optional `params -> scalar` held-out score (higher is better) of the soup.

  Returns:
    A `SoupResult`; `score` is NaN without `eval_fn`.
  """
  stacked, valid, k = prepare_ingredients(ingredients)
  params = tree_lib.mean(stacked)
  score = float(eval_fn(params)) if eval_fn is not None else float("nan")
  w = _weights_over_all(np.full((len(valid),), 1.0 / len(valid), np.float32), valid, k)
  history = ((tuple(valid.tolist()), score, True),) if eval_fn is not None else ()
  return SoupResult(params, tuple(valid.tolist()), w, score, None, history, {})


def greedy_soup(ingredients: PyTree | Sequence[PyTree], eval_fn: Callable, *,
                order: str | Sequence[int] = "sorted", key=None,
                evaluation: str = "auto", batch_size: int | None = None) -> SoupResult:
  """Greedy soup (Wortsman et al. 2022, Recipe 1).

  Visits the ingredients in `order`; the first is always taken, every next one is
  added if the uniform average of the soup plus it scores at least as well as the
  soup so far (ties are accepted, as in Recipe 1's `>=`).

  Args:
    ingredients: list of pytrees, or one stacked pytree (member axis first).
    eval_fn: `params -> scalar` held-out score, higher is better. With
      `evaluation="vmap"` it must be traceable by JAX (it is vmapped over candidates).
    order: "sorted" (decreasing individual held-out score; the paper's recipe),
      "ascending", "random" (needs `key`), "given" (input order), or a sequence of
      ingredient indices (unlisted ingredients are never visited).
    key: a jax PRNG key or an int seed for order="random".
    evaluation: how candidates are scored; every mode gives the same soup.
      "vmap": the candidates of a pass together, `eval_fn` vmapped over them in one
      jitted call; "loop": one jitted call per candidate; "python": `eval_fn` called
      as is (need not be traceable); "auto": "loop" on CPU (where batching measured
      slower, docs/results_soups.md), "vmap" on accelerators.
    batch_size: with "vmap", evaluate at most this many candidates at once
      (`jax.lax.map(..., batch_size=)`) to bound memory; None: all at once.

  Returns:
    A `SoupResult`; `indices` lists the ingredients in the order they were added.
  """
  stacked, valid, k = prepare_ingredients(ingredients)
  n = len(valid)
  evaluate = _Evaluator(stacked, eval_fn, evaluation, batch_size)
  ind = _individual_scores(evaluate, n)
  _check_scores(ind, "ingredient")
  seq = _explicit_order(order, valid, k)
  if seq is None:
    seq = _resolve_order(order, ind, n, key)
  if not seq:
    raise ValueError("order visits no (finite) ingredient.")
  chosen = [seq[0]]
  best = ind[seq[0]]
  history = [((int(valid[seq[0]]),), float(best), True)]
  pos = 1
  while pos < len(seq):
    block = seq[pos:][:evaluate.window]
    scores = evaluate(_uniform_rows([chosen + [j] for j in block], n), pad_to=n)
    for j, s in zip(block, scores):
      pos += 1
      accepted = bool(s >= best)
      history.append((tuple(int(valid[i]) for i in chosen + [j]), float(s), accepted))
      if accepted:  # later candidates of this batch assumed the old soup: redo them
        chosen.append(j)
        best = s
        break
  w = _weights_over_all(_uniform_rows([chosen], n)[0], valid, k)
  params = tree_lib.weighted_sum(stacked, jnp.asarray(_uniform_rows([chosen], n)[0]))
  return SoupResult(params, tuple(int(valid[i]) for i in chosen), w, float(best),
                    _full_scores(ind, valid, k), tuple(history),
                    {"order": [int(valid[i]) for i in seq], "eval_calls": evaluate.calls,
                     "evaluation": evaluate.describe()})


def pruned_soup(ingredients: PyTree | Sequence[PyTree], eval_fn: Callable, *,
                passes: int | None = None, order: str | Sequence[int] = "sorted", key=None,
                evaluation: str = "auto", batch_size: int | None = None) -> SoupResult:
  """Pruned soup (seed 002): remove ingredients from the uniform soup while it helps.

  Starts from the uniform soup of all ingredients with its held-out score as the
  baseline. Each pass visits the ingredients still in the soup in `order` and removes
  one if the uniform average of the rest scores at least the baseline (which then
  becomes that score). The last ingredient is never removed. Stops early once a pass
  removes nothing (further passes would repeat it exactly).

  Args:
    ingredients: list of pytrees, or one stacked pytree (member axis first).
    eval_fn: `params -> scalar` held-out score, higher is better (traceable for "vmap").
    passes: the maximum number of passes N (>= 1); None (the default): until a pass
      removes nothing (at most K - 1 passes). One pass can stop short: on a toy problem
      one sorted pass scored below the best single ingredient, passes to convergence
      above it (tests/soups_test.py).
    order: visiting order within a pass: "sorted" (decreasing individual score, as in
      the seed), "ascending" (worst first), "random" (needs `key`), "given", or a
      sequence of ingredient indices (unlisted ones are never removed).
    key: a jax PRNG key or an int seed for order="random".
    evaluation: "auto" | "vmap" | "loop" | "python", as for `greedy_soup`.
    batch_size: with "vmap", the most candidates evaluated at once (None: all).

  Returns:
    A `SoupResult`; `indices` lists the kept ingredients in increasing order.
  """
  if passes is not None and passes < 1:
    raise ValueError(f"passes must be >= 1 (or None: until nothing changes), got {passes}.")
  stacked, valid, k = prepare_ingredients(ingredients)
  passes = max(len(valid) - 1, 1) if passes is None else passes
  n = len(valid)
  evaluate = _Evaluator(stacked, eval_fn, evaluation, batch_size)
  seq = _explicit_order(order, valid, k)
  needs_scores = seq is None and order in ("sorted", "ascending")
  ind = _individual_scores(evaluate, n) if needs_scores else None
  if seq is None:
    seq = _resolve_order(order, ind, n, key)
  chosen = list(range(n))
  base = float(evaluate(_uniform_rows([chosen], n), pad_to=n)[0])
  if ind is not None:
    _check_scores(np.append(ind, base), "candidate soup")
  elif np.isnan(base):
    raise ValueError("eval_fn returned NaN for the uniform soup; check the held-out "
                     "evaluation before pruning.")
  history = [(tuple(valid.tolist()), base, True)]
  done_passes = 0
  for _ in range(passes):
    done_passes += 1
    removed_any = False
    queue = [i for i in seq if i in chosen]
    while queue and len(chosen) > 1:
      block = queue[:evaluate.window]
      cands = [[c for c in chosen if c != i] for i in block]
      scores = evaluate(_uniform_rows(cands, n), pad_to=n)
      for i, rest, s in zip(block, cands, scores):
        queue.pop(0)
        accepted = bool(s >= base)
        history.append((tuple(int(valid[c]) for c in rest), float(s), accepted))
        if accepted:  # the rest of this batch assumed the old soup: redo them
          chosen.remove(i)
          base = float(s)
          removed_any = True
          break
    if not removed_any:
      break
  row = _uniform_rows([chosen], n)[0]
  params = tree_lib.weighted_sum(stacked, jnp.asarray(row))
  return SoupResult(params, tuple(int(valid[i]) for i in chosen),
                    _weights_over_all(row, valid, k), base, _full_scores(ind, valid, k),
                    tuple(history),
                    {"order": [int(valid[i]) for i in seq], "passes_run": done_passes,
                     "eval_calls": evaluate.calls, "evaluation": evaluate.describe()})


def mix(stacked: PyTree, logits, *, per_layer: bool = False) -> PyTree:
  """sum_k softmax(logits)_k * ingredient_k; logits (K,) or, per layer, (L, K).

  "Per layer" means one set of coefficients per parameter leaf, in
  `jax.tree.leaves` order.
  """
  if not per_layer:
    return tree_lib.weighted_sum(stacked, jax.nn.softmax(logits))
  leaves, treedef = jax.tree.flatten(stacked)
  w = jax.nn.softmax(logits, axis=-1)
  if w.shape[0] != len(leaves):
    raise ValueError(f"per-layer logits have {w.shape[0]} rows for {len(leaves)} leaves.")
  out = [jnp.tensordot(w[i].astype(x.dtype), x, axes=1) for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def learned_soup(ingredients: PyTree | Sequence[PyTree], loss_fn: Callable,
                 batches: Sequence[PyTree] | Callable[[int], PyTree], *,
                 steps: int = 100, learning_rate: float = 0.05, per_layer: bool = False,
                 learn_temperature: bool = True,
                 optimizer: optax.GradientTransformation | None = None,
                 eval_fn: Callable | None = None) -> SoupResult:
  """Learned soup: mixing coefficients and a temperature trained on held-out data.

  Minimises `sum_j L(beta * f(x_j, sum_i alpha_i theta_i), y_j)` over
  `alpha = softmax(a)` (one `a` per ingredient, or per ingredient and parameter leaf
  with `per_layer`) and `beta = exp(b)`, starting from the uniform soup and beta = 1.

  Args:
    ingredients: list of pytrees, or one stacked pytree (member axis first).
    loss_fn: `(params, batch, temperature) -> scalar` held-out loss of a soup, where
      the model's logits are multiplied by `temperature` (beta); traceable by JAX.
    batches: a sequence of held-out batches (cycled) or `step -> batch`.
    steps: optimisation steps.
    learning_rate: for the default optimizer, `optax.adam(learning_rate)`.
    per_layer: one set of mixing coefficients per parameter leaf.
    learn_temperature: train beta too (else beta stays 1).
    optimizer: any optax transformation, overriding the default.
    eval_fn: optional `params -> scalar` score of the final soup.

  Returns:
    A `SoupResult` with `weights` (K,) or (L, K); `info` holds `temperature`,
    `losses` (per step) and `effective_ingredients` (1 / sum w^2, averaged over rows).
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  stacked, valid, k = prepare_ingredients(ingredients)
  n = len(valid)
  num_leaves = len(jax.tree.leaves(stacked))
  coef = {"a": jnp.zeros((num_leaves, n) if per_layer else (n,), jnp.float32),
          "b": jnp.zeros((), jnp.float32)}
  tx = optimizer or optax.adam(learning_rate)
  if not learn_temperature:  # beta stays exactly 1 and carries no optimizer state
    tx = optim.freeze(tx, coef, trainable="^a$")
  if not callable(batches) and len(batches) == 0:
    raise ValueError("learned_soup needs at least one held-out batch.")
  get = batches if callable(batches) else (lambda t: batches[t % len(batches)])

  def objective(c, batch, key):
    del key
    return loss_fn(mix(stacked, c["a"], per_layer=per_layer), batch, jnp.exp(c["b"]))

  state, _, history = train.fit(train.init_pytree_state(coef, tx),
                                step_fn=train.pytree_step(objective, tx), batch_fn=get,
                                num_steps=int(steps), key=jax.random.key(0), eval_every=1,
                                progress=False, desc="learned soup")
  coef = state["params"]
  losses = [r["train_loss"] for r in history]
  params = mix(stacked, coef["a"], per_layer=per_layer)
  w_local = np.asarray(jax.nn.softmax(coef["a"], axis=-1))
  w = _weights_over_all(w_local, valid, k)
  eff = float(np.mean(1.0 / np.sum(np.atleast_2d(w_local) ** 2, axis=-1)))
  score = float(eval_fn(params)) if eval_fn is not None else float("nan")
  return SoupResult(params, tuple(valid.tolist()), w, score, None,
                    ((tuple(valid.tolist()), score, True),) if eval_fn else (),
                    {"temperature": float(jnp.exp(coef["b"])), "losses": losses,
                     "effective_ingredients": eff})


# --------------------------------------------------------------------------- scoring helpers

def accuracy_fn(model, x, y) -> Callable[[PyTree], jax.Array]:
  """A traceable, jitted `params -> accuracy` of `model` on (x, y): an `eval_fn` for the soups.

  Args:
    model: anything `models.as_model` accepts (without BatchNorm: a soup of BN models
      needs its statistics recomputed, see the module docstring).
    x, y: the held-out inputs and labels (moved to the device once).

  Returns:
    `params -> scalar` accuracy in inference mode: compiled once per params structure
    (x and y are its arguments, not constants baked into the program), so a direct
    call runs compiled, and inside `jax.vmap` / `jax.jit` it traces as usual.

  >>> import jax, numpy as np, flax.linen as nn
  >>> net = nn.Dense(2)
  >>> x = np.ones((4, 3), np.float32)
  >>> p = net.init(jax.random.key(0), x)["params"]
  >>> float(accuracy_fn(net, x, np.argmax(net.apply({"params": p}, x), -1))(p))
  1.0
  """
  m = as_model(model)
  xj, yj = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def score(params, x_in, y_in):
    out, _ = m.apply({"params": params}, x_in, train=False)
    return jnp.mean(jnp.argmax(out.logits, -1) == y_in)
  return lambda params: score(params, xj, yj)


def loss_accuracy_fn(model, x, y) -> Callable[[PyTree], dict[str, float]]:
  """`params -> {"loss", "accuracy"}` of `model` on (x, y), as Python floats.

  For curves along weight space (`align.interpolation_curve`, `align.barrier`): the
  forward pass is jitted, the mean cross-entropy and accuracy computed from its logits.

  Args:
    model: anything `models.as_model` accepts.
    x, y: the evaluation inputs and labels.

  Returns:
    The evaluation function (inference mode; not traceable: it returns floats).
  """
  m = as_model(model)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  forward = jax.jit(lambda p: m.apply({"params": p}, xj, train=False)[0].logits)

  def evaluate(params):
    logits = forward(params)
    return {"loss": float(losses.softmax_cross_entropy(logits, yj)),
            "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == yj))}
  return evaluate


def temperature_loss_fn(model, *, loss: Callable = losses.softmax_cross_entropy) -> Callable:
  """`(params, batch, temperature) -> loss(temperature * logits, y)`: `learned_soup`'s loss.

  Args:
    model: anything `models.as_model` accepts.
    loss: `(logits, labels) -> scalar`.

  Returns:
    The loss function of `{"x", "y"}` batches (inference mode).
  """
  m = as_model(model)

  def loss_fn(params, batch, temperature):
    out, _ = m.apply({"params": params}, batch["x"], train=False)
    return loss(temperature * out.logits, batch["y"])
  return loss_fn


def held_out_batches(x, y, *, batch_size: int) -> list[dict[str, jax.Array]]:
  """(x, y) cut into `{"x", "y"}` batches of `batch_size` (the remainder is dropped; with
  fewer than `batch_size` examples, one batch of all of them).

  >>> [b["x"].shape[0] for b in held_out_batches(np.zeros((7, 2)), np.zeros(7), batch_size=3)]
  [3, 3]
  """
  if len(x) == 0 or len(x) != len(y):
    raise ValueError(f"held_out_batches needs as many labels as inputs, and at least one: got "
                     f"{len(x)} inputs and {len(y)} labels.")
  batch_size = checks.integer(batch_size, name="batch_size")
  n = max(1, len(x) // int(batch_size))
  cut = lambda a, i: jnp.asarray(a[i * batch_size:(i + 1) * batch_size])
  return [{"x": cut(x, i), "y": cut(y, i)} for i in range(n)]


# --------------------------------------------------------------------------- every soup at once

SOUPS = {  # compare_soups' names -> table labels ({n}: the number of random orders)
    "uniform": "uniform soup", "greedy_random": "greedy soup (random, mean of {n})",
    "greedy_sorted": "greedy soup (sorted)", "pruned_random": "pruned soup (random, mean of {n})",
    "pruned_sorted": "pruned soup (sorted)", "learned_global": "learned soup (global)",
    "learned_per_layer": "learned soup (per layer)"}


def compare_soups(ingredients: PyTree | Sequence[PyTree], eval_fn: Callable, *,
                  passes: int | None = None, random_orders: int = 1,
                  loss_fn: Callable | None = None,
                  batches: Sequence[PyTree] | Callable[[int], PyTree] | None = None,
                  learned_steps: int = 0, learned_lr: float = 0.05,
                  evaluation: str = "auto", batch_size: int | None = None
                  ) -> dict[str, list[SoupResult]]:
  """Every soup of the same ingredients, selected on the same held-out score.

  Uniform; greedy in `random_orders` random orders (keys 0, 1, ...) and sorted by
  held-out score; pruned (`passes`) in the same random orders and sorted; and, with
  `learned_steps` and a `loss_fn`, learned soups with global and per-layer coefficients.

  Args:
    ingredients: list of pytrees, or one stacked pytree (member axis first).
    eval_fn: `params -> scalar` held-out score, higher is better (see `accuracy_fn`).
    passes: the pruned soups' maximum number of passes.
    random_orders: how many random orders the random greedy / pruned soups use.
    loss_fn: the learned soups' `(params, batch, temperature) -> loss`
      (`temperature_loss_fn`).
    batches: the learned soups' held-out batches (`held_out_batches`).
    learned_steps: Adam steps of each learned soup (0: no learned soups).
    learned_lr: their learning rate.
    evaluation, batch_size: how candidates are scored (see `greedy_soup`).

  Returns:
    {name: [SoupResult, ...]} in the order of `SOUPS` (one result per random order, one
    otherwise); the greedy results carry every ingredient's `individual_scores`.

  >>> import numpy as np
  >>> ings = [{"w": np.full(2, v, np.float32)} for v in (1.0, 3.0)]
  >>> res = compare_soups(ings, lambda p: -abs(p["w"][0] - 2.0), evaluation="python")
  >>> res["uniform"][0].params["w"].tolist(), res["greedy_sorted"][0].indices
  ([2.0, 2.0], (0, 1))
  """
  kw = dict(evaluation=evaluation, batch_size=batch_size)
  orders = range(int(random_orders))
  out = {
      "uniform": [uniform_soup(ingredients, eval_fn)],
      "greedy_random": [greedy_soup(ingredients, eval_fn, order="random", key=s, **kw)
                        for s in orders],
      "greedy_sorted": [greedy_soup(ingredients, eval_fn, order="sorted", **kw)],
      "pruned_random": [pruned_soup(ingredients, eval_fn, passes=passes, order="random", key=s,
                                    **kw) for s in orders],
      "pruned_sorted": [pruned_soup(ingredients, eval_fn, passes=passes, order="sorted", **kw)],
  }
  if learned_steps:
    if loss_fn is None or batches is None:
      raise ValueError("learned soups (learned_steps > 0) need a loss_fn and batches.")
    for name, per_layer in (("learned_global", False), ("learned_per_layer", True)):
      out[name] = [learned_soup(ingredients, loss_fn, batches, steps=int(learned_steps),
                                learning_rate=learned_lr, per_layer=per_layer,
                                eval_fn=eval_fn)]
  return out


# --------------------------------------------------------------------------- fine-tuned ingredients

HYPERPARAMS = ("lr", "steps", "shift", "flip")  # what `finetune_step` reads from state["hp"]


def random_hyperparams(num: int, *, steps_per_epoch: int, max_epochs: int,
                       lr_range: tuple[float, float], wd_range: tuple[float, float],
                       max_shift: int, seed: int) -> dict[str, np.ndarray]:
  """Fine-tuning hyperparameters for `num` ingredients, drawn as in seed 002.

  Log-uniform peak learning rate and weight decay, epochs uniform in 1..max_epochs,
  a shift bound uniform in 0..max_shift and a coin-flip for horizontal flips, all from
  `np.random.default_rng(seed)` (in the order: epochs, lr, weight_decay, shift, flip).

  Args:
    num: K ingredients.
    steps_per_epoch: turns epochs into `steps`.
    max_epochs: the largest number of epochs an ingredient draws.
    lr_range, wd_range: (low, high) of the log-uniform draws.
    max_shift: the largest shift bound (pixels).
    seed: the draws' seed.

  Returns:
    {"lr", "weight_decay" (float32), "epochs", "steps", "shift" (int32), "flip" (bool)},
    each of shape (K,).

  >>> hp = random_hyperparams(3, steps_per_epoch=10, max_epochs=2, lr_range=(0.01, 0.1),
  ...                         wd_range=(1e-5, 1e-3), max_shift=2, seed=0)
  >>> bool(np.all(hp["steps"] == 10 * hp["epochs"])), sorted(hp)
  (True, ['epochs', 'flip', 'lr', 'shift', 'steps', 'weight_decay'])
  """
  rng = np.random.default_rng(seed)
  loguni = lambda lo, hi: np.exp(rng.uniform(np.log(lo), np.log(hi), num)).astype(np.float32)
  epochs = rng.integers(1, int(max_epochs) + 1, num)
  return {"lr": loguni(*lr_range), "weight_decay": loguni(*wd_range),
          "epochs": epochs.astype(np.int32),
          "steps": (epochs * int(steps_per_epoch)).astype(np.int32),
          "shift": rng.integers(0, int(max_shift) + 1, num).astype(np.int32),
          "flip": rng.random(num) < 0.5}


def finetune_state(variables: PyTree, hyperparams: dict[str, Any], *,
                   tx: optax.GradientTransformation) -> dict:
  """K members starting from one model, each with its own fine-tuning hyperparameters.

  Args:
    variables: one model's variables ({"params", "batch_stats"?}), copied to every member.
    hyperparams: (K,) arrays: `HYPERPARAMS` (read by `finetune_step`) and optionally
      "weight_decay" (written into the optimizer state).
    tx: an `optim.make_optimizer` transformation with `learning_rate=1.0`: the step's
      rate is its `lr_scale`, set by `finetune_step`.

  Returns:
    The stacked member state (`members.init_states`) with an "hp" entry.
  """
  k = len(np.asarray(hyperparams["lr"]))
  state = members.init_states(tree_lib.broadcast(dict(variables), k), tx)
  if "weight_decay" in hyperparams:
    state["opt_state"] = optim.set_hyperparams(state["opt_state"],
                                               weight_decay=hyperparams["weight_decay"])
  state["hp"] = {n: jnp.asarray(hyperparams[n]) for n in HYPERPARAMS}
  return state


def finetune_step(state, batch, key, *, model, tx: optax.GradientTransformation,
                  loss_fn: Callable = losses.softmax_cross_entropy):
  """One member's fine-tuning step with its own hyperparameters (`state["hp"]`).

  The rate is `hp["lr"]` cosine-decayed to 0 over `hp["steps"]` steps (and 0 after);
  the batch is augmented with `data.augment.random_shift_flip(max_shift=hp["shift"],
  flip=hp["flip"])`. Use it as `step_fn` of `members.ensemble_step` / `train.fit_members`
  on a `finetune_state`.

  Args:
    state: one member's state with "hp" (see `finetune_state`).
    batch: {"x": images (B, H, W, C), "y": (B,)}.
    key: PRNG key (split into augmentation and dropout keys).
    model: anything `models.as_model` accepts.
    tx: the optimizer the state was made with (`lr_scale` injected).
    loss_fn: `(logits, labels) -> scalar`.

  Returns:
    (new state, metrics) as `members.train_step`.
  """
  hp = state["hp"]
  frac = jnp.minimum(state["step"].astype(jnp.float32) / hp["steps"].astype(jnp.float32), 1.0)
  scale = hp["lr"] * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  opt_state = optim.set_hyperparams(state["opt_state"], lr_scale=scale)
  akey, dkey = jax.random.split(key)
  x = augment.random_shift_flip(akey, batch["x"], max_shift=hp["shift"], flip=hp["flip"])
  return members.train_step({**state, "opt_state": opt_state}, {**batch, "x": x}, dkey,
                            model=model, tx=tx, loss_fn=loss_fn)


def finetune(model, variables: PyTree, x, y, *, hyperparams: dict[str, Any], num_steps: int,
             batch_size: int, seed: int, momentum: float = 0.9, **fit_kwargs
             ) -> train.TrainResult:
  """K ingredients fine-tuned from one model in one member-parallel run (seed 002).

  SGD with momentum; member k's rate, weight decay, steps and augmentation come from
  `hyperparams` (e.g. `random_hyperparams`), through `finetune_state` and `finetune_step`.

  Args:
    model: anything `models.as_model` accepts (image inputs: the step augments them).
    variables: the pre-trained model's variables ({"params", ...}), shared start point.
    x, y: training data (member k sees its own order, `train.make_batch_fn(seed=seed)`).
    hyperparams: (K,) arrays "lr", "steps", "shift", "flip" and optionally "weight_decay".
    num_steps: steps to run (at least the largest `hyperparams["steps"]`; after its own
      steps a member's rate is 0).
    batch_size: per member.
    seed: data order and dropout / augmentation keys (`key(seed + 1)`).
    momentum: SGD momentum.
    **fit_kwargs: passed to `train.fit_members` (workdir, eval_data, strategy, ...).

  Returns:
    The `train.TrainResult`; `result.state["params"]` are the K ingredients.
  """
  tx = optim.make_optimizer(name="sgd", learning_rate=1.0, momentum=momentum)  # rate: lr_scale
  return train.fit_members(finetune_state(variables, hyperparams, tx=tx), model, x, y, tx=tx,
                           num_steps=int(num_steps), batch_size=int(batch_size), seed=int(seed),
                           step_fn=finetune_step, **fit_kwargs)
