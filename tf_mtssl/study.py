"""A small study: grids of pretraining configurations x seeds, every trunk evaluated by one protocol at
several points of pretraining (issue 19; `tf_mtssl.study_grid`, `tf_mtssl.study_report`).

  python -m tf_mtssl.study --flagfile=flags/study_fashion_mnist.cfg   # random, rp, ex, rp+ex
  python -m tf_mtssl.study --flagfile=flags/study_photos.cfg          # the natural-photo grid
  python -m tf_mtssl.study --flagfile=flags/study_fashion_mnist.cfg --quick --output_dir=/tmp/q

Writes --output_dir/results.md, results.csv, results.json and PNG plots (probe accuracy vs
pretraining steps, the lasso alpha heatmap, per-task trunk update norms and pretext metrics over
training). Runs and evaluations live in --work_dir keyed by their configuration: run the same command
again after a kill and it resumes, never redoing a finished evaluation. --quick shrinks everything
(tiny trunk, 32-px inputs, 6 steps, a few hundred probe examples) to check the machinery in about a
minute; its numbers mean nothing.
"""

import dataclasses
import logging
import os
import sys
import time

from absl import app, flags

from tf_mtssl import flag_utils, study_grid, study_report, train
from tf_mtssl import tasks as task_registry
from tf_mtssl.evaluation import probes

FLAGS = flags.FLAGS

flags.DEFINE_string("name", "study", "Name of the study (titles and file headers).")
flags.DEFINE_list("configs", ["random", "rp", "ex", "rp_ex"],
                  f"Pretraining configurations, of: {', '.join(study_grid.COMBINATIONS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each configuration is pretrained and evaluated once per seed.")
