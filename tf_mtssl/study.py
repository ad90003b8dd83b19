"""A small study: grids of pretraining configurations x seeds, every trunk evaluated by one protocol at
several points of pretraining (issue 19; `tf_mtssl.studies`).

  python -m tf_mtssl.study --flagfile=flags/study_fashion_mnist.cfg   # random, rp, ex, rp+ex
  python -m tf_mtssl.study --flagfile=flags/study_photos.cfg          # the natural-photo grid
  python -m tf_mtssl.study --flagfile=flags/study_fashion_mnist.cfg --quick --output_dir=/tmp/q

Writes --output_dir/results.md, results.csv, results.json and PNG plots (probe accuracy vs
pretraining steps, the lasso alpha heatmap, per-task trunk update norms and pretext metrics over
training). Runs and evaluations live in --work_dir keyed by their configuration: run the same command
again after a kill and it resumes, never redoing a finished evaluation. --quick shrinks everything
(tiny trunk, 32-px inputs, 6 steps, a few hundred probe examples) to check the machinery in about a
minute; its numbers mean nothing. The flags: StudySettings (tf_mtssl.studies.run), the optimiser fields
of TrainConfig, TrunkConfig, --lasso_l1 and every task's options.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import sys

from absl import app, flags

from tf_mtssl import cli
from tf_mtssl import tasks as task_registry
from tf_mtssl.model.lasso import LassoConfig
from tf_mtssl.model.trunk import TrunkConfig
from tf_mtssl.pretraining.config import TrainConfig
from tf_mtssl.studies import run as study_run

cli.define_flags(study_run.StudySettings)
cli.define_flags(TrainConfig, exclude=study_run.TRAIN_EXCLUDED, defaults=study_run.TRAIN_DEFAULTS)
cli.define_flags(TrunkConfig)
cli.define_flags(LassoConfig, exclude=("mode",))
cli.define_task_flags()


def study_config_from_flags():
  """The study the flags describe (after --quick's overrides)."""
  if flags.FLAGS.quick:
    for name, value in study_run.QUICK.items():
      flags.FLAGS[name].parse(value)
  settings = cli.config_from_flags(study_run.StudySettings)
  return settings, study_run.study_config(
      settings, cli.config_from_flags(TrainConfig, exclude=study_run.TRAIN_EXCLUDED),
      cli.config_from_flags(TrunkConfig), cli.config_from_flags(LassoConfig, exclude=("mode",)),
      {n: cli.task_options_from_flags(n) for n in task_registry.registered_tasks()})


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  settings, study = study_config_from_flags()
  study_run.run(study, settings, "python -m tf_mtssl.study " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  app.run(cli.run_main(main))
