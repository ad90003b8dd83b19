"""A grid of pretraining configurations x seeds, every trunk evaluated by one fixed protocol at several
points of pretraining (issue 19; the analogue of paper_spec 8.2-8.5). `python -m tf_mtssl.study` is the
binary; `tf_mtssl.study_report` writes the tables and plots.

Cells. A cell is (configuration, seed): `COMBINATIONS` names the configurations (random init, single
tasks, naive combinations, the lasso, harmonization). Each pretrained cell trains once with
`tf_mtssl.train.Trainer` to `train_steps`, with a checkpoint at each of the `eval_points` evenly spaced
steps; each checkpoint's trunk is then evaluated: the linear and kNN probes of
`tf_mtssl.evaluation.probes` on the probe set's test split (hyper-parameters chosen on its validation
split) and, with `depth`, delta < 1.25 of a short depth fine-tuning on the embedded stereo pairs
(`tf_mtssl.evaluation.depth`). The random-init cell is evaluated once (step 0).

Resume. Every pretraining run is keyed by a hash of its full configuration (combination, seed, trunk,
task options, optimiser, data, checkpoint schedule) and every evaluation by a hash of that and the
evaluation protocol; both live under `work_dir` by key. A killed study restarts where it stopped (the
Trainer resumes a run from its newest checkpoint; a finished evaluation is read back, never redone),
and a changed configuration gets new keys: nothing of another configuration is reused. Every
evaluation records the git commit that made it.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import subprocess
import time
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np

from tf_mtssl import checkpoints, train
from tf_mtssl import tasks as task_registry
from tf_mtssl import trunk as trunk_lib
from tf_mtssl.data import classification_set, depth_sources, sources
from tf_mtssl.evaluation import common, depth, linear, probes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Combination:
  label: str                      # the row name of the tables (paper_spec 8.2 style)
  tasks: Tuple[str, ...] = ()     # empty: random init, no pretraining
  lasso: bool = False             # paper_spec 5: lasso at pretraining
  harmonize: bool = False         # paper_spec 6


COMBINATIONS: Dict[str, Combination] = {
    "random": Combination("Random init"),
    "rp": Combination("RP", ("rp",)),
    "col": Combination("Col", ("col",)),
    "ex": Combination("Ex", ("ex",)),
    "ms": Combination("MS", ("ms",)),
    "rp_ex": Combination("RP+Ex", ("rp", "ex")),
    "rp_col": Combination("RP+Col", ("rp", "col")),
    "rp_col_h": Combination("RP+Col / H", ("rp", "col"), harmonize=True),
    "all": Combination("RP+Col+Ex+MS", ("rp", "col", "ex", "ms")),
    "all_lasso": Combination("RP+Col+Ex+MS, lasso", ("rp", "col", "ex", "ms"), lasso=True),
}


NEEDS_COLOUR_OR_VIDEO = {"col": "colorization predicts the colours of colour images",
                         "ms": "motion segmentation needs motion masks made from video"}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that defines a study's cells (built by the binary from its flags)."""
  name: str
  combinations: Tuple[str, ...]
  seeds: Tuple[int, ...]
  data: str                                  # pretraining source (tf_mtssl.data.sources)
  task_data: Dict[str, str]                  # per-task overrides (e.g. ms: embedded masks)
  trunk: Dict                                # tf_mtssl.trunk.build_trunk kwargs
  image_size: int
  task_options: Dict[str, Dict]              # task -> Options fields
  train: Dict                                # tf_mtssl.train.TrainConfig fields (seed, steps excluded)
  train_steps: int
  eval_points: int
  lasso_l1: float
  probe_data: str                            # a probe set of tf_mtssl.data.probe_sets
  probe: Dict                                # tf_mtssl.evaluation.linear.ProbeConfig fields
  protocol: Dict                             # tf_mtssl.evaluation.probes.ProbeProtocol fields
  probe_max_examples: int = 0                # 0: every example of each split (quick mode: fewer)
  depth: Optional[Dict] = None               # DepthConfig fields + "crop"; None: no depth evaluation

  def __post_init__(self):
    unknown = [c for c in self.combinations if c not in COMBINATIONS]
    if unknown or not self.combinations:
      raise ValueError(f"Unknown configuration(s) {unknown}; known: {', '.join(COMBINATIONS)}")
    if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"--seeds must be distinct integers, got {list(self.seeds)}")
    if self.eval_points < 1 or self.train_steps % self.eval_points:
      raise ValueError(f"--train_steps ({self.train_steps}) must be a positive multiple of --eval_points "
                       f"({self.eval_points}): checkpoints are evaluated at evenly spaced steps")
    for name in self.combinations:  # before any work: the tasks refuse these sources the same way
      for task in COMBINATIONS[name].tasks:
        task_registry.task_class(task)
        if task in NEEDS_COLOUR_OR_VIDEO:
          sources.require_colour_source(self.task_data.get(task, self.data), task, NEEDS_COLOUR_OR_VIDEO[task])

  @property
  def eval_steps(self) -> List[int]:
    interval = self.train_steps // self.eval_points
    return [interval * (i + 1) for i in range(self.eval_points)]


