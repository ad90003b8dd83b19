"""The study binary's settings and what it does with them: `StudySettings` (its flags, by the one flag
generator), `study_config` (settings + the shared trunk, optimiser, lasso and task-option configurations
-> a `grid.StudyConfig`), `run` (the grid, then results.md/csv/json and the plots).
"""

import dataclasses
import os
import time
from typing import Any, Dict, Optional, Tuple

from tf_mtssl.core import configs, files
from tf_mtssl.evaluation import probes
from tf_mtssl.model.lasso import LassoConfig
from tf_mtssl.model.trunk import TrunkConfig
from tf_mtssl.pretraining.config import TrainConfig
from tf_mtssl.studies import grid, report

# The optimiser and logging fields of TrainConfig that a study sets (and hashes into its run keys); the
# rest (steps, seed, checkpoints, summaries) the grid fixes per cell.
TRAIN_FIELDS = ("batch_size", "task_batch_sizes", "learning_rate", "warmup_steps", "rmsprop_rho",
                "rmsprop_momentum", "rmsprop_epsilon", "weight_decay", "trunk_update", "log_every",
                "grad_cosine_every")
TRAIN_DEFAULTS = {"warmup_steps": 100, "log_every": 20}
TRAIN_EXCLUDED = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in TRAIN_FIELDS)


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """The study's own flags (with TrainConfig's TRAIN_FIELDS, TrunkConfig, --lasso_l1 and the task options)."""
  name: str = configs.field("study", "Name of the study (titles and file headers).")
  combinations: Tuple[str, ...] = configs.field(("random", "rp", "ex", "rp_ex"), "Pretraining configurations, of: "
                                                + ", ".join(grid.COMBINATIONS) + ".", flag="configs")
  seeds: Tuple[int, ...] = configs.field((0, 1, 2), "Seeds; each configuration is pretrained and evaluated once per seed.")
  data: str = configs.field("fashion_mnist", "Pretraining source (tf_mtssl.data.sources), e.g. fashion_mnist, photos.")
  task_data: Dict[str, str] = configs.field({}, "Per-task source override TASK=SPEC (e.g. ms=embedded).")
  image_size: int = configs.field(64, "Side of the full-image inputs of col/ex/ms.")
  train_steps: int = configs.field(1200, "Pretraining steps of every run.")
  eval_points: int = configs.field(3, "Evaluated checkpoints, evenly spaced (the last at --train_steps).")
  probe_data: str = configs.field("fashion_mnist", "Probe set (tf_mtssl.data.probe_sets): fashion_mnist or objects.")
  probe_image_size: int = configs.field(64, "Side of the probe images fed to the trunk.")
  probe_grid: int = configs.field(3, "Linear probe: block 3 average-pooled to grid x grid (paper_spec 7.1: 3); "
                                  "block 3 must have at least that many cells (a 32-px input at output stride 16 "
                                  "has 2x2).")
  probe_crop_fraction: float = configs.field(1.0, "Probe centre crops (1: the whole, already framed, image).")
  probe_train_steps: int = configs.field(1000, "SGD steps of each linear probe.")
  probe_batch_size: int = configs.field(256, "Linear probe batch.")
  probe_learning_rate: float = configs.field(0.1, "Linear probe learning rate.")
  probe_lr_boundaries: Tuple[int, ...] = configs.field((600, 800), "Linear probe learning-rate decay steps "
                                                       "(x0.1 each).")
  weight_decays: Tuple[float, ...] = configs.field(tuple(probes.WEIGHT_DECAYS), "Linear probe weight decays, the "
                                                   "best on validation kept.")
  knn_ks: Tuple[int, ...] = configs.field(tuple(probes.KNN_KS), "kNN probe k values, the best on validation kept.")
  probe_max_examples: int = configs.field(0, "Use the first N examples of each probe split (0: all).")
  depth_eval: bool = configs.field(False, "Also fine-tune for depth on the embedded stereo pairs (delta < 1.25).")
  depth_train_steps: int = configs.field(150, "Depth fine-tuning steps.")
  depth_crop: int = configs.field(64, "Depth training crops and test tiles (square).")
  depth_batch_size: int = configs.field(8, "Depth fine-tuning batch.")
  depth_learning_rate: float = configs.field(0.01, "Depth fine-tuning learning rate (SGD momentum 0.9).")
  output_dir: str = configs.field("results/study", "Where results.md/csv/json and the plots are written.")
  work_dir: str = configs.field("runs/study", "Pretraining runs and per-cell evaluations (the resume state).")
  report_only: bool = configs.field(False, "Write the results of the finished cells; run nothing.")
  quick: bool = configs.field(False, "Tiny everything (tests; about a minute): see QUICK.")