flags.DEFINE_string("data", "fashion_mnist", "Pretraining source (tf_mtssl.data.sources), e.g. fashion_mnist, photos.")
flags.DEFINE_multi_string("task_data", [], "Per-task source override TASK=SPEC (e.g. ms=embedded); repeatable.")
flags.DEFINE_integer("image_size", 64, "Side of the full-image inputs of col/ex/ms.")
flags.DEFINE_integer("batch_size", 32, "Global batch per task.")
flags.DEFINE_multi_string("task_batch_size", [], "Per-task batch override TASK=N; repeatable.")
flags.DEFINE_integer("train_steps", 1200, "Pretraining steps of every run.")
flags.DEFINE_integer("eval_points", 3, "Evaluated checkpoints, evenly spaced (the last at --train_steps).")
flags.DEFINE_float("learning_rate", 1e-4, "Peak RMSProp learning rate (issue 14's flagfiles: 1e-4).")
flags.DEFINE_integer("warmup_steps", 100, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("rmsprop_rho", 0.9, "RMSProp decay.")
flags.DEFINE_float("rmsprop_momentum", 0.9, "RMSProp momentum.")
flags.DEFINE_float("rmsprop_epsilon", 1e-6, "RMSProp epsilon, outside the root (tf_mtssl/optimizer.py).")
flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay on kernels (pretraining).")
flags.DEFINE_enum("trunk_update", "sum", ["sum", "mean"], "How the per-task RMSProp updates combine on the "
                  "shared trunk (tf_mtssl/optimizer.py).")
flags.DEFINE_integer("log_every", 20, "Steps between pretraining scalar summaries.")
flags.DEFINE_integer("grad_cosine_every", 100, "Steps between task-gradient cosine summaries (0: never).")
flags.DEFINE_string("probe_data", "fashion_mnist", "Probe set (tf_mtssl.data.probe_sets): fashion_mnist or objects.")
flags.DEFINE_integer("probe_image_size", 64, "Side of the probe images fed to the trunk.")
flags.DEFINE_float("probe_crop_fraction", 1.0, "Probe centre crops (1: the whole, already framed, image).")
flags.DEFINE_integer("probe_train_steps", 1000, "SGD steps of each linear probe.")
flags.DEFINE_integer("probe_batch_size", 256, "Linear probe batch.")
flags.DEFINE_float("probe_learning_rate", 0.1, "Linear probe learning rate.")
flags.DEFINE_list("probe_lr_boundaries", ["600", "800"], "Linear probe learning-rate decay steps (x0.1 each).")
flags.DEFINE_list("weight_decays", [str(w) for w in probes.WEIGHT_DECAYS], "Linear probe weight decays, "
                  "the best on validation kept.")
flags.DEFINE_list("knn_ks", [str(k) for k in probes.KNN_KS], "kNN probe k values, the best on validation kept.")
flags.DEFINE_integer("probe_max_examples", 0, "Use the first N examples of each probe split (0: all).")
flags.DEFINE_boolean("depth_eval", False, "Also fine-tune for depth on the embedded stereo pairs (delta < 1.25).")
flags.DEFINE_integer("depth_train_steps", 150, "Depth fine-tuning steps.")
flags.DEFINE_integer("depth_crop", 64, "Depth training crops and test tiles (square).")
flags.DEFINE_integer("depth_batch_size", 8, "Depth fine-tuning batch.")
flags.DEFINE_float("depth_learning_rate", 0.01, "Depth fine-tuning learning rate (SGD momentum 0.9).")
flags.DEFINE_string("output_dir", "results/study", "Where results.md/csv/json and the plots are written.")
flags.DEFINE_string("work_dir", "runs/study", "Pretraining runs and per-cell evaluations (the resume state).")
flags.DEFINE_boolean("report_only", False, "Write the results of the finished cells; run nothing.")
flags.DEFINE_boolean("quick", False, "Tiny everything (tests; about a minute): see the module docstring.")
flag_utils.define_trunk_flags()
flag_utils.define_lasso_flags()
flag_utils.define_task_option_flags()

# --quick: tiny trunk and inputs, a few steps; the machinery is exercised, the numbers mean nothing.
QUICK = {"depth": "14", "base_width": 8, "image_size": 32, "batch_size": 4, "train_steps": 6, "eval_points": 3,
         "warmup_steps": 2, "log_every": 2, "grad_cosine_every": 2, "probe_image_size": 32,
         "probe_train_steps": 20, "probe_lr_boundaries": [], "probe_max_examples": 200, "weight_decays": ["0", "0.01"],
         "knn_ks": ["1", "10"], "depth_train_steps": 3,
         "depth_crop": 32, "depth_batch_size": 2, "rp_patch_size": 16, "rp_gap": 8, "rp_jitter": 2,
         "rp_hidden": 32, "rp_reduce_channels": 8, "ex_views": 2, "ex_embedding_dim": 16, "col_head_width": 8,
         "col_upsample_width": 8, "ms_head_width": 8}


def _task_options():
  out = {}
  for name in task_registry.registered_tasks():
    out[name] = dataclasses.asdict(flag_utils.task_options_from_flags(name))
  return out


def study_config_from_flags() -> study_grid.StudyConfig:
  f = FLAGS
  try:
    seeds = tuple(int(s) for s in f.seeds)
    weight_decays = tuple(float(w) for w in f.weight_decays)
    knn_ks = tuple(int(k) for k in f.knn_ks)
    probe_boundaries = tuple(int(b) for b in f.probe_lr_boundaries)
  except ValueError as e:
    raise ValueError(f"--seeds, --knn_ks, --probe_lr_boundaries take integers, --weight_decays numbers: {e}") from e
  train_fields = dict(
      batch_size=f.batch_size,
      task_batch_sizes=flag_utils.parse_task_assignments(f.task_batch_size, "task_batch_size", int),
      learning_rate=f.learning_rate, warmup_steps=f.warmup_steps, rmsprop_rho=f.rmsprop_rho,
      rmsprop_momentum=f.rmsprop_momentum, rmsprop_epsilon=f.rmsprop_epsilon, weight_decay=f.weight_decay,
      trunk_update=f.trunk_update,
      log_every=f.log_every, grad_cosine_every=f.grad_cosine_every)
  train.TrainConfig(**train_fields)  # validated here, with a clear error, before any work
  depth = None
  if f.depth_eval:
    depth = {"train_steps": f.depth_train_steps, "batch_size": f.depth_batch_size, "eval_batch_size": 8,
             "learning_rate": f.depth_learning_rate,
             "lr_boundaries": (int(f.depth_train_steps * 0.6), int(f.depth_train_steps * 0.8)),
             "log_every": max(1, f.depth_train_steps), "crop": f.depth_crop}
    if f.depth_train_steps < 5:
      depth["lr_boundaries"] = ()
  return study_grid.StudyConfig(
      name=f.name, combinations=tuple(f.configs), seeds=seeds, data=f.data,
      task_data=flag_utils.parse_task_assignments(f.task_data, "task_data"),
      trunk=flag_utils.trunk_config_from_flags(), image_size=f.image_size, task_options=_task_options(),
      train=train_fields, train_steps=f.train_steps, eval_points=f.eval_points, lasso_l1=f.lasso_l1,
      probe_data=f.probe_data,
      probe={"train_steps": f.probe_train_steps, "batch_size": f.probe_batch_size, "eval_batch_size": 500,
             "learning_rate": f.probe_learning_rate, "lr_boundaries": probe_boundaries,
             "image_size": f.probe_image_size, "crop_fraction": f.probe_crop_fraction, "log_every": 10**9},
      protocol={"weight_decays": weight_decays, "knn_ks": knn_ks},
      probe_max_examples=f.probe_max_examples, depth=depth)


def write_results(study, records, output_dir: str, command: str, started: float, final: bool,
                  work_dir: str, plots: bool = False) -> None:
  """results.md/csv/json (and, with `plots`, the PNGs) of the records so far; `final`: every cell done."""
  commits = sorted({r["commit"] for r in records})
  header = (f"# {study.name}: pretraining study\n\nMade by `{command}`\n\nCode commit of this report: "
            f"{study_grid.git_commit()}; cells evaluated at commit(s): {', '.join(commits) or '—'}. "
            f"{len(records)} evaluations" + ("" if final else " so far: the grid is not finished (the same command "
                                             "resumes it)") + ".")
  p = study.probe
  setup = (f"Setup: {study_grid.trunk_description(study)}; pretraining data `{study.data}`"
           f"{' (' + ', '.join(f'{k}={v}' for k, v in study.task_data.items()) + ')' if study.task_data else ''}, "
           f"{study.train_steps} steps per run (batch {study.train['batch_size']}, per task "
           f"{study.train['task_batch_sizes'] or 'the same'}), RMSProp lr {study.train['learning_rate']}, epsilon "
           f"{study.train['rmsprop_epsilon']}, trunk update {study.train['trunk_update']}, weight decay "
           f"{study.train['weight_decay']}; evaluated at steps "
           f"{study.eval_steps}; seeds {list(study.seeds)}. Probes on `{study.probe_data}` at {p['image_size']} px: "
           f"linear probe on block 3 pooled 3x3 ({p['train_steps']} SGD steps), weight decay chosen on the "
           f"validation split among {list(study.protocol['weight_decays'])}; cosine kNN (weighted, T 0.07) on "
           f"the global average of block 3, k chosen on validation among {list(study.protocol['knn_ks'])}; "
           f"reported on the test split"
           + (f"; depth: {study.depth['train_steps']} steps of fine-tuning (trunk + FCRN decoder) on the "
              f"embedded stereo pairs, {study.depth['crop']}-px crops, δ<1.25 on the held-out tiles"
              if study.depth else "") + ".")
  order = list(study.combinations)
  labels = {c: study_grid.COMBINATIONS[c].label for c in order}
  os.makedirs(output_dir, exist_ok=True)
  changes = None
  if plots:  # restores every checkpoint once: only for the final report
    changes = {(r["config"], r["seed"], r["step"]): study_grid.weight_change(study, work_dir, r) for r in records}
  study_report.write_text(os.path.join(output_dir, "results.md"),
                          study_report.markdown(records, order, labels, header, setup, changes))
  study_report.write_csv(os.path.join(output_dir, "results.csv"), records, header.replace("\n\n", "\n"))
  study_report.write_json(os.path.join(output_dir, "results.json"), records, {
      "command": command, "commit": study_grid.git_commit(), "study": dataclasses.asdict(study),
      "complete": final, "wall_seconds": time.time() - started})
  if plots:
    title = f"{study.name}: {study_grid.trunk_description(study)}"
    study_report.plot_accuracy_vs_steps(os.path.join(output_dir, "accuracy_vs_steps.png"), records, order,
                                        labels, title)
    curves = study_grid.training_curves(work_dir, records)
    made = {
        "accuracy_vs_steps.png": True,
        "lasso_alpha.png": study_report.plot_lasso_alpha(os.path.join(output_dir, "lasso_alpha.png"), records,
                                                         title),
        "trunk_update_norms.png": study_report.plot_training_curves(
            os.path.join(output_dir, "trunk_update_norms.png"), records, curves, order, labels,
            "/trunk_update_norm", "trunk update norm", title + "\nper-task trunk update norm (trainer summary)"),
        "pretext_metrics.png": study_report.plot_training_curves(
            os.path.join(output_dir, "pretext_metrics.png"), records, curves, order, labels, "accuracy",
            "pretext accuracy", title + "\npretext accuracy"),
    }
    why = {"lasso_alpha.png": "no finished cell of a configuration with the lasso",
           "trunk_update_norms.png": "the trainer of these runs logs no `<task>/trunk_update_norm` summary",
           "pretext_metrics.png": "no pretraining run"}
    lines = [f"- `{name}`" if ok else f"- `{name}`: not made ({why[name]})" for name, ok in made.items()]
    with open(os.path.join(output_dir, "results.md"), "a") as f:
      f.write("\n## Plots\n\n" + "\n".join(lines) + "\n")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  command = "python -m tf_mtssl.study " + " ".join(sys.argv[1:])
  if FLAGS.quick:
    for name, value in QUICK.items():
      FLAGS[name].value = value
  study = study_config_from_flags()
  started = time.time()
  print(f"Study {study.name}: {len(study.combinations)} configurations x {len(study.seeds)} seeds, "
        f"{study_grid.trunk_description(study)}; work dir {os.path.abspath(FLAGS.work_dir)}")
  records = study_grid.run_study(
      study, FLAGS.work_dir, report_only=FLAGS.report_only,
      on_record=lambda recs: write_results(study, recs, FLAGS.output_dir, command, started, False, FLAGS.work_dir))
  expected = sum(1 if not study_grid.COMBINATIONS[c].tasks else study.eval_points for c in study.combinations)
  write_results(study, records, FLAGS.output_dir, command, started, len(records) == expected * len(study.seeds),
                FLAGS.work_dir, plots=bool(records))
  print(f"Results: {os.path.abspath(os.path.join(FLAGS.output_dir, 'results.md'))} "
        f"({len(records)} evaluations, {time.time() - started:.0f} s)")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