def config_key(value) -> str:
  """Short stable hash of a JSON-able value."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit(repo: Optional[str] = None) -> str:
  """HEAD of the repository holding this code ('+dirty' when tracked files changed), or 'unknown'."""
  repo = repo or str(pathlib.Path(__file__).resolve().parents[1])
  try:
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def train_fields(study: StudyConfig, combo: Combination) -> Dict:
  """The TrainConfig fields of a run of `combo`: per-task batch sizes of its own tasks only."""
  sizes = study.train.get("task_batch_sizes") or {}
  return {**study.train, "task_batch_sizes": {t: b for t, b in sizes.items() if t in combo.tasks}}


def run_spec(study: StudyConfig, name: str, seed: int) -> Dict:
  """What defines one pretraining run (hashed into its key)."""
  combo = COMBINATIONS[name]
  return {"combination": dataclasses.asdict(combo), "seed": seed, "trunk": study.trunk,
          "image_size": study.image_size, "data": {t: study.task_data.get(t, study.data) for t in combo.tasks},
          "task_options": {t: study.task_options.get(t, {}) for t in combo.tasks}, "train": train_fields(study, combo),
          "train_steps": study.train_steps, "eval_points": study.eval_points,
          "lasso_l1": study.lasso_l1 if combo.lasso else None}


def eval_spec(study: StudyConfig, run_key: str, step: int) -> Dict:
  return {"run": run_key, "step": step, "probe_data": study.probe_data, "probe": study.probe,
          "protocol": study.protocol, "probe_max_examples": study.probe_max_examples, "depth": study.depth}


def _make_tasks(study: StudyConfig, combo: Combination):
  from tf_mtssl import flag_utils  # task options from {field: value}, converted as the flags are
  return {t: task_registry.make_task(t, options=flag_utils.task_options_from_dict(t, study.task_options.get(t, {})),
                                     image_size=study.image_size, harmonize=combo.harmonize)
          for t in combo.tasks}


def pretrain(study: StudyConfig, name: str, seed: int, model_dir: str, commit: str) -> None:
  """Trains (or resumes) one cell's run to `train_steps`, a checkpoint at every evaluation step."""
  combo = COMBINATIONS[name]
  config = train.TrainConfig(
      **train_fields(study, combo), train_steps=study.train_steps, seed=seed,
      checkpoint_every=study.train_steps // study.eval_points, keep_checkpoints=study.eval_points + 1,
      image_summary_every=0, progress_bar=False)
  trainer = train.Trainer(model_dir, _make_tasks(study, combo), study.trunk, config,
                          {t: study.task_data.get(t, study.data) for t in combo.tasks},
                          lasso_l1=study.lasso_l1 if combo.lasso else None,
                          run_config_extra={"study": {"name": study.name, "cell": name, "commit": commit}})
  trainer.train()
  if trainer.preempted:
    raise KeyboardInterrupt(f"Pretraining of {model_dir} stopped by a signal (checkpoint saved)")


