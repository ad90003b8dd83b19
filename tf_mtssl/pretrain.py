"""Self-supervised multi-task pretraining binary.

  python -m tf_mtssl.pretrain --flagfile=flags/rp_col_ex_ms.cfg --model_dir=runs/mtl

Resumes from the newest checkpoint in --model_dir. The flags are the fields of PretrainConfig and
TrainConfig (tf_mtssl.pretraining.config), TrunkConfig and LassoConfig (tf_mtssl.model), and every task's
Options as --<task>_<option> (see --helpfull).

Several workers: start the same command on each with --distribution=multi_worker and TF_CONFIG
naming the cluster and the worker's own index (README "Several workers, preemption and resume").
Exit codes: 0 done; 2 bad input, a non-finite loss, a cluster that could not be formed within
--cluster_timeout_s, or a peer worker lost mid-run; 42 (PREEMPTED_EXIT_CODE) stopped by SIGTERM/SIGINT
after saving a checkpoint: run the same command again to resume.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import os
import sys

from absl import app

from tf_mtssl import cli
from tf_mtssl import tasks as task_registry
from tf_mtssl.model.lasso import LassoConfig
from tf_mtssl.model.trunk import TrunkConfig
from tf_mtssl.pretraining import distribution, preemption, trainer
from tf_mtssl.pretraining.config import PretrainConfig, TrainConfig

for _config in (PretrainConfig, TrainConfig, TrunkConfig, LassoConfig):
  cli.define_flags(_config)
cli.define_task_flags()


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  run = cli.config_from_flags(PretrainConfig)
  options = {n: cli.task_options_from_flags(n) for n in task_registry.registered_tasks()}
  try:
    result, final = trainer.pretrain(run, cli.config_from_flags(TrainConfig), cli.config_from_flags(TrunkConfig),
                                     cli.config_from_flags(LassoConfig), options)
  except distribution.ClusterError as e:  # a cluster that did not form, or a peer lost mid-run
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  # Equal on every worker of a run (weights and per-task optimizer states are kept in sync).
  print(f"Weights fingerprint ({distribution.worker_name(result.strategy)}): {result.weights_fingerprint()}")
  if result.preempted:
    print(f"Stopped at step {int(result.step.numpy())} by a signal, checkpoint saved in "
          f"{os.path.abspath(run.model_dir)}; run the same command again to resume.", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  if result.chief:
    for name, metrics in final.items():
      print(f"[{name}] " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    print(f"Checkpoints:     {os.path.abspath(run.model_dir)}")
    print(f"TensorBoard:     tensorboard --logdir {os.path.abspath(os.path.join(run.model_dir, 'train'))}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
