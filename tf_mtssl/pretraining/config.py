"""What a pretraining run is configured by: `PretrainConfig` (tasks, data, the run directory,
distribution) and `TrainConfig` (optimisation and bookkeeping). Their fields are the flags of
`python -m tf_mtssl.pretrain` (`tf_mtssl.cli`), with these defaults and help texts."""

import dataclasses
from typing import Dict, Optional, Tuple

from tf_mtssl.core import configs, devices
from tf_mtssl.pretraining import distribution as distribution_lib
from tf_mtssl.pretraining import optimizer as optimizer_lib

# --mixed_precision -> Keras dtype policy of the model's layers. Heads emit float32 logits and the
# losses are computed in float32 (Task contract); float16 also gets dynamic loss scaling.
MIXED_PRECISION_POLICIES = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}

# --jit_compile: XLA for each task's forward and backward pass (the optimizer's update, which talks to the
# other replicas, stays outside). auto: on when a GPU is visible; off on CPUs, where XLA measured 15-40 %
# slower (machine notes).
JIT_COMPILE_MODES = devices.AUTO_MODES


def resolve_jit_compile(mode: str) -> bool:
  return devices.on_when_gpu(mode, "jit_compile")




@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The run: which tasks read which data, where the run lives, how it is distributed."""
  tasks: str = configs.field("rp", "Comma-separated tasks (or 'all'); see tf_mtssl.tasks for the registered ones.")
  model_dir: str = configs.field("runs/pretrain", "Run directory: checkpoints, run_config.json, TensorBoard logs.")
  data: str = configs.field("embedded", "Image source: 'embedded', 'photos', 'fashion_mnist', 'tfds:NAME[:SPLIT]' "
                            "(prepared in --tfds_data_dir, never downloaded), a folder of images, or a TFRecord glob.")
  task_data: Dict[str, str] = configs.field({}, "Per-task source override TASK=SPEC (e.g. ms=/data/masks-*.tfrecord).")
  tfds_data_dir: Optional[str] = configs.field(None, "tensorflow-datasets data_dir holding prepared datasets "
                                               "(None: the tfds default, ~/tensorflow_datasets).")
  image_size: int = configs.field(224, "Side of the square full-image inputs of col/ex/ms (paper_spec 3).")
  harmonize: bool = configs.field(False, "paper_spec 6: rp uses colorization's gray input instead of colour dropping.")
  distribution: str = configs.field("default", "default: one device; mirrored: all local GPUs or the CPU; "
                                    "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG.",
                                    choices=tuple(distribution_lib.DISTRIBUTIONS))
  cluster_timeout_s: float = configs.field(distribution_lib.DEFAULT_CLUSTER_TIMEOUT_S,
                                           "multi_worker: longest wait for every worker of TF_CONFIG's cluster to "
                                           "start; after it, the worker fails naming the addresses that did not answer.")

  def data_of(self, task: str) -> str:
    """The source `task` reads: its --task_data override, else --data."""
    return self.task_data.get(task, self.data)


@dataclasses.dataclass
class TrainConfig:
  """Optimisation and bookkeeping of pretraining (paper_spec 4; values not recovered from the paper are [I])."""
  train_steps: int = configs.field(100_000, "Total steps (each step = one batch of every task).")
  batch_size: int = configs.field(32, "Global batch per task (examples of that task's pipeline).")
  task_batch_sizes: Dict[str, int] = configs.field({}, "Per-task global batch override TASK=N (e.g. rp=56).",
                                                   flag="task_batch_size")
  learning_rate: float = configs.field(1e-4, "Peak learning rate of every task's RMSProp; a normalised step moves "
                                       "each weight by about this much (tf_mtssl/pretraining/optimizer.py).")
  warmup_steps: int = configs.field(1000, "Linear learning-rate warm-up steps.")
  rmsprop_rho: float = configs.field(0.9, "RMSProp decay of the second moment (paper_spec 4 [I]).")
  rmsprop_momentum: float = configs.field(0.9, "RMSProp momentum (paper_spec 4 [I]).")
  rmsprop_epsilon: float = configs.field(1e-6, "RMSProp epsilon, added to the gradient RMS (outside the root): "
                                         "far below the trunk's per-element gradients, so each task's RMSProp "
                                         "normalises it (tf_mtssl/pretraining/optimizer.py).")
  weight_decay: float = configs.field(1e-4, "Decoupled weight decay on kernels, applied once per step whatever "
                                      "the number of tasks (paper_spec 4 [I]).")
  trunk_update: str = configs.field("sum", "How the per-task RMSProp updates combine on the shared trunk: sum "
                                    "(each task's optimizer applies its own update, paper_spec 4) or mean (the "
                                    "trunk step of a single-task run).", choices=optimizer_lib.COMBINE_MODES)
  seed: int = configs.field(0, "Seed of initialisation and input pipelines.")
  log_every: int = configs.field(10, "Steps between scalar summaries.")
  checkpoint_every: int = configs.field(500, "Steps between checkpoints.")
  keep_checkpoints: int = configs.field(5, "Checkpoints kept.")
  image_summary_every: int = configs.field(500, "Steps between TensorBoard image summaries (0: never).")
  grad_cosine_every: int = configs.field(100, "Steps between task-gradient cosine summaries (0: never).")
  progress_bar: bool = configs.field(True, "Show a progress bar (step, losses, rate, ETA).")
  mixed_precision: str = configs.field("none", "Keras mixed precision: bfloat16 (CPUs with AVX512-BF16, TPUs, "
                                       "recent GPUs) or float16 (GPUs; adds dynamic loss scaling). Heads' "
                                       "logits and losses stay float32.", choices=tuple(MIXED_PRECISION_POLICIES))
  steps_per_loop: int = configs.field(10, "Training steps per tf.function call: the host waits for the device "
                                      "once per call (calls also end at log, checkpoint, image and cosine "
                                      "steps). A signal stops the run after the current call.")
  jit_compile: str = configs.field("auto", "XLA for every task's forward and backward pass: auto = on when a GPU "
                                   "is visible, off on CPUs (where XLA measured slower).", choices=JIT_COMPILE_MODES)
  profile_steps: Optional[Tuple[int, ...]] = configs.field(None, "FIRST,LAST: write a TensorBoard profile of "
                                                           "these steps (1-based) to <model_dir>/train.")
  stop_grace_s: float = configs.field(60.0, "After SIGTERM/SIGINT, the longest wait (at least 3x the longest "
                                      "call) for the current call to end and a checkpoint to be saved; past it "
                                      "(a starved input pipeline) the run exits without saving, resumable from "
                                      "its newest checkpoint [I].")
  def __post_init__(self):
    for name in ("train_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "steps_per_loop"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    bad = {k: v for k, v in self.task_batch_sizes.items() if v <= 0}
    if bad:
      raise ValueError(f"Per-task batch sizes must be > 0, got {bad}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if not 0 <= self.rmsprop_rho < 1 or not 0 <= self.rmsprop_momentum < 1 or self.rmsprop_epsilon <= 0:
      raise ValueError(f"Bad RMSProp settings: rho={self.rmsprop_rho}, momentum={self.rmsprop_momentum}, "
                       f"epsilon={self.rmsprop_epsilon}")

    if self.trunk_update not in optimizer_lib.COMBINE_MODES:
      raise ValueError(f"trunk_update must be one of {optimizer_lib.COMBINE_MODES}, got {self.trunk_update!r}")
    if self.jit_compile not in JIT_COMPILE_MODES:
      raise ValueError(f"jit_compile must be one of {JIT_COMPILE_MODES}, got {self.jit_compile!r}")
    if self.mixed_precision not in MIXED_PRECISION_POLICIES:
      raise ValueError(f"mixed_precision must be one of {sorted(MIXED_PRECISION_POLICIES)}, got "
                       f"{self.mixed_precision!r}")
    if self.stop_grace_s <= 0:
      raise ValueError(f"stop_grace_s must be > 0, got {self.stop_grace_s}")
    if self.profile_steps is not None:
      if len(self.profile_steps) != 2:
        raise ValueError(f"--profile_steps takes FIRST,LAST step numbers, got {self.profile_steps}")
      first, last = self.profile_steps
      if not 1 <= first <= last:
        raise ValueError(f"profile_steps must be (first, last) with 1 <= first <= last, got {self.profile_steps}")

  def batch_size_for(self, task: str) -> int:
    """Global batch of `task`: its override, else `batch_size`."""
    return self.task_batch_sizes.get(task, self.batch_size)


