"""Writing results: JSON, a Markdown table, and PNG plots into a workdir."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ensembling import ensemble, metrics

METRIC_NAMES = ("accuracy", "nll", "ece", "brier")


def ensemble_report(logits_KxBxC, labels_B, *, num_bins: int = 15, val_logits=None,
                    val_labels=None, ood_logits=None) -> dict[str, Any]:
  """Every member and every combination of them, on one labelled split.

  The best member is the one with the highest accuracy on the validation split
  (`val_logits` (K, V, C), `val_labels`), as a held-out selection must be; without one it
  is selected on this split itself and `best_member["selected_on"]` says "test".

  Returns a dict with `members` (list of metric dicts), `best_member` (its index,
  `selected_on` and metrics on this split), `mean_member` (mean over members of each
  metric), `ensemble`
  (probability averaging), `logit_average`, `vote` (accuracy only: vote shares are
  not calibrated probabilities), `disagreement` (K x K), `mean_disagreement` and
  `accuracy_vs_members` (the prob. average of the first k members, k = 1..K).

  With `ood_logits` (the same members' logits on OOD sets) it also has `ood` and
  `auroc_<set>` columns in every row (see `with_ood_columns`).
  """
  logits = np.asarray(logits_KxBxC)
  probs_K = ensemble.members_probs(logits)
  per = [metrics.classification_metrics(p, labels_B, num_bins=num_bins) for p in probs_K]
  if val_logits is not None and len(np.asarray(val_labels)):
    val_acc = [metrics.accuracy(p, val_labels) for p in ensemble.members_probs(val_logits)]
    if len(val_acc) != len(per):
      raise ValueError(f"val_logits has {len(val_acc)} members, logits {len(per)}.")
    best, selected_on = int(np.argmax(val_acc)), "validation"
  else:
    best, selected_on = max(range(len(per)), key=lambda i: per[i]["accuracy"]), "test"
  preds = probs_K.argmax(-1)
  logit_probs = np.asarray(ensemble.average_probs(ensemble.average_logits(logits)[None]))
  out = {
      "members": per,
      "best_member": {"index": best, "selected_on": selected_on, **per[best]},
      "mean_member": {n: float(np.mean([p[n] for p in per])) for n in METRIC_NAMES},
      "ensemble": metrics.classification_metrics(
          np.asarray(ensemble.average_probs(logits)), labels_B, num_bins=num_bins),
      "logit_average": metrics.classification_metrics(logit_probs, labels_B, num_bins=num_bins),
      "vote": {"accuracy": metrics.accuracy(np.asarray(ensemble.vote(logits)), labels_B)},
      "disagreement": metrics.disagreement_matrix(preds).tolist(),
      "mean_disagreement": metrics.mean_disagreement(preds),
      "accuracy_vs_members": accuracy_vs_members(logits, labels_B),
  }
  return out if ood_logits is None else with_ood_columns(out, logits, ood_logits)


def accuracy_vs_members(logits_KxBxC, labels_B) -> list[float]:
  """Test accuracy of the prob-average of the first k members, k = 1..K."""
  cum = np.asarray(ensemble.cumulative_average_probs(np.asarray(logits_KxBxC)))
  return [metrics.accuracy(p, labels_B) for p in cum]


def markdown_table(rows: Sequence[tuple[str, Mapping[str, float]]],
                   columns: Sequence[str] = METRIC_NAMES, *, digits: int = 4) -> str:
  """A Markdown table: one row per (name, metrics); missing metrics print as '-'."""
  head = "| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
  body = ""
  for name, vals in rows:
    cells = []
    for c in columns:
      v = vals.get(c)
      cells.append("-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v)))
    body += f"| {name} | " + " | ".join(cells) + " |\n"
  return head + body


def ensemble_rows(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, float]]]:
  rows = [(f"member {i}", m) for i, m in enumerate(report["members"])]
  best = report["best_member"]
  how = "by validation accuracy" if best.get("selected_on") == "validation" else "selected on test"
  rows += [(f"best member ({best['index']}, {how})", best),
           ("mean member", report["mean_member"]),
           ("ensemble (prob. average)", report["ensemble"]),
           ("ensemble (logit average)", report["logit_average"]),
           ("ensemble (vote)", report["vote"])]
  return rows


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON (NumPy values made plain); only process 0 writes."""
  if not _primary():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=_to_builtin)


