"""Shared-head alignment (seed 000): train ArcFace models, align them to the best one's
frozen head, and compare naive vs aligned averaging of their embeddings."""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ensembling import data, losses, members, metrics, models, optim, report, schedules
from ensembling import shared_head, train
from ensembling import tree as tree_lib

log = logging.getLogger(__name__)


def resize(x: np.ndarray, size: int, *, chunk: int = 10000) -> np.ndarray:
  """NHWC images resized to size x size with `jax.image.resize` (linear, antialiased)."""
  if x.shape[1] == size and x.shape[2] == size:
    return x
  fn = jax.jit(lambda a: jax.image.resize(a, (a.shape[0], size, size, a.shape[3]), "linear"))
  return np.concatenate([np.asarray(fn(x[s:s + chunk])) for s in range(0, len(x), chunk)])


def train_arcface(config, spec, x, y, xv, yv, *, seed: int, workdir: str):
  """Trains one ArcFace model; returns (model, variables)."""
  model = models.make_arcface_model(spec.model, num_classes=int(y.max()) + 1,
                                    embedding_dim=config.arcface.embedding_dim,
                                    scale=config.arcface.scale)
  batch_fn, steps_per_epoch = train.make_batch_fn(x, y, seed=seed, batch_size=config.batch_size,
                                                  num_members=1)
  total = steps_per_epoch * int(config.epochs)
  tx = optim.optimizer_from_config(
      config.optim, schedule=schedules.make_schedule(config.optim, total_steps=total))
  state = members.init_states(members.init_members(jax.random.key(seed), model, x[:1], 1), tx)
  loss_fn = functools.partial(losses.arcface_loss_from_logits, scale=config.arcface.scale,
                              margin=config.arcface.margin)
  _, step_fn, eval_fn = train.member_fns(config, model, tx, state, eval_x=xv, eval_y=yv,
                                         loss_fn=loss_fn)
  state, _, _ = train.fit(state, step_fn=step_fn, batch_fn=batch_fn, num_steps=total,
                          key=jax.random.key(seed + 1), workdir=workdir, eval_fn=eval_fn,
                          eval_every=steps_per_epoch, checkpoint_every=total,
                          progress=config.progress, desc=spec.name,
                          steps_per_epoch=steps_per_epoch)
  return model, tree_lib.index(members.variables_of(state), 0)


def _encoder(model, variables, mode: str, adapter_input: str = "features"):
  """(encoder params, encode_fn, in_dim or None, trainable) for one model to align."""
  if mode == "adapter" and adapter_input == "embedding":
    # frozen backbone + its own embedding layer (seed 000's f_i) -> new linear layer
    encode_fn = shared_head.flax_encoder(model.apply, train_mode=False)
    return variables, encode_fn, -1, shared_head.ADAPTER_ONLY
  if mode == "adapter":  # frozen backbone features -> new linear layer -> shared head
    if adapter_input != "features":
      raise ValueError(f"Unknown align.adapter_input {adapter_input!r}; use features or "
                       "embedding.")
    enc = {"params": variables["params"]["backbone"]}
    if "batch_stats" in variables:
      enc["batch_stats"] = variables["batch_stats"]["backbone"]
    encode_fn = shared_head.flax_encoder(model.backbone.apply, train_mode=False)
    return enc, encode_fn, -1, shared_head.ADAPTER_ONLY
  if mode == "finetune":  # the whole backbone + embedding layer under the shared head
    encode_fn = shared_head.flax_encoder(model.apply, train_mode="batch_stats" not in variables)
    return variables, encode_fn, None, ("^encoder/params/(backbone|embed)/",)
  raise ValueError(f"Unknown alignment mode {mode!r}; use adapter or finetune.")


