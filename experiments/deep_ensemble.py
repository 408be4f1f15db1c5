"""Deep ensemble: train K members in parallel, evaluate every way of combining them."""

import logging
import os

import numpy as np

from ensembling import data, members, report, train


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  splits = data.load(config.data, seed=config.seed)
  k = int(config.members)
  model, state, strategy, _ = train.fit_members(config, splits, workdir)

  logits = members.predict(model.apply, members.variables_of(state), splits.x_test,
                           batch_size=config.eval_batch_size, strategy=strategy)
  rep = report.ensemble_report(logits, splits.y_test)
  rep["accuracy_vs_members"] = report.accuracy_vs_members(logits, splits.y_test)
  rep["data"] = splits.describe()
  rep["strategy"] = strategy
  report.write_json(os.path.join(workdir, "results.json"), rep)
  table = (f"# Deep ensemble: {k} x {config.model.name} on {splits.name} (test split)\n\n"
           + report.markdown_table(report.ensemble_rows(rep))
           + f"\nMean pairwise disagreement: {rep['mean_disagreement']:.4f}\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)
  logging.info("Results (%s):\n%s", workdir, table)
  report.plot_curve(os.path.join(workdir, "accuracy_vs_members.png"),
                    np.arange(1, k + 1), {"prob. average": rep["accuracy_vs_members"]},
                    xlabel="members", ylabel="test accuracy")
  report.plot_matrix(os.path.join(workdir, "disagreement.png"), rep["disagreement"],
                     title="pairwise disagreement (test)")
  return rep
