"""Self-supervised multi-task pretraining binary.

  python -m tf_mtssl.pretrain --flagfile=flags/rp_col_ex_ms.cfg --model_dir=runs/mtl

Resumes from the newest checkpoint in --model_dir. Per-task hyper-parameters are the
--<task>_<option> flags (see --helpfull).

Several workers: start the same command on each with --distribution=multi_worker and TF_CONFIG
naming the cluster and the worker's own index (README "Several workers, preemption and resume").
Exit codes: 0 done; 2 bad input (checked before anything is written to --model_dir), a
--model_dir in use by another process (run.lock names it), a non-finite loss, a cluster that could
not be formed within --cluster_timeout_s, or a peer worker lost mid-run; 42
(train.PREEMPTED_EXIT_CODE) stopped by SIGTERM/SIGINT, after saving a checkpoint (or, with a starved
input pipeline, without, --stop_grace_s later): run the same command again to resume.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import os
import sys

from absl import app, flags

from tf_mtssl.pretraining import distribution as distribute
from tf_mtssl import cli as flag_utils
from tf_mtssl import tasks as task_registry
from tf_mtssl.pretraining import trainer as train

FLAGS = flags.FLAGS

flags.DEFINE_string("tasks", "rp", f"Comma-separated tasks, of: {','.join(task_registry.registered_tasks())}.")
flags.DEFINE_string("model_dir", "runs/pretrain", "Run directory: checkpoints, run_config.json, TensorBoard logs.")
flags.DEFINE_string("data", "embedded", "Image source: 'embedded', 'tfds:NAME[:SPLIT]' (prepared in "
                    "--tfds_data_dir, never downloaded), a folder of images, or a TFRecord glob.")
flags.DEFINE_multi_string("task_data", [], "Per-task source override TASK=SPEC (e.g. ms=/data/masks-*.tfrecord); "
                          "repeatable.")
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir holding prepared datasets "
                    "(None: the tfds default, ~/tensorflow_datasets).")
flags.DEFINE_integer("image_size", 224, "Side of the square full-image inputs of col/ex/ms (paper_spec 3).")
flags.DEFINE_integer("batch_size", 32, "Global batch per task (examples of that task's pipeline).")
flags.DEFINE_multi_string("task_batch_size", [], "Per-task global batch override TASK=N (e.g. rp=56); repeatable.")
flags.DEFINE_integer("train_steps", 100_000, "Total steps (each step = one batch of every task).")
flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate of every task's RMSProp; a normalised step moves "
                   "each weight by about this much (tf_mtssl/pretraining/optimizer.py).")
flags.DEFINE_integer("warmup_steps", 1000, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("rmsprop_rho", 0.9, "RMSProp decay of the second moment (paper_spec 4 [I]).")
flags.DEFINE_float("rmsprop_momentum", 0.9, "RMSProp momentum (paper_spec 4 [I]).")
flags.DEFINE_float("rmsprop_epsilon", 1e-6, "RMSProp epsilon, added to the gradient RMS (outside the root): "
                   "far below the trunk's per-element gradients, so each task's RMSProp normalises it.")
flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay on kernels, applied once per step whatever "
                   "the number of tasks (paper_spec 4 [I]).")
flags.DEFINE_enum("trunk_update", "sum", ["sum", "mean"], "How the per-task RMSProp updates combine on the "
                  "shared trunk: sum (each task's optimizer applies its own update, paper_spec 4) or mean "
                  "(the trunk step of a single-task run).")
flags.DEFINE_boolean("harmonize", False, "paper_spec 6: rp uses colorization's gray input instead of "
                     "colour dropping.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation and input pipelines.")
flags.DEFINE_integer("log_every", 10, "Steps between scalar summaries.")
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints kept.")
flags.DEFINE_integer("image_summary_every", 500, "Steps between TensorBoard image summaries (0: never).")
flags.DEFINE_integer("grad_cosine_every", 100, "Steps between task-gradient cosine summaries (0: never).")
flags.DEFINE_enum("distribution", "default", list(distribute.DISTRIBUTIONS),
                  "default: one device; mirrored: all local GPUs or the CPU; multi_worker: "
                  "MultiWorkerMirroredStrategy from TF_CONFIG.")
flags.DEFINE_float("cluster_timeout_s", distribute.DEFAULT_CLUSTER_TIMEOUT_S,
                   "multi_worker: longest wait for every worker of TF_CONFIG's cluster to start; after "
                   "it, the worker fails naming the addresses that did not answer.")
flags.DEFINE_enum("mixed_precision", "none", list(train.MIXED_PRECISION_POLICIES),
                  "Keras mixed precision: bfloat16 (CPUs with AVX512-BF16, TPUs, recent GPUs) or float16 "
                  "(GPUs; adds dynamic loss scaling). Heads' logits and losses stay float32.")
flags.DEFINE_integer("steps_per_loop", 10, "Training steps per tf.function call: the host waits for the device "
                     "once per call (calls also end at log, checkpoint, image and cosine steps). A signal stops "
                     "the run after the current call.")
flags.DEFINE_enum("jit_compile", "auto", list(train.JIT_COMPILE_MODES), "XLA for every task's forward and "
                  "backward pass: auto = on when a GPU is visible, off on CPUs (where XLA measured slower).")
flags.DEFINE_list("profile_steps", [], "FIRST,LAST: write a TensorBoard profile of these steps (1-based) "
                  "to <model_dir>/train.")
flags.DEFINE_float("stop_grace_s", 60.0, "After SIGTERM/SIGINT, the longest wait (at least 3x the longest "
                   "step) for the current step to end and a checkpoint to be saved; past it (a starved "
                   "input pipeline) the run exits without saving, resumable from its newest checkpoint.")
flag_utils.define_trunk_flags()
flag_utils.define_lasso_flags()
flag_utils.define_progress_flag()
flag_utils.define_task_option_flags()


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  try:
    _train()
  except distribute.ClusterError as e:  # a cluster that did not form, or a peer lost mid-run
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)


def _train():
  # First: a multi-worker strategy must be made before the TF runtime starts.
  strategy = distribute.make_strategy(FLAGS.distribution, cluster_timeout_s=FLAGS.cluster_timeout_s)
  names = task_registry.parse_task_list(FLAGS.tasks)
  tasks = {n: task_registry.make_task(n, options=flag_utils.task_options_from_flags(n),
                                      image_size=FLAGS.image_size, harmonize=FLAGS.harmonize)
           for n in names}
  config = train.TrainConfig(
      train_steps=FLAGS.train_steps, batch_size=FLAGS.batch_size,
      task_batch_sizes=flag_utils.parse_task_assignments(FLAGS.task_batch_size, "task_batch_size", int),
      learning_rate=FLAGS.learning_rate,
      warmup_steps=FLAGS.warmup_steps, rmsprop_rho=FLAGS.rmsprop_rho,
      rmsprop_momentum=FLAGS.rmsprop_momentum, rmsprop_epsilon=FLAGS.rmsprop_epsilon,
      weight_decay=FLAGS.weight_decay, trunk_update=FLAGS.trunk_update, seed=FLAGS.seed, log_every=FLAGS.log_every,
      checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
      image_summary_every=FLAGS.image_summary_every, grad_cosine_every=FLAGS.grad_cosine_every,
      progress_bar=FLAGS.progress_bar, mixed_precision=FLAGS.mixed_precision,
      steps_per_loop=FLAGS.steps_per_loop, jit_compile=FLAGS.jit_compile,
      profile_steps=flag_utils.parse_step_range(FLAGS.profile_steps, "profile_steps"),
      stop_grace_s=FLAGS.stop_grace_s)
  data = flag_utils.data_for_tasks(names, FLAGS.data,
                                   flag_utils.parse_task_assignments(FLAGS.task_data, "task_data"))
  trainer = train.Trainer(
      FLAGS.model_dir, tasks, flag_utils.trunk_config_from_flags(), config, data,
      tfds_data_dir=FLAGS.tfds_data_dir,
      lasso_l1=FLAGS.lasso_l1 if flag_utils.lasso_applies(FLAGS.lasso, "pretrain") else None,
      run_config_extra={"flags": FLAGS.flag_values_dict()},
      strategy=strategy)
  final = trainer.train()
  # Equal on every worker of a run (weights and per-task optimizer states are kept in sync).
  print(f"Weights fingerprint ({train.worker_name(strategy)}): {trainer.weights_fingerprint()}")
  if trainer.preempted:
    print(f"Stopped at step {int(trainer.step.numpy())} by a signal, checkpoint saved in "
          f"{os.path.abspath(FLAGS.model_dir)}; run the same command again to resume.", file=sys.stderr)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  if trainer.chief:
    for name, metrics in final.items():
      print(f"[{name}] " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    print(f"Checkpoints:     {os.path.abspath(FLAGS.model_dir)}")
    print(f"TensorBoard:     tensorboard --logdir {os.path.abspath(os.path.join(FLAGS.model_dir, 'train'))}")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