def read_scalars(log_dir: str) -> Dict[str, List[Tuple[int, float]]]:
  """Every scalar summary below `log_dir` (TensorBoard event files): tag -> [(step, value)] by step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out: Dict[str, Dict[int, float]] = {}
  for path in sorted(pathlib.Path(log_dir).rglob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.HasField("tensor"):
          number = tf.make_ndarray(value.tensor)
          if number.size == 1 and np.issubdtype(number.dtype, np.number):
            out.setdefault(value.tag, {})[int(event.step)] = float(number.reshape(()))
        elif value.HasField("simple_value"):
          out.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
  return {tag: sorted(points.items()) for tag, points in out.items()}


class _FirstExamples:
  """A ClassificationSource limited to the first `n` examples of every split (quick mode)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n
    self.num_classes, self.kind = source.num_classes, source.kind

  def dataset(self, split):
    return self.source.dataset(split).take(self.n)

  def groups(self, split):
    groups = self.source.groups(split)
    return None if groups is None else groups[:self.n]


def evaluate_trunk(study: StudyConfig, trunk_fn: Callable[[], keras.Model], seed: int) -> Dict:
  """The fixed protocol on one trunk: probes on the probe set, then (optionally) depth fine-tuning.

  `trunk_fn` builds a fresh copy of the trunk (depth fine-tuning changes its weights).
  """
  source = classification_set.ClassificationSource(study.probe_data)
  if study.probe_max_examples:
    source = _FirstExamples(source, study.probe_max_examples)
  probe_config = linear.ProbeConfig(**study.probe, seed=seed)
  protocol = probes.ProbeProtocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in study.protocol.items()})
  result = {"probes": probes.run_probes(trunk_fn(), source, probe_config, protocol)}
  if study.depth is not None:
    cfg = dict(study.depth)
    crop = cfg.pop("crop")
    data = depth_sources.DepthSource("embedded", crop_height=crop, crop_width=crop)
    keras.utils.set_random_seed(seed)
    network = depth.DepthNetwork(trunk_fn())
    out = depth.DepthTrainer(network, depth.DepthConfig(**cfg, seed=seed)).fit(
        data.train_dataset(seed=seed), data.test_dataset())
    result["depth"] = {k: out[k] for k in ("delta1", "abs_rel", "rmse", "num_valid_pixels")}
  return result


def _record(study, name, seed, step, run_key, key, evaluation, commit, seconds, extra) -> Dict:
  p = evaluation["probes"]
  rec = {"study": study.name, "config": name, "label": COMBINATIONS[name].label, "seed": seed, "step": step,
         "run_key": run_key, "eval_key": key, "commit": commit, "seconds": seconds}
  for probe in ("linear", "knn"):
    if probe in p:
      rec.update({f"{probe}_top1": p[probe]["top1"], f"{probe}_se": p[probe]["se"],
                  f"{probe}_val_top1": p[probe]["val_top1"]})
  if "linear" in p:
    rec.update(linear_weight_decay=p["linear"]["weight_decay"], linear_train_top1=p["linear"]["train_top1"])
  if "knn" in p:
    rec["knn_k"] = p["knn"]["k"]
  if "depth" in evaluation:
    rec["depth_delta1"] = evaluation["depth"]["delta1"]
  rec["num_test"] = p["num_test"]
  rec.update(extra)
  rec["detail"] = evaluation
  return rec