def span_diagnostic(emb: dict, head, y_test, y_index, *, k: int) -> dict:
  """How much of a model's query embeddings its own head pins, and where retrieval is.

  `fraction`: mean share of the squared norm of the normalised test embeddings in the
  span of the head's centres (the part an ArcFace head constrains); mP@k of the
  retrieval with only the part inside / outside that span (None: nothing outside).
  """
  test, index = (shared_head.head_span_parts(emb[w], head) for w in ("test", "index"))
  mp = lambda a, b: float(metrics.mean_precision_at_k(a, y_test, b, y_index, k=k))
  has_outside = float(np.abs(test[1]).max(initial=0.0)) > 1e-6
  return {"fraction": float(np.mean(np.sum(test[0] ** 2, axis=1))),
          f"mP@{k} inside": mp(test[0], index[0]),
          f"mP@{k} outside": mp(test[1], index[1]) if has_outside else None}


def run_group(config, name: str, group, splits, workdir: str, retrieval=None) -> dict:
  """Trains, aligns and evaluates one group of models.

  Models are trained, selected (validation mP@k) and aligned on `splits`. Retrieval is
  measured with queries = test images, index = training images of `retrieval`: the same
  `splits` by default (closed set, plus Acc@1/Acc@5 through the heads), or the held-out
  classes of `data.split_classes` (open set: classes no model saw; mP@k only).
  """
  k_eval = int(config.eval.k)
  if config.align.method not in ("arcface", "procrustes", "lstsq"):
    raise ValueError(f"Unknown align.method {config.align.method!r}; use arcface, procrustes "
                     "or lstsq.")
  open_set = retrieval is not None
  retrieval = splits if retrieval is None else retrieval
  select_on = config.align.get("select_on", "train_classes")
  if select_on not in ("train_classes", "retrieval"):
    raise ValueError(f"Unknown align.select_on {select_on!r}; use train_classes or retrieval.")
  # "retrieval": pick the shared head on the validation split of the retrieval classes
  # (the held-out ones in the open set), queries vs the retrieval index, never on test.
  select_on_retrieval = open_set and select_on == "retrieval"
  n_index = min(int(config.eval.index_size) or len(retrieval.x_train), len(retrieval.x_train))
  n_test = min(int(config.eval.get("test_size", 0)) or len(retrieval.x_test),
               len(retrieval.x_test))
  y_index, y_val, y_test = retrieval.y_train[:n_index], splits.y_val, retrieval.y_test[:n_test]
  specs = list(group.models)
  trained, inputs = [], []
  t0 = time.time()
  for i, spec in enumerate(specs):
    r = spec.resolution
    xs = {"train": resize(splits.x_train, r), "val": resize(splits.x_val, r),
          "test": resize(retrieval.x_test[:n_test], r)}
    xs["index"] = resize(retrieval.x_train[:n_index], r) if open_set else xs["train"][:n_index]
    if select_on_retrieval:
      xs["rval"] = resize(retrieval.x_val, r)
    inputs.append(xs)
    trained.append(train_arcface(config, spec, xs["train"], splits.y_train, xs["val"], y_val,
                                 seed=config.seed + 100 * i,
                                 workdir=os.path.join(config.models_dir or workdir, name,
                                                      spec.name)))
  t_train = time.time() - t0

  def own_embeddings(i):
    """The model's own embeddings: fit (training images the closed-form maps read), val,
    test (queries) and index."""
    model, variables = trained[i]
    fn = shared_head.flax_encoder(model.apply, train_mode=False)
    p = {"encoder": variables, "adapter": {}}
    out = {w: shared_head.embed(p, inputs[i][w], encode_fn=fn)
           for w in ("val", "test", "index", "rval") if w in inputs[i]}
    out["fit"] = (shared_head.embed(p, inputs[i]["train"][:n_index], encode_fn=fn) if open_set
                  else out["index"])
    return out

  own = [own_embeddings(i) for i in range(len(specs))]
  heads = [{"centers": v["params"]["head"]["centers"]} for _, v in trained]
  span = [span_diagnostic(own[i], heads[i], y_test, y_index, k=k_eval)
          for i in range(len(specs))]
  y_fit = splits.y_train[:len(own[0]["fit"])]
  if select_on_retrieval:
    val_mp = [shared_head.evaluate_space(own[i]["rval"], retrieval.y_val, own[i]["index"],
                                         y_index, None, k=k_eval)[f"mP@{k_eval}"]
              for i in range(len(specs))]
  else:
    val_mp = [shared_head.evaluate_space(own[i]["val"], y_val, own[i]["fit"], y_fit, None,
                                         k=k_eval)[f"mP@{k_eval}"] for i in range(len(specs))]
  best = shared_head.select_best(val_mp)
  shared = heads[best]
  log.info("%s: validation mP@%d %s; best = %s", name, k_eval, np.round(val_mp, 4),
           specs[best].name)

  # Align every other model to the best one's frozen head.
  t0 = time.time()
  aligned, frozen_ok = [], []
  for i, spec in enumerate(specs):
    if i == best:
      aligned.append(own[i])
      continue
    if config.align.method != "arcface":
      # Closed form, label-free: a linear map from this model's embeddings of the
      # training images to the shared model's embeddings of the same images.
      adapter = shared_head.fit_linear_adapter(own[i]["fit"], own[best]["fit"],
                                               method=config.align.method)
      aligned.append({w: shared_head.normalize(shared_head.apply_linear_adapter(
          adapter, shared_head.normalize(own[i][w]))) for w in ("test", "index")})
      frozen_ok.append(None)  # nothing is trained: no model parameter can move
      continue
    model, variables = trained[i]
    enc, encode_fn, in_dim, trainable = _encoder(model, variables, group.mode,
                                                 config.align.adapter_input)
    if in_dim == -1:
      in_dim = int(np.asarray(encode_fn(enc, inputs[i]["train"][:2], train=False,
                                        key=None)).shape[1])
    params = shared_head.init_aligned(jax.random.key(config.seed + 7 + i), encoder=enc,
                                      head=shared, in_dim=in_dim)
    before = jax.tree.map(np.array, params)
    lr = config.align.adapter_lr if group.mode == "adapter" else config.align.finetune_lr
    steps = int(config.align.epochs) * (len(splits.y_train) // int(config.align.batch_size))
    tx = optim.make_optimizer(name=config.align.optimizer,
                              learning_rate=schedules.warmup_cosine(lr, steps))
    params, loss = shared_head.fit_aligned(
        params, inputs[i]["train"], splits.y_train, tx=tx, trainable=trainable,
        num_steps=steps, batch_size=int(config.align.batch_size), encode_fn=encode_fn,
        scale=config.arcface.scale, margin=config.arcface.margin, seed=config.seed + i)
    labels = shared_head.trainable_labels(params, trainable=trainable)
    unchanged = all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for lab, a, b in zip(jax.tree.leaves(labels), jax.tree.leaves(params),
                             jax.tree.leaves(before)) if lab == "frozen")
    frozen_ok.append(unchanged)
    log.info("%s/%s aligned: loss %.3f -> %.3f; frozen leaves unchanged: %s", name,
             spec.name, loss[:50].mean(), loss[-50:].mean(), unchanged)
    aligned.append({w: shared_head.embed(params, inputs[i][w], encode_fn=encode_fn)
                    for w in ("test", "index")})
  t_align = time.time() - t0

  # Test split: queries = test images, index = training images (of the held-out classes
  # in the open set, where the heads' classes do not apply and only mP@k is reported).
  def ev(emb, head):
    return shared_head.evaluate_space(emb["test"], y_test, emb["index"], y_index,
                                      None if open_set else head, k=k_eval)

  rows = {"traditional": {}, "ours": {}}
  for i, spec in enumerate(specs):
    rows["traditional"][spec.name] = ev(own[i], heads[i])
    rows["ours"][spec.name] = ev(aligned[i], shared)
  naive, ours = ({w: shared_head.combine([e[i][w] for i in range(len(specs))])
                  for w in ("test", "index")} for e in (own, aligned))
  rows["traditional"]["mean"] = ev(naive, shared)
  rows["ours"]["mean"] = ev(ours, shared)
  prob_avg = None
  if not open_set:  # for context: the usual classifier ensemble of the models' own heads
    probs = np.mean([np.asarray(jax.nn.softmax(config.arcface.scale * shared_head.classify(
        own[i]["test"], heads[i]))) for i in range(len(specs))], axis=0)
    prob_avg = {"Acc@1": metrics.top_k_accuracy(probs, y_test, k=1),
                "Acc@5": metrics.top_k_accuracy(probs, y_test, k=5)}
  return {"group": name, "mode": group.mode, "adapter_input": config.align.adapter_input,
          "method": config.align.method, "open_set": open_set,
          "models": [s.name for s in specs],
          "val_mP": val_mp, "selected_on": "retrieval" if select_on_retrieval else
          "train_classes", "best": specs[best].name, "rows": rows,
          "own_heads_prob_average": prob_avg, "head_span": span, "frozen_leaves_unchanged": frozen_ok,
          "train_seconds": t_train, "align_seconds": t_align,
          "index_size": n_index, "num_queries": n_test}


