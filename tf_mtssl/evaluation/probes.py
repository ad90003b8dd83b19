"""Frozen-trunk probes a small data set can trust (issue 19): the linear probe with its weight decay
chosen on validation, a parameter-free k-nearest-neighbour probe, and standard errors.

One protocol for every trunk (`ProbeProtocol`); hyper-parameters are chosen on the validation split
only, and the test split is read once, for the chosen ones:
  - features: the frozen trunk's block 3 pooled to grid x grid (`linear.pooled_features`, paper_spec
    7.1), computed once per split on centre crops;
  - linear: `linear.ProbeTrainer` (batch-norm-standardised features, linear softmax, SGD) trained once
    per weight decay of `weight_decays` on the train split; the weight decay with the best validation
    top-1 is kept (ties: the larger one) and its test top-1 reported. Without this choice, weak
    (e.g. random) trunks' probes overfit a few thousand examples and look worse than they are;
  - kNN (Wu et al. 2018; DINO, Caron et al. 2021): the grid features averaged over the grid cells
    (a global average pool of block 3) and L2-normalised; cosine similarity to every training
    example; the k most similar vote with weights exp(similarity / temperature), temperature 0.07 as
    DINO; k chosen on validation among `knn_ks` (ties: the larger k). No parameter is trained.
  - standard errors: of a mean of 0/1 outcomes, clustered by source photo where examples share one
    (`accuracy_and_se`): the objects set composites each photo several times, and those outcomes
    are not independent.
"""

import dataclasses
import logging
import time
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np

from tf_mtssl.data import classification_set
from tf_mtssl.evaluation import linear

PROBES = ("linear", "knn")
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # [I] decades; weak trunks' probes want the largest
KNN_KS = (1, 5, 10, 20, 50)                   # [I]; DINO reports k = 20
KNN_TEMPERATURE = 0.07                        # DINO's weighted kNN


@dataclasses.dataclass(frozen=True)
class ProbeProtocol:
  probes: Tuple[str, ...] = PROBES
  weight_decays: Tuple[float, ...] = WEIGHT_DECAYS
  knn_ks: Tuple[int, ...] = KNN_KS
  knn_temperature: float = KNN_TEMPERATURE
  train_split: str = "train"
  val_split: str = "val"
  test_split: str = "test"
  # Diagnostic, off in the study's protocol: batch-norm moving statistics re-estimated on (up to
  # BN_IMAGES) probe training images first (`reestimate_batchnorm`).
  reestimate_bn: bool = False

  def __post_init__(self):
    unknown = sorted(set(self.probes) - set(PROBES))
    if unknown or not self.probes:
      raise ValueError(f"probes must be a non-empty subset of {PROBES}, got {list(self.probes)}")
    if not self.weight_decays or any(w < 0 for w in self.weight_decays):
      raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {list(self.weight_decays)}")
    if not self.knn_ks or any(k < 1 for k in self.knn_ks):
      raise ValueError(f"knn_ks must be a non-empty list of integers >= 1, got {list(self.knn_ks)}")
    if self.knn_temperature <= 0:
      raise ValueError(f"knn_temperature must be > 0, got {self.knn_temperature}")


def proportion_se(p: float, n: int) -> float:
  """Standard error sqrt(p (1 - p) / (n - 1)) of a proportion p of n independent 0/1 outcomes."""
  return float(np.sqrt(p * (1 - p) / (n - 1))) if n > 1 else float("nan")


def accuracy_and_se(correct: np.ndarray, groups: Optional[Sequence[int]] = None) -> Tuple[float, float]:
  """Mean of 0/1 outcomes and its standard error.

  Without groups: sqrt(p (1 - p) / (n - 1)) (examples independent). With groups (the source photo
  of each example): the cluster-robust (sandwich) error sqrt(G / (G - 1) * sum_g (sum_{i in g}
  (c_i - p))^2) / n, which reduces to the former when every example is its own group.
  """
  correct = np.asarray(correct, np.float64).reshape(-1)
  n = correct.size
  if n == 0:
    raise ValueError("No example to compute an accuracy on")
  p = float(correct.mean())
  if groups is None:
    return p, proportion_se(p, n)
  groups = np.asarray(groups).reshape(-1)
  if groups.size != n:
    raise ValueError(f"{groups.size} groups for {n} outcomes")
  _, index = np.unique(groups, return_inverse=True)
  sums = np.bincount(index, weights=correct - p)
  g = sums.size
  if g == 1:
    return p, float("nan")
  return p, float(np.sqrt(g / (g - 1) * np.sum(sums ** 2)) / n)


def knn_features(pooled: np.ndarray) -> np.ndarray:
  """Pooled grid features [N, g, g, C] (or [N, C]) -> L2-normalised global averages [N, C]."""
  x = np.asarray(pooled, np.float32)
  if x.ndim == 4:
    x = x.mean(axis=(1, 2))
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, ks: Sequence[int],
                num_classes: int, temperature: float = KNN_TEMPERATURE,
                chunk: int = 1024) -> Dict[int, np.ndarray]:
  """Weighted kNN predictions (int [M]) of every query row for every k; rows already L2-normalised.

  A k above the number of training rows lets all of them vote.
  """
  ks = sorted(set(int(k) for k in ks))
  effective = {k: min(k, len(train)) for k in ks}
  kmax = max(effective.values())
  labels = np.asarray(train_labels, np.int64)
  out = {k: [] for k in ks}
  for start in range(0, len(query), chunk):
    sims = query[start:start + chunk] @ train.T  # cosine: both sides have unit norm
    top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)  # most similar first
    top = np.take_along_axis(top, order, axis=1)
    weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
    votes, rows = np.zeros((len(top), num_classes)), np.arange(len(top))
    for j in range(kmax):
      np.add.at(votes, (rows, labels[top[:, j]]), weights[:, j])
      for k in ks:
        if effective[k] == j + 1:
          out[k].append(votes.argmax(axis=1))
  return {k: np.concatenate(v) for k, v in out.items()}


