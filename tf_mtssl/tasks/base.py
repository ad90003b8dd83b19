"""The task interface: every self-supervised task is one module with one `Task` subclass.

Data flows one way: source -> `build_dataset` (tf.data preprocessing) -> `trunk_inputs` -> trunk
-> `build_head` (the head) -> `loss_and_metrics`. The trainer, the multi-task model, the lasso and the
binaries know tasks only through this class and the registry in `tf_mtssl.tasks`.

Per-task hyper-parameters live in the task's `Options` dataclass; every field becomes a
`--<task>_<field>` absl flag of the training binaries (see `tf_mtssl.cli`), so adding a task
means one new module plus one registry line.
"""

import abc
import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

import keras
import tensorflow as tf

Batch = Dict[str, tf.Tensor]

# Every source element and batch carries `tf_mtssl.data.sources.NUM_CORRUPT_KEY` (how many unreadable
# images the source skipped so far); tasks pass it through their maps and the trainer logs it.


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """For tasks without hyper-parameters of their own."""


class Task(abc.ABC):
  """Base class of a self-supervised task.

  Attributes:
    name: registry name (`rp`, `col`, `ex`, `ms`).
    Options: frozen dataclass of the task's hyper-parameters, every field a `tf_mtssl.core.configs.field`
      (its default and help once; the flag generator makes --<task>_<field> from it).
  """

  name: ClassVar[str]
  Options: ClassVar[type] = NoOptions

  def __init__(self, options: Optional[Any] = None, *, image_size: int = 224, harmonize: bool = False):
    """Args:
      options: an instance of `Options` (defaults when None).
      image_size: side of the square full-image input of image-level tasks (col, ex, ms).
      harmonize: paper_spec 6: feed tasks that support it the colorization (gray) preprocessing.
    """
    self.options = options if options is not None else self.Options()
    if not isinstance(self.options, self.Options):
      raise TypeError(f"Task {self.name!r} expects options of type {self.Options.__name__}, "
                      f"got {type(self.options).__name__}")
    if image_size < 16:
      raise ValueError(f"image_size must be >= 16, got {image_size}")
    self.image_size = int(image_size)
    self.harmonize = bool(harmonize)

  def require(self, field: str, ok: bool, requirement: str) -> None:
    """Raises ValueError naming the option (by its flag, --<task>_<field>), its limit and its value."""
    if not ok:
      raise ValueError(f"--{self.name}_{field} must be {requirement}, got {getattr(self.options, field)!r}")

  # ---- input pipeline -------------------------------------------------------------------------
  @abc.abstractmethod
  def build_dataset(self, data: str, batch_size: int, *, seed: int = 0,
                    tfds_data_dir: Optional[str] = None,
                    input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """Returns an infinite dataset of batched feature dicts.

    Args:
      data: source spec (`embedded`, `tfds:NAME`, a folder, a TFRecord glob); see
        `tf_mtssl.data.sources`.
      batch_size: examples per batch for this pipeline (the per-replica batch under a strategy).
      seed: makes the pipeline deterministic.
      tfds_data_dir: where prepared tensorflow-datasets live.
      input_context: from `distribute_datasets_from_function`; used to shard per worker.
    Every batch must contain `NUM_CORRUPT_KEY`.
    """

  @abc.abstractmethod
  def trunk_inputs(self, batch: Batch) -> tf.Tensor:
    """The float images `[N, H, W, 3]` (trunk preprocessing applied) that the trunk encodes."""

  @abc.abstractmethod
  def trunk_input_shape(self) -> Tuple[int, int, int]:
    """(H, W, 3) of one trunk input; used to size the head."""

  # ---- model ------------------------------------------------------------------------------------
  @abc.abstractmethod
  def build_head(self, feature_shape: Tuple[int, int, int]) -> keras.Model:
    """The head: maps trunk features `[N, h, w, C]` (feature_shape = (h, w, C)) to predictions.

    Final logits must be float32 (mixed precision): use `dtype="float32"` on the last layer.
    """

  @abc.abstractmethod
  def loss_and_metrics(self, batch: Batch, predictions: Any) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
    """Scalar float32 loss (mean over this batch's examples) and a dict of scalar metrics."""

  # ---- optional ---------------------------------------------------------------------------------
  def summary_images(self, batch: Batch, predictions: Any) -> Dict[str, tf.Tensor]:
    """Images `[k, H, W, 3]` in [0, 1] for TensorBoard, keyed by name. None by default."""
    del batch, predictions
    return {}

  def __repr__(self):
    return f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}, options={self.options})"