def table(res: dict, k: int) -> str:
  names = res["models"] + ["mean"]
  mp = f"mP@{k}"
  lines = ["| | metric | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for kind in ("traditional", "ours"):
    for metric in ("Acc@1", "Acc@5", mp):
      if metric not in res["rows"][kind]["mean"]:
        continue  # open set: no head applies to the held-out classes
      cells = [f"{res['rows'][kind][n][metric]:.4f}" for n in names]
      lines.append(f"| {kind} | {metric} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  splits = data.load(config.data, seed=config.seed)
  held_out = tuple(config.eval.get("held_out_classes", ()))
  retrieval = None
  if held_out:  # open set: train on the other classes, retrieve the held-out ones
    splits, retrieval = data.split_classes(splits, held_out=held_out)
  k = int(config.eval.k)
  results = {"data": splits.describe(), "groups": {}}
  if retrieval is not None:
    results["retrieval_data"] = retrieval.describe()
  md = [f"# Shared-head alignment of ArcFace models on {splits.name} (test split)\n"]
  for name, group in config.groups.items():
    res = run_group(config, name, group, splits, workdir, retrieval)
    results["groups"][name] = res
    best = res["rows"]["traditional"][res["best"]]
    top = max(res["models"], key=lambda n: res["rows"]["traditional"][n][f"mP@{k}"])
    how = res["mode"] + (f" from {res['adapter_input']}" if res["mode"] == "adapter" else "")
    if res["method"] != "arcface":
      how = f"closed-form {res['method']} map of the embeddings, no labels"
    where = (f"held-out classes {list(held_out)} (open set: no model was trained on them)"
             if held_out else "all classes")
    md.append(f"\n## {name} ({how}); shared head = {res['best']}\n\n")
    md.append(f"Queries: {res['num_queries']} test images; index: {res['index_size']} "
              f"training images; {where}. 'mean' = average of the L2-normalised embeddings"
              + ("" if held_out else ", classified by the shared head")
              + " (traditional: unaligned embeddings).\n\n")
    md.append(table(res, k))
    md.append(f"\nShared-head model ({res['best']}): mP@{k} {best[f'mP@{k}']:.4f}"
              + (f", Acc@1 {best['Acc@1']:.4f}" if "Acc@1" in best else "")
              + f". Best single model on test mP@{k}: {top} "
              f"{res['rows']['traditional'][top][f'mP@{k}']:.4f}. ")
    if res["own_heads_prob_average"] is not None:
      md.append(f"Prob. average of the models' own heads: Acc@1 "
                f"{res['own_heads_prob_average']['Acc@1']:.4f}. ")
    sp = res["head_span"]
    outside = [s[f"mP@{k} outside"] for s in sp]
    md.append(f"Queries' own embeddings vs the span of their own head's centres: share of "
              f"the squared norm inside {[round(s['fraction'], 3) for s in sp]}; mP@{k} "
              f"with the part inside {[round(s[f'mP@{k} inside'], 4) for s in sp]}, "
              f"outside {[None if o is None else round(o, 4) for o in outside]}. ")
    md.append(f"Validation mP@{k} (shared head chosen on {res['selected_on']}): "
              f"{np.round(res['val_mP'], 4).tolist()}. Frozen leaves "
              f"bit-identical after alignment: {res['frozen_leaves_unchanged']}. Train "
              f"{res['train_seconds']:.0f}s, align {res['align_seconds']:.0f}s.\n")
  report.write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("".join(md))
  return results
