"""Zero-shot composition of domain adapters (Holtermann et al., "What the Weight?!", NAACL 2024).

The framework composes A domain adapters for a text of unknown domain in three choices:

1. scoring: a score per (text, adapter) from `uniform` (none: a seeded random order),
   `sentence` (cosine of the text's sentence embedding to each domain's centroid,
   `cosine_scores`), `tfidf` (cosine of TF-IDF vectors to each domain's TF-IDF centroid,
   `tfidf_scores`), `entropy` (minus each adapter's mean predictive entropy on the text,
   `entropy_scores`) or `prior` (the log share of each domain in the training text,
   `prior_scores`);
2. selection and weighting: the k best-scored adapters, weights the softmax of score /
   temperature over them (`top_k_weights`; `uniform` gives each of its k adapters 1/k);
3. combination: `average` (one adapter, the weighted average of the chosen adapters'
   parameters, `merge_adapters`) or `ensemble` (the weighted mixture of the chosen
   adapters' token distributions, `ensemble_log_probs`).

`adapter_log_probs` runs every adapter on masked texts (one vmapped pass over the adapter
axis; the layers below the first adapted layer run once for all), `merged_log_probs` one
merged adapter per text (vmapped over texts); `perplexity` scores them;
`forward_passes` is each choice's cost. Weights are checked (`check_weights`): finite,
non-negative, summing to one per text, zero for excluded adapters.

Departures from the paper: the base model is all-MiniLM-L6-v2 (a sentence encoder with no
pretrained MLM head: `adapters.fit_mlm` trains one, shared by every adapter) instead of
gpt2-base, so the evaluation is masked-LM perplexity rather than causal-LM perplexity; the
domains are 20 Newsgroups' top-level hierarchies rather than the 21 websites of C4; the
`prior` strategy is the text-independent domain share, not the Bayesian domain posterior
of Li et al. (2022) that the paper's "domain prior" updates with the likelihood of the
evaluated data; `uniform` with k < all takes a seeded random k; adapters are bottleneck
adapters in the top layers only (`bert.BertMLM(adapter_start=...)`, chosen for 2 CPU
cores), and the temperature of each strategy is a fixed hyperparameter.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ensembling import losses
from ensembling import tree as tree_lib
from ensembling.models import bert

PyTree = Any
STRATEGIES = ("uniform", "sentence", "tfidf", "entropy", "prior")
COMBINATIONS = ("average", "ensemble")


# --------------------------------------------------------------------------- scores

def centroids(emb_by_domain: Sequence[np.ndarray]) -> np.ndarray:
  """(A, D): the normalised mean of each domain's L2-normalised embeddings."""
  if not len(emb_by_domain):
    raise ValueError("Need at least one domain's embeddings.")
  out = []
  for a, e in enumerate(emb_by_domain):
    e = np.asarray(e, np.float64)
    if e.ndim != 2 or not len(e):
      raise ValueError(f"Domain {a} has no embeddings (shape {e.shape}); give (N_a, D).")
    out.append(losses.l2_normalize(losses.l2_normalize(e).mean(0)))
  return np.stack(out)


def cosine_scores(emb_NxD: np.ndarray, centroids_AxD: np.ndarray) -> np.ndarray:
  """(N, A) cosine similarity of every text embedding to every domain centroid.

  >>> cosine_scores(np.array([[2.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])).tolist()
  [[1.0, 0.0]]
  """
  e, c = np.asarray(emb_NxD, np.float64), np.asarray(centroids_AxD, np.float64)
  if e.ndim != 2 or c.ndim != 2 or e.shape[1] != c.shape[1]:
    raise ValueError(f"Embeddings {e.shape} and centroids {c.shape} must be (N, D) and (A, D).")
  return losses.l2_normalize(e) @ losses.l2_normalize(c).T


def tfidf_scores(texts: Sequence[str], domain_texts: Sequence[Sequence[str]], *,
                 max_features: int = 20000, sublinear_tf: bool = True) -> np.ndarray:
  """(N, A) cosine of each text's TF-IDF vector to each domain's mean TF-IDF vector.

  The vocabulary and IDF are fit on the domains' (training) texts only.
  """
  from sklearn.feature_extraction.text import TfidfVectorizer
  for a, d in enumerate(domain_texts):
    if not len(d):
      raise ValueError(f"Domain {a} has no text.")
  vec = TfidfVectorizer(max_features=max_features, sublinear_tf=sublinear_tf, dtype=np.float64)
  vec.fit([t for d in domain_texts for t in d])
  cents = np.stack([np.asarray(vec.transform(list(d)).mean(0)).ravel() for d in domain_texts])
  x = vec.transform(list(texts)).toarray()
  return cosine_scores(x + 1e-12, cents + 1e-12)