def _choose(scores: Dict, prefer_larger: bool = True):
  """The key with the best score; ties go to the larger key (more regularised / smoother)."""
  best = max(scores.values())
  keys = [k for k, v in scores.items() if v == best]
  return max(keys) if prefer_larger else min(keys)


BN_IMAGES = 2048


def reestimate_batchnorm(trunk: keras.Model, batches) -> int:
  """Sets every batch-norm layer's moving mean and variance to the average of its batch statistics
  over `batches` (RGB float [B, S, S, 3] in 0-255), in training mode, the layers' momentum set so that
  batch i gets weight 1/(i+1). Returns the number of images used.

  A trunk pretrained on one task's inputs (e.g. rp's colour-dropped, RMS-normalised patches) keeps
  statistics of those inputs; this shows how much of a probe's result is that mismatch.
  """
  from tf_mtssl import preprocessing  # pylint: disable=g-import-not-at-top
  layers = [l for l in trunk.layers if isinstance(l, keras.layers.BatchNormalization)]  # the trunk is flat
  saved = [l.momentum for l in layers]
  count = 0
  try:
    for i, images in enumerate(batches):
      for l in layers:
        l.momentum = i / (i + 1.0)
      trunk(preprocessing.rgb_to_trunk_input(images), training=True)
      count += int(images.shape[0])
  finally:
    for l, m in zip(layers, saved):
      l.momentum = m
  return count


def extract_split(trunk: keras.Model, source: classification_set.ClassificationSource, split: str,
                  config: linear.ProbeConfig) -> Tuple[np.ndarray, np.ndarray]:
  """(pooled grid features [N, g, g, C], labels [N]) of one split, centre crops, in split order."""
  feats, labels, _ = linear.extract_features(
      trunk, linear.image_batches(source, split, config, False, config.eval_batch_size), config.grid,
      per_unit=False)
  return feats, labels


def run_probes(trunk: keras.Model, source: classification_set.ClassificationSource,
               config: linear.ProbeConfig, protocol: ProbeProtocol = ProbeProtocol()) -> Dict:
  """Every probe of `protocol` on a frozen trunk; see the module docstring.

  Returns {"linear": {...}, "knn": {...}, "num_train", "num_val", "num_test", "seconds"}; each probe
  gives its test top-1 with its standard error, the chosen hyper-parameter and the validation top-1
  of every candidate.
  """
  if config.lasso_l1 is not None or config.augment:
    raise ValueError("run_probes reads cached block-3 features: no eval lasso, no augmentation")
  start = time.time()
  splits = {role: getattr(protocol, f"{role}_split") for role in ("train", "val", "test")}
  bn_images = 0
  if protocol.reestimate_bn:
    batches = linear.image_batches(source, splits["train"], config, False, 256).take(BN_IMAGES // 256)
    bn_images = reestimate_batchnorm(trunk, (images for images, _, _ in batches))
  data = {role: extract_split(trunk, source, split, config) for role, split in splits.items()}
  test_groups = source.groups(splits["test"])
  val_groups = source.groups(splits["val"])
  result = {f"num_{role}": int(len(d[1])) for role, d in data.items()}
  result["splits"] = splits
  result["bn_reestimated_on"] = bn_images
  (train_x, train_y), (val_x, val_y), (test_x, test_y) = data["train"], data["val"], data["test"]
  num_classes = source.num_classes

  if "linear" in protocol.probes:
    val_top1, trained = {}, {}
    for wd in protocol.weight_decays:
      keras.utils.set_random_seed(config.seed)  # the same initialisation and batches for every wd
      trainer = linear.ProbeTrainer(trunk, num_classes, dataclasses.replace(config, weight_decay=wd))
      trainer.train_on_features(train_x, train_y)
      val_top1[wd] = accuracy_and_se(trainer.predict(val_x) == val_y, val_groups)[0]
      trained[wd] = (trainer, float(np.mean(trainer.predict(train_x) == train_y)))
      logging.info("linear probe wd=%g: train top1 %.4f, val top1 %.4f", wd, trained[wd][1], val_top1[wd])
    wd = _choose(val_top1)
    top1, se = accuracy_and_se(trained[wd][0].predict(test_x) == test_y, test_groups)
    result["linear"] = {"top1": top1, "se": se, "weight_decay": wd, "val_top1": val_top1[wd],
                        "train_top1": trained[wd][1],
                        "val_top1_by_weight_decay": {str(k): v for k, v in val_top1.items()},
                        "train_top1_by_weight_decay": {str(k): v[1] for k, v in trained.items()}}

  if "knn" in protocol.probes:
    bank, queries = knn_features(train_x), {"val": knn_features(val_x), "test": knn_features(test_x)}
    val_pred = knn_predict(bank, train_y, queries["val"], protocol.knn_ks, num_classes, protocol.knn_temperature)
    val_top1 = {k: accuracy_and_se(p == val_y, val_groups)[0] for k, p in val_pred.items()}
    k = _choose(val_top1)
    test_pred = knn_predict(bank, train_y, queries["test"], [k], num_classes, protocol.knn_temperature)[k]
    top1, se = accuracy_and_se(test_pred == test_y, test_groups)
    result["knn"] = {"top1": top1, "se": se, "k": k, "val_top1": val_top1[k],
                     "temperature": protocol.knn_temperature,
                     "val_top1_by_k": {str(kk): v for kk, v in val_top1.items()}}
  result["seconds"] = time.time() - start
  return result