# --quick: tiny trunk and inputs, a few steps; the machinery is exercised, the numbers mean nothing.
QUICK: Dict[str, str] = {
    "depth": "14", "base_width": "8", "image_size": "32", "batch_size": "4", "train_steps": "6",
    "eval_points": "3", "warmup_steps": "2", "log_every": "2", "grad_cosine_every": "2", "probe_image_size": "32",
    "probe_grid": "2", "probe_train_steps": "20", "probe_lr_boundaries": "", "probe_max_examples": "200",
    "weight_decays": "0,0.01", "knn_ks": "1,10", "depth_train_steps": "3", "depth_crop": "32",
    "depth_batch_size": "2", "rp_patch_size": "16", "rp_gap": "8", "rp_jitter": "2", "rp_hidden": "32",
    "rp_reduce_channels": "8", "ex_views": "2", "ex_embedding_dim": "16", "col_head_width": "8",
    "col_upsample_width": "8", "ms_head_width": "8"}


def study_config(settings: StudySettings, train: TrainConfig, trunk: TrunkConfig, lasso: LassoConfig,
                 task_options: Dict[str, Any]) -> grid.StudyConfig:
  """The grid of `settings` with the optimiser of `train` (its TRAIN_FIELDS), `trunk`, the lasso's L1
  weight and every task's options (validated here, before any work)."""
  depth: Optional[Dict] = None
  if settings.depth_eval:
    steps = settings.depth_train_steps
    depth = {"train_steps": steps, "batch_size": settings.depth_batch_size, "eval_batch_size": 8,
             "learning_rate": settings.depth_learning_rate,
             # decays at 60% and 80% of the steps (paper_spec 7.3's schedule shape), none for a few steps
             "lr_boundaries": (int(steps * 0.6), int(steps * 0.8)) if steps >= 5 else (),
             "log_every": max(1, steps), "crop": settings.depth_crop}
  return grid.StudyConfig(
      name=settings.name, combinations=tuple(settings.combinations), seeds=tuple(settings.seeds), data=settings.data,
      task_data=dict(settings.task_data), trunk=trunk.as_dict(), image_size=settings.image_size,
      task_options={name: dataclasses.asdict(options) for name, options in task_options.items()},
      train={k: getattr(train, k) for k in TRAIN_FIELDS}, train_steps=settings.train_steps,
      eval_points=settings.eval_points, lasso_l1=lasso.l1, probe_data=settings.probe_data,
      probe={"train_steps": settings.probe_train_steps, "batch_size": settings.probe_batch_size,
             "eval_batch_size": 500, "learning_rate": settings.probe_learning_rate,
             "lr_boundaries": tuple(settings.probe_lr_boundaries), "image_size": settings.probe_image_size,
             "crop_fraction": settings.probe_crop_fraction, "grid": settings.probe_grid, "log_every": 10**9},
      protocol={"weight_decays": tuple(settings.weight_decays), "knn_ks": tuple(settings.knn_ks)},
      probe_max_examples=settings.probe_max_examples, depth=depth)


def run(study: grid.StudyConfig, settings: StudySettings, command: str) -> str:
  """Runs (or resumes) every cell of `study`, rewriting the results after each evaluation; returns the
  path of results.md."""
  started = time.time()
  print(f"Study {study.name}: {len(study.combinations)} configurations x {len(study.seeds)} seeds, "
        f"{grid.trunk_description(study)}; work dir {os.path.abspath(settings.work_dir)}")
  records = grid.run_study(
      study, settings.work_dir, report_only=settings.report_only,
      on_record=lambda recs: write_results(study, recs, settings.output_dir, command, started, False,
                                           settings.work_dir))
  expected = sum(1 if not grid.COMBINATIONS[c].tasks else study.eval_points for c in study.combinations)
  write_results(study, records, settings.output_dir, command, started, len(records) == expected * len(study.seeds),
                settings.work_dir, plots=bool(records))
  path = os.path.abspath(os.path.join(settings.output_dir, "results.md"))
  print(f"Results: {path} ({len(records)} evaluations, {time.time() - started:.0f} s)")
  return path