def entropy_scores(entropy_AxN: np.ndarray) -> np.ndarray:
  """(N, A) minus each adapter's mean predictive entropy on each text (confident = high)."""
  h = np.asarray(entropy_AxN, np.float64)
  if h.ndim != 2:
    raise ValueError(f"entropy must be (A, N), got shape {h.shape}.")
  return -h.T


def prior_scores(sizes_A: Sequence[float], num_texts: int) -> np.ndarray:
  """(N, A) log share of each domain in the training text, the same for every text.

  >>> np.exp(prior_scores([1, 3], 1)).tolist()
  [[0.25, 0.75]]
  """
  s = np.asarray(sizes_A, np.float64)
  if s.ndim != 1 or not len(s) or (s <= 0).any():
    raise ValueError(f"Domain sizes must be positive, got {s.tolist()}.")
  return np.broadcast_to(np.log(s / s.sum()), (int(num_texts), len(s))).copy()


# --------------------------------------------------------------------------- weights

def _available(available, n, a):
  if available is None:
    return np.ones((n, a), bool)
  av = np.asarray(available, bool)
  if av.shape != (n, a):
    raise ValueError(f"available must be (N, A) = {(n, a)}, got {av.shape}.")
  return av


def _check_k(k, av):
  least = int(av.sum(1).min())
  if not 1 <= int(k) <= least:
    raise ValueError(f"k must be in [1, {least}] (the adapters available to every text), "
                     f"got {k}.")