def run_study(study: StudyConfig, work_dir: str, on_record: Optional[Callable[[List[Dict]], None]] = None,
              commit: Optional[str] = None, report_only: bool = False) -> List[Dict]:
  """Runs every missing cell of `study` under `work_dir`; returns one record per (cell, step).

  `on_record(records)` is called after every finished evaluation (the binary rewrites its results then,
  so a killed study leaves its finished cells reported). `report_only`: read the finished cells back,
  run nothing.
  """
  work = pathlib.Path(work_dir)
  (work / "evals").mkdir(parents=True, exist_ok=True)
  commit = commit or git_commit()
  records = []
  # Seed-major: a study stopped early has every configuration with the first seeds.
  for seed in study.seeds:
    for name in study.combinations:
      spec = run_spec(study, name, seed)
      run_key = config_key(spec)
      run_dir = work / "runs" / f"{name}-s{seed}-{run_key}"
      steps = [0] if not COMBINATIONS[name].tasks else study.eval_steps
      for step in steps:
        key = config_key(eval_spec(study, run_key, step))
        path = work / "evals" / f"{name}-s{seed}-step{step}-{key}.json"
        if path.exists():
          records.append(json.loads(path.read_text()))
          log.info("[%s seed %d step %d] done before (%s): read back", name, seed, step, path.name)
          continue
        if report_only:
          log.info("[%s seed %d step %d] not run yet (--report_only)", name, seed, step)
          continue
        start = time.time()
        keras.utils.clear_session()
        extra = {}
        if step == 0:
          trunk_fn = lambda seed=seed: common.load_trunk("random", trunk_config=study.trunk, seed=seed)[0]  # noqa: E731
        else:
          if not (run_dir / f"ckpt-{step}.index").exists():
            log.info("[%s seed %d] pretraining to step %d in %s", name, seed, study.train_steps, run_dir)
            pretrain(study, name, seed, str(run_dir), commit)
            keras.utils.clear_session()
          ckpt = str(run_dir / f"ckpt-{step}")
          trunk_fn = lambda ckpt=ckpt, run_dir=run_dir: checkpoints.restore_trunk(str(run_dir), ckpt)  # noqa: E731
          extra["pretext"] = {tag: [v for s, v in points if s <= step][-1:]
                              for tag, points in read_scalars(str(run_dir / "train")).items()
                              if tag.split("/")[0] in COMBINATIONS[name].tasks}
          extra["pretext"] = {k: v[0] for k, v in extra["pretext"].items() if v}
          if COMBINATIONS[name].lasso:
            lasso = checkpoints.restore_lasso(str(run_dir), ckpt)
            extra["lasso_alpha"] = {"tasks": list(lasso.rows), "alpha": lasso.alphas().numpy().tolist()}
        evaluation = evaluate_trunk(study, trunk_fn, seed)
        rec = _record(study, name, seed, step, run_key, key, evaluation, commit, time.time() - start, extra)
        common.write_json(str(path), rec)
        records.append(rec)
        log.info("[%s seed %d step %d] linear %.4f knn %.4f%s (%.0f s)", name, seed, step,
                 rec.get("linear_top1", float("nan")), rec.get("knn_top1", float("nan")),
                 f" depth {rec['depth_delta1']:.4f}" if "depth_delta1" in rec else "", rec["seconds"])
        if on_record:
          on_record(records)
  stale = sorted({p.name for p in (work / "evals").glob("*.json")} - {
      f"{r['config']}-s{r['seed']}-step{r['step']}-{r['eval_key']}.json" for r in records})
  if stale:
    log.info("%d evaluation file(s) in %s belong to other configurations and are not reported", len(stale),
             work / "evals")
  return records


def training_curves(work_dir: str, records: List[Dict]) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
  """run_key -> {tag: [(step, value)]} of the pretraining runs behind `records` (for the plots)."""
  out = {}
  for rec in records:
    if rec["step"] == 0 or rec["run_key"] in out:
      continue
    run_dir = pathlib.Path(work_dir) / "runs" / f"{rec['config']}-s{rec['seed']}-{rec['run_key']}"
    out[rec["run_key"]] = read_scalars(str(run_dir / "train")) if run_dir.exists() else {}
  return out


def weight_change(study: StudyConfig, work_dir: str, record: Dict) -> Optional[float]:
  """||W - W0|| / ||W0|| over the trunk's conv kernels of a pretrained record's checkpoint, W0 the
  random initialisation of its seed (the Trainer seeds Keras and builds the trunk first, as
  `common.load_trunk("random", seed=...)` does, so W0 is rebuilt exactly). None for random init or a
  missing run."""
  if record["step"] == 0:
    return None
  run_dir = pathlib.Path(work_dir) / "runs" / f"{record['config']}-s{record['seed']}-{record['run_key']}"
  if not (run_dir / f"ckpt-{record['step']}.index").exists():
    return None
  trained = checkpoints.restore_trunk(str(run_dir), str(run_dir / f"ckpt-{record['step']}"))
  init, _ = common.load_trunk("random", trunk_config=study.trunk, seed=record["seed"])
  num, den = 0.0, 0.0
  for a, b in zip(trained.weights, init.weights):
    if "kernel" in a.path:
      num += float(np.sum((a.numpy() - b.numpy()) ** 2))
      den += float(np.sum(b.numpy() ** 2))
  return float(np.sqrt(num / den)) if den > 0 else None


def trunk_description(study: StudyConfig) -> str:
  return (f"ResNet-v2 depth {study.trunk['depth']}, base width {study.trunk['base_width']}, output stride "
          f"{study.trunk['output_stride']} ({trunk_lib.num_block3_units(study.trunk['depth'])} block-3 units), "
          f"{study.image_size}-px inputs")