def cached(path: str, *, key: str, compute: Callable[[], Any]) -> Any:
  """`compute()`'s JSON-able result, stored at `path` with `key` and reused while it matches.

  For evaluations that outlive a session: a rerun that finds `path` written under the
  same `key` (derive it from everything the result depends on, e.g. `checkpoint.checksum`
  of the evaluated weights and the data) returns the stored result without calling
  `compute`. A file with another key, or one that does not parse, is recomputed and
  overwritten (logged), never trusted. The stored value is the JSON round trip of the
  computed one, so the first call returns that round trip too: both calls agree exactly.

  Args:
    path: the JSON file.
    key: identifies what the result was computed from.
    compute: produces the result (dicts, lists, numbers, strings, NumPy scalars/arrays).

  Returns:
    The result as plain Python values (NumPy arrays become lists).
  """
  if not key:
    raise ValueError("cached: key must be a non-empty string.")
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      if not isinstance(stored, dict) or set(stored) != {"key", "value"}:
        raise ValueError("not a {key, value} object")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      logging.warning("%s is unreadable (%s): recomputing.", path, e)
    else:
      if stored["key"] == key:
        return stored["value"]
      logging.info("%s was computed from other inputs: recomputing.", path)
  value = json.loads(json.dumps(compute(), default=_to_builtin))
  if _primary():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"key": key, "value": value}, f)
    os.replace(tmp, path)  # a crash mid-write leaves the old file or none, never half
  return value


def _to_builtin(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"Not JSON serialisable: {type(x)}")


def _primary() -> bool:
  from ensembling import distributed
  return distributed.is_primary()


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_curve(path: str, xs, ys_by_label: Mapping[str, Sequence[float]], *, xlabel: str,
               ylabel: str, title: str = "") -> None:
  if not _primary():  # one process writes the plots
    return
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, ys in ys_by_label.items():
    ax.plot(xs, ys, marker="o", label=label)
  xs_arr = np.asarray(xs)
  if xs_arr.size and np.issubdtype(xs_arr.dtype, np.integer):  # members, epochs: whole ticks
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_panels(path: str, xs, panels: Mapping[str, Mapping[str, Sequence[float]]], *,
                xlabel: str, title: str = "") -> None:
  """One figure with a panel per entry of `panels` ({ylabel: {label: ys}}), side by side."""
  if not _primary():
    return
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
  for ax, (ylabel, ys_by_label) in zip(axes[0], panels.items()):
    for label, ys in ys_by_label.items():
      ax.plot(xs, ys, marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0][0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_matrix(path: str, matrix, *, title: str = "pairwise disagreement",
                labels: Sequence[str] | None = None) -> None:
  if not _primary():  # one process writes the plots
    return
  plt = _pyplot()
  m = np.asarray(matrix)
  fig, ax = plt.subplots(figsize=(4.5, 4))
  im = ax.imshow(m, cmap="viridis")
  ax.set_xticks(range(m.shape[1]))  # one tick per member, nothing between them
  ax.set_yticks(range(m.shape[0]))
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
              color="w" if m[i, j] < m.max() / 2 else "k")
  if labels is not None:
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
  import textwrap
  ax.set_title("\n".join(textwrap.wrap(title, 40)), fontsize=9)  # long titles wrap, not cut
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------- several seeds

def seed_summary(per_seed: Sequence[Mapping[str, float]],
                 columns: Sequence[str] = ("accuracy", "nll", "ece", "disagreement")
                 ) -> dict[str, float]:
  """Mean and std over seeds of each column present: {name, name_std}."""
  out = {}
  for n in columns:
    vals = [r[n] for r in per_seed if n in r]
    if vals:
      out[n] = float(np.mean(vals))
      out[n + "_std"] = float(np.std(vals))
  return out


def seed_cell(summary: Mapping[str, float], name: str, num_seeds: int, *,
              digits: int = 4) -> str:
  """"mean ± std" over several seeds, the plain value for one seed, '-' when absent."""
  if name not in summary:
    return "-"
  if num_seeds == 1:
    return f"{summary[name]:.{digits}f}"
  return f"{summary[name]:.{digits}f} ± {summary[name + '_std']:.{digits}f}"


