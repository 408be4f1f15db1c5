"""Deep ensemble: train K members in parallel, evaluate every way of combining them."""

import os

import numpy as np

from ensembling import configlib, members, report, train


def run(config, workdir: str):
  splits = configlib.load_data(config)
  k = int(config.members)
  model, res = configlib.train_members_from_config(config, splits, workdir)
  predict = lambda x: members.predict(model, res.state, x, batch_size=config.eval_batch_size,
                                      strategy=res.strategy)
  rep = report.ensemble_report(predict(splits.x_test), splits.y_test,
                               val_logits=predict(splits.x_val) if len(splits.y_val) else None,
                               val_labels=splits.y_val)
  diverged = train.divergence_warnings(
      res.history, num_classes=splits.num_classes,
      num_examples=len(splits.y_val) or config.batch_size, split="val")
  rep.update(data=splits.describe(), strategy=res.strategy, diverged=diverged)
  markdown = (f"# Deep ensemble: {k} x {config.model.name} on {splits.name} (test split)\n\n"
              + report.markdown_table(report.ensemble_rows(rep))
              + f"\nMean pairwise disagreement: {rep['mean_disagreement']:.4f}\n"
              + "".join(f"\n**Warning:** {m}\n" for m in diverged))
  report.plot_curve(os.path.join(workdir, "accuracy_vs_members.png"), np.arange(1, k + 1),
                    {"prob. average": rep["accuracy_vs_members"]}, xlabel="members",
                    ylabel="test accuracy")
  report.plot_matrix(os.path.join(workdir, "disagreement.png"), rep["disagreement"],
                     title="pairwise disagreement (test)")
  return rep, markdown