def top_k_weights(scores_NxA: np.ndarray, k: int, *, temperature: float = 1.0,
                  available: np.ndarray | None = None) -> np.ndarray:
  """(N, A): the softmax of score / temperature over each text's k best available adapters.

  Args:
    scores_NxA: higher is better; must be finite on available adapters.
    k: how many adapters per text, in [1, fewest available].
    temperature: > 0; small values approach one-hot on the best adapter.
    available: (N, A) bools, False excludes an adapter for that text (leave-one-domain-out).

  Returns:
    Weights summing to one per row, zero outside the top k. Ties: the lower index first.

  >>> top_k_weights(np.array([[0.0, 2.0, 1.0]]), 1).tolist()
  [[0.0, 1.0, 0.0]]
  """
  s = np.asarray(scores_NxA, np.float64)
  if s.ndim != 2:
    raise ValueError(f"scores must be (N, A), got shape {s.shape}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  av = _available(available, *s.shape)
  _check_k(k, av)
  if not np.isfinite(s[av]).all():
    raise ValueError("scores hold NaN or inf for available adapters.")
  masked = np.where(av, s, -np.inf)
  top = np.argsort(-masked, axis=1, kind="stable")[:, :int(k)]
  chosen = np.zeros(s.shape, bool)
  np.put_along_axis(chosen, top, True, axis=1)
  z = np.where(chosen, s / temperature, -np.inf)
  w = np.exp(z - z.max(1, keepdims=True))
  return w / w.sum(1, keepdims=True)


def random_k_weights(num_texts: int, num_adapters: int, k: int, *, seed: int,
                     available: np.ndarray | None = None) -> np.ndarray:
  """(N, A): weight 1/k on a seeded random k of each text's available adapters."""
  av = _available(available, int(num_texts), int(num_adapters))
  _check_k(k, av)
  rng = np.random.default_rng(seed)
  chosen = top_k_weights(rng.random(av.shape), k, available=av) > 0
  return chosen / float(k)


def strategy_weights(strategy: str, k: int, *, scores_NxA: np.ndarray | None = None,
                     num_adapters: int | None = None, num_texts: int | None = None,
                     temperature: float = 1.0, available: np.ndarray | None = None,
                     seed: int = 0) -> np.ndarray:
  """The (N, A) weights of one scoring strategy (`uniform` needs no scores)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
  if strategy == "uniform":
    if scores_NxA is not None:
      num_texts, num_adapters = np.shape(scores_NxA)
    return random_k_weights(num_texts, num_adapters, k, seed=seed, available=available)
  if scores_NxA is None:
    raise ValueError(f"Strategy {strategy!r} needs scores.")
  return top_k_weights(scores_NxA, k, temperature=temperature, available=available)


def check_weights(weights_NxA, num_adapters: int, *, available=None, atol: float = 1e-5
                  ) -> np.ndarray:
  """The weights as float64 (N, A), or a clear error: shape, NaN, negative, sum != 1.

  >>> check_weights([[0.5, 0.5]], 2).tolist()
  [[0.5, 0.5]]
  """
  w = np.asarray(weights_NxA, np.float64)
  if w.ndim == 1:
    w = w[None]
  if w.ndim != 2 or w.shape[1] != num_adapters:
    raise ValueError(f"weights must be (N, {num_adapters}) (one per adapter), got "
                     f"{np.shape(weights_NxA)}.")
  if not np.isfinite(w).all():
    raise ValueError("weights hold NaN or inf.")
  if (w < 0).any():
    raise ValueError(f"weights must be non-negative, got a minimum of {w.min():g}.")
  sums = w.sum(1)
  if not np.allclose(sums, 1.0, atol=atol):
    bad = int(np.argmax(np.abs(sums - 1.0)))
    raise ValueError(f"weights must sum to one per text; text {bad} sums to {sums[bad]:.6g}.")
  if available is not None and (w[~_available(available, *w.shape)] != 0).any():
    raise ValueError("weights put mass on an excluded adapter.")
  return w


# --------------------------------------------------------------------------- combination

def merge_adapters(adapters_A: PyTree, weights_NxA) -> PyTree:
  """One averaged adapter per text: leaf (A, ...) -> (N, ...), sum_a w[n, a] adapter_a.

  Raises on adapters of different shapes or structures (a list of adapters is stacked
  first, with `tree.check_same_structure`).
  """
  stacked = tree_lib.as_stacked(list(adapters_A) if isinstance(adapters_A, (list, tuple))
                                else adapters_A)
  a = tree_lib.num_members(stacked)
  w = jnp.asarray(check_weights(weights_NxA, a), jnp.float32)
  return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype),
                      stacked)


def ensemble_log_probs(logp_AxNxP: np.ndarray, weights_NxA) -> np.ndarray:
  """(N, P) log of the weighted mixture sum_a w[n, a] p_a(token) at every position.

  >>> lp = np.log(np.array([[[0.2]], [[0.6]]]))
  >>> round(float(np.exp(ensemble_log_probs(lp, [[0.5, 0.5]]))[0, 0]), 6)
  0.4
  """
  lp = np.asarray(logp_AxNxP, np.float64)
  if lp.ndim != 3:
    raise ValueError(f"log-probs must be (A, N, P), got shape {lp.shape}.")
  w = check_weights(weights_NxA, lp.shape[0])
  if w.shape[0] != lp.shape[1]:
    raise ValueError(f"{w.shape[0]} weight rows for {lp.shape[1]} texts.")
  with np.errstate(divide="ignore"):
    logw = np.log(w.T)[:, :, None]
  z = logw + lp
  m = z.max(0)
  return m + np.log(np.exp(z - m).sum(0))


def perplexity(logp_NxP, weights_NxP) -> float:
  """exp of the mean negative log-likelihood over the scored positions (weight > 0)."""
  lp, w = np.asarray(logp_NxP, np.float64), np.asarray(weights_NxP, np.float64)
  if lp.shape != w.shape:
    raise ValueError(f"log-probs {lp.shape} and weights {w.shape} differ in shape.")
  if w.sum() <= 0:
    raise ValueError("No scored position (all weights are zero).")
  return float(np.exp(-(lp * w).sum() / w.sum()))


def forward_passes(strategy: str, combination: str, k: int, num_adapters: int) -> int:
  """Encoder passes per text: scoring (sentence 1, entropy A, else 0) + combination.

  `ensemble` runs its k adapters (entropy's A passes already hold them all), `average`
  one merged adapter (with k = 1 that adapter itself, counted as `ensemble`).

  >>> forward_passes("sentence", "ensemble", 3, 6), forward_passes("entropy", "average", 3, 6)
  (4, 7)
  """
  if strategy not in STRATEGIES or combination not in COMBINATIONS:
    raise ValueError(f"Unknown strategy/combination {strategy!r}/{combination!r}; choose from "
                     f"{STRATEGIES} and {COMBINATIONS}.")
  score = {"sentence": 1, "entropy": num_adapters}.get(strategy, 0)
  if combination == "ensemble" or k == 1:  # one adapter: averaging is ensembling
    return num_adapters if strategy == "entropy" else score + k
  return score + 1


# --------------------------------------------------------------------------- running adapters

def _top_kwargs(model: bert.BertMLM) -> dict:
  return dict(lora_rank=model.lora_rank, lora_alpha=model.lora_alpha,
              adapter_size=model.adapter_size, adapter_start=model.adapter_start)


@functools.lru_cache(maxsize=8)
def _fns(model: bert.BertMLM):
  cfg, start = model.cfg, model.adapter_start

  def top(params, h, ids, pos):  # adapted layers + head for one adapter already in params
    x = bert.run_layers(params, cfg, h, ids, start=start, stop=cfg.num_layers,
                        **_top_kwargs(model))
    return bert.mlm_logits(params, cfg, x, pos)

  def states(base, ids):
    return bert.hidden_states(base, cfg, ids, stop=start)

  def per_adapter(base, adapters_A, h, ids, pos, targets, weights):
    def one(ad):
      logits = top(bert.with_adapter(base, ad), h, ids, pos)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
      ent = -(jnp.exp(logp) * logp).sum(-1)  # (B, P)
      ent = (ent * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
      return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], ent
    return jax.vmap(one)(adapters_A)

  def per_text(base, adapters_B, h, ids, pos, targets):
    def one(ad, h1, ids1, pos1, t1):
      logits = top(bert.with_adapter(base, ad), h1[None], ids1[None], pos1[None])[0]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
      return jnp.take_along_axis(logp, t1[:, None], -1)[:, 0]
    return jax.vmap(one)(adapters_B, h, ids, pos, targets)

  return jax.jit(states), jax.jit(per_adapter), jax.jit(per_text)


def _check_batch(batch):
  missing = {"ids", "positions", "targets", "weights"} - set(batch)
  if missing:
    raise ValueError(f"batch lacks {sorted(missing)} (see adapters.mask_tokens).")


def _chunks(n, size):
  return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def shared_states(params: PyTree, model: bert.BertMLM, batch: dict, *, batch_size: int = 16
                  ) -> np.ndarray:
  """Token states (N, L, D) below the first adapted layer: the same for every adapter.

  Computed once and passed as `states=` to `adapter_log_probs` / `merged_log_probs`, they
  spare every later pass the `model.adapter_start` bottom layers.
  """
  _check_batch(batch)
  fwd = _fns(model)[0]
  n = len(batch["ids"])
  return np.concatenate([np.asarray(fwd(params, _pad(np.asarray(batch["ids"][sl]), batch_size)))
                         [:sl.stop - sl.start] for sl in _chunks(n, batch_size)])


def _states(params, model, batch, states, batch_size):
  if states is None:
    return shared_states(params, model, batch, batch_size=batch_size)
  if np.shape(states)[:2] != np.shape(batch["ids"]):
    raise ValueError(f"states {np.shape(states)} do not match the batch's ids "
                     f"{np.shape(batch['ids'])}.")
  return states


def adapter_log_probs(params: PyTree, model: bert.BertMLM, adapters_A: PyTree, batch: dict,
                      *, batch_size: int = 16, states: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Every adapter on every masked text: log p(target) (A, N, P) and mean entropy (A, N).

  Args:
    params: the base `BertMLM` params (with the MLM head; adapter leaves, if any, are
      replaced).
    model: the `BertMLM` the adapters belong to.
    adapters_A: A adapters stacked on axis 0 (`bert.adapter_params` of stacked members).
    batch: `adapters.mask_tokens` output for N texts (`replace=False` for evaluation).
    batch_size: texts per forward pass (the last chunk is padded to keep one shape).
    states: `shared_states(params, model, batch)` if already computed.
  """
  _check_batch(batch)
  h_all = _states(params, model, batch, states, batch_size)
  fwd = _fns(model)[1]
  n = len(batch["ids"])
  lps, ents = [], []
  for sl in _chunks(n, batch_size):
    b = {k: _pad(np.asarray(v[sl]), batch_size) for k, v in batch.items()}
    lp, ent = fwd(params, adapters_A, _pad(h_all[sl], batch_size), b["ids"], b["positions"],
                  b["targets"], b["weights"])
    m = sl.stop - sl.start
    lps.append(np.asarray(lp)[:, :m])
    ents.append(np.asarray(ent)[:, :m])
  return np.concatenate(lps, 1), np.concatenate(ents, 1)


def merged_log_probs(params: PyTree, model: bert.BertMLM, adapters_A: PyTree, weights_NxA,
                     batch: dict, *, batch_size: int = 16, states: np.ndarray | None = None
                     ) -> np.ndarray:
  """log p(target) (N, P) with one parameter-averaged adapter per text (`merge_adapters`)."""
  _check_batch(batch)
  h_all = _states(params, model, batch, states, batch_size)
  fwd = _fns(model)[2]
  a = tree_lib.num_members(adapters_A)
  w = check_weights(weights_NxA, a)
  n = len(batch["ids"])
  if w.shape[0] != n:
    raise ValueError(f"{w.shape[0]} weight rows for {n} texts.")
  out = []
  for sl in _chunks(n, batch_size):
    merged = merge_adapters(adapters_A, _pad(w[sl], batch_size, fill_first=True))
    b = {k: _pad(np.asarray(v[sl]), batch_size) for k, v in batch.items()}
    lp = fwd(params, merged, _pad(h_all[sl], batch_size), b["ids"], b["positions"],
             b["targets"])
    out.append(np.asarray(lp)[:sl.stop - sl.start])
  return np.concatenate(out)


def _pad(x, size, fill_first=False):
  if len(x) == size:
    return x
  pad = np.repeat(x[:1], size - len(x), axis=0) if fill_first else np.zeros(
      (size - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])