def seed_table(results: Mapping[str, Mapping[str, Sequence[Mapping]]],
               columns: Sequence[str] = ("accuracy", "nll", "ece", "disagreement")) -> str:
  """A Markdown table of {group: {row: per-seed metrics}}: mean ± std per column."""
  head = ("| method | row | " + " | ".join(columns) + " |\n|---|---|"
          + "---|" * len(columns) + "\n")
  body = ""
  for group, rows in results.items():
    for row, per_seed in rows.items():
      s = seed_summary(per_seed, columns)
      cells = [seed_cell(s, c, len(per_seed)) for c in columns]
      body += f"| {group} | {row} | " + " | ".join(cells) + " |\n"
  return head + body


# --------------------------------------------------------------------------- tables of cells
# (added with the soups / SuperNet launchers, issue 13)

def cell(value, *, digits: int = 4) -> str:
  """One table cell: floats with `digits` decimals, None as '-', anything else as str."""
  if value is None:
    return "-"
  if isinstance(value, (float, np.floating)):
    return f"{value:.{digits}f}"
  return str(value)


def cells_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], *,
                digits: int = 4) -> str:
  """A Markdown table from a header and rows of cells (see `cell`).

  >>> print(cells_table(["", "acc"], [["a", 0.5], ["b", None]]), end="")
  | | acc |
  |---|---|
  | a | 0.5000 |
  | b | - |
  """
  line = lambda cells: ("| " + " | ".join(cell(c, digits=digits) for c in cells)
                        + " |\n").replace("|  |", "| |")
  return line(header) + "|" + "---|" * len(header) + "\n" + "".join(line(r) for r in rows)


# --------------------------------------------------------------------------- OOD columns

OOD_SCORE = "predictive_entropy"  # the score of the auroc_<set> columns (defined for K >= 1)


def with_ood_columns(report: Mapping[str, Any], logits_KxBxC, ood_logits, *,
                     score: str = OOD_SCORE) -> dict[str, Any]:
  """An `ensemble_report` with OOD detection added (`uncertainty.ood_report`).

  Args:
    report: what `ensemble_report` returned for `logits_KxBxC` (not modified).
    logits_KxBxC: the in-distribution logits of the K members.
    ood_logits: {set name: (K, M, C) logits of the same members on that OOD set}, or one
      array (named "ood").
    score: the uncertainty score of the `auroc_<set>` columns.

  Returns:
    A new report with `ood[set] = {"ensemble": ood_report of the members' probabilities
    (all scores), "members": [each member's as a single model]}` and `auroc_<set>` (the
    `score`'s AUROC) in every member's, the best and mean member's and the ensemble's
    metrics.
  """
  from ensembling import uncertainty
  sets = ood_logits if isinstance(ood_logits, Mapping) else {"ood": ood_logits}
  logits = np.asarray(logits_KxBxC)
  probs_in = ensemble.members_probs(logits)
  out = {**report, "ood": {}, "members": [dict(m) for m in report["members"]],
         "ensemble": dict(report["ensemble"]), "mean_member": dict(report["mean_member"]),
         "best_member": dict(report["best_member"])}
  for name, lg in sets.items():
    lg = np.asarray(lg)
    if lg.ndim != 3 or lg.shape[0] != logits.shape[0] or lg.shape[2] != logits.shape[2]:
      raise ValueError(f"ood_logits[{name!r}] has shape {lg.shape}; it must hold the same "
                       f"{logits.shape[0]} members' logits over {logits.shape[2]} classes: "
                       f"(K={logits.shape[0]}, M, C={logits.shape[2]}).")
    probs_out = ensemble.members_probs(lg)
    per = [uncertainty.ood_report(p, q) for p, q in zip(probs_in, probs_out)]
    out["ood"][name] = {"ensemble": uncertainty.ood_report(probs_in, probs_out), "members": per}
    col = f"auroc_{name}"
    out["ensemble"][col] = out["ood"][name]["ensemble"][score]["auroc"]
    for m, r in zip(out["members"], per):
      m[col] = r[score]["auroc"]
    out["mean_member"][col] = float(np.mean([r[score]["auroc"] for r in per]))
    out["best_member"][col] = per[report["best_member"]["index"]][score]["auroc"]
  return out