def write_results(study, records, output_dir: str, command: str, started: float, final: bool,
                  work_dir: str, plots: bool = False) -> None:
  """results.md/csv/json (and, with `plots`, the PNGs) of the records so far; `final`: every cell done."""
  commits = sorted({r["commit"] for r in records})
  header = (f"# {study.name}: pretraining study\n\nMade by `{command}`\n\nCode commit of this report: "
            f"{grid.git_commit()}; cells evaluated at commit(s): {', '.join(commits) or '—'}. "
            f"{len(records)} evaluations" + ("" if final else " so far: the grid is not finished (the same command "
                                             "resumes it)") + ".")
  p = study.probe
  setup = (f"Setup: {grid.trunk_description(study)}; pretraining data `{study.data}`"
           f"{' (' + ', '.join(f'{k}={v}' for k, v in study.task_data.items()) + ')' if study.task_data else ''}, "
           f"{study.train_steps} steps per run (batch {study.train['batch_size']}, per task "
           f"{study.train['task_batch_sizes'] or 'the same'}), RMSProp lr {study.train['learning_rate']}, epsilon "
           f"{study.train['rmsprop_epsilon']}, trunk update {study.train['trunk_update']}, weight decay "
           f"{study.train['weight_decay']}; evaluated at steps "
           f"{study.eval_steps}; seeds {list(study.seeds)}. Probes on `{study.probe_data}` at {p['image_size']} px: "
           f"linear probe on block 3 pooled {p.get('grid', 3)}x{p.get('grid', 3)} ({p['train_steps']} SGD steps), weight decay chosen on the "
           f"validation split among {list(study.protocol['weight_decays'])}; cosine kNN (weighted, T 0.07) on "
           f"the global average of block 3, k chosen on validation among {list(study.protocol['knn_ks'])}; "
           f"reported on the test split"
           + (f"; depth: {study.depth['train_steps']} steps of fine-tuning (trunk + FCRN decoder) on the "
              f"embedded stereo pairs, {study.depth['crop']}-px crops, δ<1.25 on the held-out tiles"
              if study.depth else "") + ".")
  order = list(study.combinations)
  labels = {c: grid.COMBINATIONS[c].label for c in order}
  os.makedirs(output_dir, exist_ok=True)
  changes = None
  if plots:  # restores every checkpoint once: only for the final report
    changes = {(r["config"], r["seed"], r["step"]): grid.weight_change(study, work_dir, r) for r in records}
  files.write_text(os.path.join(output_dir, "results.md"),
                          report.markdown(records, order, labels, header, setup, changes))
  report.write_csv(os.path.join(output_dir, "results.csv"), records, header.replace("\n\n", "\n"))
  report.write_json(os.path.join(output_dir, "results.json"), records, {
      "command": command, "commit": grid.git_commit(), "study": dataclasses.asdict(study),
      "complete": final, "wall_seconds": time.time() - started})
  if plots:
    title = f"{study.name}: {grid.trunk_description(study)}"
    report.plot_accuracy_vs_steps(os.path.join(output_dir, "accuracy_vs_steps.png"), records, order,
                                        labels, title)
    curves = grid.training_curves(work_dir, records)
    made = {
        "accuracy_vs_steps.png": True,
        "lasso_alpha.png": report.plot_lasso_alpha(os.path.join(output_dir, "lasso_alpha.png"), records,
                                                         title),
        "trunk_update_norms.png": report.plot_training_curves(
            os.path.join(output_dir, "trunk_update_norms.png"), records, curves, order, labels,
            "/trunk_update_norm", "trunk update norm", title + "\nper-task trunk update norm (trainer summary)"),
        "pretext_metrics.png": report.plot_training_curves(
            os.path.join(output_dir, "pretext_metrics.png"), records, curves, order, labels, "accuracy",
            "pretext accuracy", title + "\npretext accuracy"),
    }
    why = {"lasso_alpha.png": "no finished cell of a configuration with the lasso",
           "trunk_update_norms.png": "the trainer of these runs logs no `<task>/trunk_update_norm` summary",
           "pretext_metrics.png": "no pretraining run"}
    lines = [f"- `{name}`" if ok else f"- `{name}`: not made ({why[name]})" for name, ok in made.items()]
    with open(os.path.join(output_dir, "results.md"), "a") as f:
      f.write("\n## Plots\n\n" + "\n".join(lines) + "\n")


