"""Deep ensemble: train K members in parallel, evaluate every way of combining them."""

import os

import numpy as np

from ensembling import configlib, members, report


def run(config, workdir: str):
  splits = configlib.load_data(config)
  k = int(config.members)
  model, res = configlib.train_members_from_config(config, splits, workdir)
  rep = report.ensemble_report(members.predict(model, res.state, splits.x_test,
                                               batch_size=config.eval_batch_size,
                                               strategy=res.strategy), splits.y_test)
  rep.update(data=splits.describe(), strategy=res.strategy)
  markdown = (f"# Deep ensemble: {k} x {config.model.name} on {splits.name} (test split)\n\n"
              + report.markdown_table(report.ensemble_rows(rep))
              + f"\nMean pairwise disagreement: {rep['mean_disagreement']:.4f}\n")
  report.plot_curve(os.path.join(workdir, "accuracy_vs_members.png"), np.arange(1, k + 1),
                    {"prob. average": rep["accuracy_vs_members"]}, xlabel="members",
                    ylabel="test accuracy")
  report.plot_matrix(os.path.join(workdir, "disagreement.png"), rep["disagreement"],
                     title="pairwise disagreement (test)")
  return rep, markdown
