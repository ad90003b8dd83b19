"""Faster R-CNN on the self-supervised trunk (paper_spec 7.2), in core TF / Keras ops.

Layout (the TF Object Detection API's ResNet-101 Faster R-CNN and Detectron2's C4 models):
  images -> trunk up to block 3 (stride 16; with the lasso, an alpha-weighted sum of the block-3 unit
  outputs, paper_spec 5) = the shared feature map
  -> RPN: 3x3 conv + ReLU, 1x1 objectness logits (A per cell) and 1x1 box deltas (4A per cell)
  -> proposals: decode, clip, top-N, NMS 0.7, top-N
  -> RoI features: `tf.image.crop_and_resize` to 14x14 (one sample at each bin centre, i.e. RoIAlign
     with one sample per bin), 2x2 max-pool -> 7x7
  -> block 4: 3 freshly initialised ResNet-v2 bottleneck units (`tf_mtssl.model.trunk.bottleneck_unit`,
     32 x base_width = 2048 output channels, bottleneck 8 x base_width = 512), all at stride 1: the
     2x2 max-pool already halves the resolution, as in the TF OD API (slim's resnet_v2 block4 has
     stride 1 too) -> slim's post-norm BN + ReLU -> global average pool
  -> class logits (K + 1, background first) and class-specific box deltas (4K).
Test time: softmax, per-class box decoding, per-class NMS.

Boxes are `[ymin, xmin, ymax, xmax]` in pixels of the input image throughout; `image_shape` [B, 2]
gives each image's true (height, width) inside a zero-padded batch.
"""

import dataclasses
from typing import Dict, Optional, Tuple

import keras
from keras import layers
import tensorflow as tf

from tf_mtssl.core import configs
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.evaluation import common
from tf_mtssl.evaluation.detection import box_ops
from tf_mtssl.evaluation.detection import targets as targets_lib

TRUNK_BN_MODES = ("train", "frozen")




@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """Architecture and target-assignment settings. Defaults: py-faster-rcnn / Detectron VOC recipe
  at shorter side 600 (paper_spec 7.2 [I]). Every field (but num_classes) is a flag of
  `tf_mtssl.finetune_detection`."""
  num_classes: int = configs.field(20, "Object classes (from the data).")
  anchor_scales: Tuple[float, ...] = configs.field(
      (128.0, 256.0, 512.0), "Anchor sides in pixels (py-faster-rcnn at shorter side 600).")
  anchor_ratios: Tuple[float, ...] = configs.field((0.5, 1.0, 2.0), "Anchor aspect ratios (height / width).")
  rpn_channels: int = configs.field(512, "Channels of the RPN's 3x3 conv (py-faster-rcnn).")
  rpn_positive_iou: float = configs.field(0.7, "Anchors with IoU >= this are RPN positives.")
  rpn_negative_iou: float = configs.field(0.3, "Anchors with best IoU < this are RPN negatives.")
  rpn_batch_per_image: int = configs.field(256, "Anchors sampled per image for the RPN loss.")
  rpn_positive_fraction: float = configs.field(0.5, "Largest fraction of positives among sampled anchors.")
  rpn_nms_iou: float = configs.field(0.7, "NMS IoU threshold of the proposals.")
  rpn_pre_nms_train: int = configs.field(12000, "Top-scoring anchors kept before NMS in training.")
  rpn_post_nms_train: int = configs.field(2000, "Proposals kept after NMS in training.")
  rpn_pre_nms_test: int = configs.field(6000, "Top-scoring anchors kept before NMS at test time.")
  rpn_post_nms_test: int = configs.field(300, "Proposals kept after NMS at test time.")
  rpn_box_beta: float = configs.field(1.0 / 9.0, "Smooth-L1 beta of the RPN box loss (py-faster-rcnn sigma 3).")
  roi_batch_per_image: int = configs.field(512, "RoIs sampled per image for the second stage.")
  roi_fg_fraction: float = configs.field(0.25, "Largest fraction of foreground RoIs.")
  roi_fg_iou: float = configs.field(0.5, "RoIs with IoU >= this are foreground; below, background.")
  roi_bg_iou_low: float = configs.field(0.0, "Lowest IoU of background RoIs (Detectron 0.0; py-faster-rcnn 0.1).")
  rcnn_box_beta: float = configs.field(1.0, "Smooth-L1 beta of the second-stage box loss.")
  box_weights: Tuple[float, ...] = configs.field(
      (10.0, 10.0, 5.0, 5.0), "Second-stage box-delta weights (y, x, h, w) (py-faster-rcnn, Detectron).")
  crop_size: int = configs.field(14, "RoI crop side before the 2x2 max-pool (TF OD API: 14 -> 7x7).")
  test_score_threshold: float = configs.field(0.05, "Detections scoring below this are dropped at test time.")
  test_nms_iou: float = configs.field(0.3, "Per-class NMS IoU threshold at test time (py-faster-rcnn VOC).")
  max_detections: int = configs.field(100, "Detections kept per image at test time.")
  trunk_bn: str = configs.field("frozen", "Trunk batch norm while fine-tuning: 'frozen' (moving statistics "
                         "used, gamma/beta fixed: py-faster-rcnn, Detectron, TF OD API) or 'train' "
                         "(batch statistics, gamma/beta trained); see FasterRCNN.")
  bn_momentum: float = configs.field(0.997, "Moving-average decay of every BN layer of the detector "
                              "(slim's 0.997; smaller for short runs).")

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    if self.trunk_bn not in TRUNK_BN_MODES:
      raise ValueError(f"trunk_bn must be one of {TRUNK_BN_MODES}, got {self.trunk_bn!r}")
    if self.crop_size < 2 or self.crop_size % 2:
      raise ValueError(f"crop_size must be an even number >= 2 (2x2 max-pool), got {self.crop_size}")
    for name in ("rpn_pre_nms_train", "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test",
                 "rpn_batch_per_image", "roi_batch_per_image", "max_detections", "rpn_channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not (0.0 < self.rpn_positive_fraction <= 1.0 and 0.0 < self.roi_fg_fraction <= 1.0):
      raise ValueError("rpn_positive_fraction and roi_fg_fraction must be in (0, 1]")
    if not self.rpn_negative_iou <= self.rpn_positive_iou:
      raise ValueError(f"rpn_negative_iou {self.rpn_negative_iou} > rpn_positive_iou {self.rpn_positive_iou}")
    if not self.anchor_scales or not self.anchor_ratios:
      raise ValueError("anchor_scales and anchor_ratios must not be empty")
    if len(self.box_weights) != 4 or min(self.box_weights) <= 0:
      raise ValueError(f"box_weights must be 4 positive numbers, got {self.box_weights}")

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_scales) * len(self.anchor_ratios)


def build_rpn_head(channels_in: int, num_anchors: int, rpn_channels: int) -> keras.Model:
  """3x3 conv + ReLU, then per-anchor objectness logits [B, h, w, A] and deltas [B, h, w, 4A]."""
  init = keras.initializers.RandomNormal(stddev=0.01)   # py-faster-rcnn
  x = inputs = keras.Input((None, None, channels_in), name="features")
  x = layers.Conv2D(rpn_channels, 3, padding="same", activation="relu", kernel_initializer=init,
                    name="rpn_conv")(x)
  objectness = layers.Conv2D(num_anchors, 1, kernel_initializer=init, dtype="float32",
                             name="rpn_objectness")(x)
  deltas = layers.Conv2D(4 * num_anchors, 1, kernel_initializer=init, dtype="float32",
                         name="rpn_deltas")(x)
  return keras.Model(inputs, {"objectness": objectness, "deltas": deltas}, name="rpn_head")


def build_box_classifier(channels_in: int, base_width: int, num_classes: int, crop_size: int) -> keras.Model:
  """2x2 max-pool -> fresh block 4 -> post-norm -> global pool -> class logits and per-class deltas."""
  x = inputs = keras.Input((crop_size, crop_size, channels_in), name="roi_features")
  x = layers.MaxPooling2D(2, strides=2, name="roi_pool")(x)
  depth, bottleneck = 32 * base_width, 8 * base_width     # 2048 / 512 at base_width 64
  for unit in range(1, 4):
    x = trunk_lib.bottleneck_unit(x, depth, bottleneck, stride=1, rate=1, name=f"block4_unit{unit}")
  x = layers.BatchNormalization(epsilon=trunk_lib.BN_EPSILON, momentum=trunk_lib.BN_MOMENTUM,
                                name="postnorm_bn")(x)
  x = layers.ReLU(name="postnorm_relu")(x)
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  logits = layers.Dense(num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                        dtype="float32", name="class_logits")(x)
  deltas = layers.Dense(4 * num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
                        dtype="float32", name="box_deltas")(x)
  deltas = layers.Reshape((num_classes, 4), name="box_deltas_per_class")(deltas)
  return keras.Model(inputs, {"logits": logits, "deltas": deltas}, name="box_classifier")


def trunk_channels(trunk: keras.Model) -> int:
  spec = trunk.compute_output_spec(keras.KerasTensor((1, 64, 64, 3)))
  return int(spec["block3"].shape[-1])


def trunk_stride(trunk: keras.Model) -> int:
  """Output stride of the trunk's block 3 (16 for the paper's trunk, paper_spec 2.1)."""
  size = 256
  spec = trunk.compute_output_spec(keras.KerasTensor((1, size, size, 3)))
  return size // int(spec["block3"].shape[1])


class FasterRCNN(keras.Model):
  """Two-stage detector on a `tf_mtssl.model.trunk` block-3 trunk.

  Batch norm [I]: the paper's fine-tuning details are not recovered. With `trunk_bn="frozen"` (default)
  the trunk's BN layers are fixed affine maps, as py-faster-rcnn, Detectron and the TF Object
  Detection API fine-tune detectors: they normalise with the pretrained moving statistics (batch
  statistics of one or two images, `--batch_size=1`, would be noise) and their gamma/beta are not
  trained (made non-trainable, so no optimizer sees them); every other trunk layer is fine-tuned
  (paper_spec 7.2 "whole network fine-tuned"). `"train"` uses batch statistics in training, updates
  the moving averages and trains gamma/beta (a random-init trunk has no statistics worth freezing).
  Block 4 always trains its BN on the RoI batch. `bn_momentum` sets the moving-average decay of every
  BN layer of the detector.

  Attributes:
    trunk: the block-3 trunk (from a pretraining run, an export or random init).
    rpn_head, box_classifier: fresh Keras models.
    lasso: optional `tf_mtssl.model.lasso.LassoCombination` with the evaluation's row (`tf_mtssl.evaluation.common.eval_lasso`) (paper_spec 5:
      `--lasso=eval|both`), or None.
  """

  def __init__(self, trunk: keras.Model, config: DetectorConfig, lasso: Optional[keras.layers.Layer] = None,
               **kwargs):
    super().__init__(name=kwargs.pop("name", "faster_rcnn"), **kwargs)
    self.config = config
    self.trunk = trunk
    self.lasso = lasso
    channels = trunk_channels(trunk)
    if channels % 16:
      raise ValueError(f"Trunk block3 has {channels} channels; expected 16 x base_width")
    self.base_width = channels // 16
    self.stride = trunk_stride(trunk)     # 16: paper_spec 7.2
    self.rpn_head = build_rpn_head(channels, config.num_anchors, config.rpn_channels)
    self.box_classifier = build_box_classifier(channels, self.base_width, config.num_classes,
                                               config.crop_size)
    for model in (self.trunk, self.box_classifier):
      for layer in model.layers:   # functional models: every BN layer is a direct layer
        if isinstance(layer, layers.BatchNormalization):
          layer.momentum = config.bn_momentum
    for layer in self.trunk_batch_norms():
      # Keras 3: a non-trainable BN also runs in inference mode and leaves its statistics alone.
      layer.trainable = config.trunk_bn == "train"

  def trunk_batch_norms(self):
    """The trunk's BatchNormalization layers (frozen or trained as `config.trunk_bn` says)."""
    return [layer for layer in self.trunk.layers if isinstance(layer, layers.BatchNormalization)]

  # ---- shared pieces ------------------------------------------------------------------------------
  def features(self, images: tf.Tensor, training: bool) -> tf.Tensor:
    """Shared stride-16 feature map [B, h, w, C] (block 3, or the lasso combination of its units)."""
    trunk_training = training and self.config.trunk_bn == "train"
    out = self.trunk(images, training=trunk_training)
    if self.lasso is None:
      return out["block3"]
    return self.lasso(out["units"], row=common.EVAL_LASSO_ROW)

  def rpn(self, features: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Objectness logits [B, N], deltas [B, N, 4] and anchors [N, 4], N = h * w * A (row-major)."""
    out = self.rpn_head(features)
    shape = tf.shape(features)
    batch = shape[0]
    anchors = box_ops.generate_anchors(shape[1], shape[2], self.stride, self.config.anchor_scales,
                                       self.config.anchor_ratios)
    return {"objectness": tf.reshape(out["objectness"], [batch, -1]),
            "deltas": tf.reshape(out["deltas"], [batch, -1, 4]),
            "anchors": anchors}

  def proposals(self, rpn_out: Dict[str, tf.Tensor], image_shape: tf.Tensor,
                training: bool) -> Tuple[tf.Tensor, tf.Tensor]:
    """Top-scoring decoded anchors after NMS: boxes [B, P, 4] (zeros past the end) and valid [B, P]."""
    cfg = self.config
    pre_nms = cfg.rpn_pre_nms_train if training else cfg.rpn_pre_nms_test
    post_nms = cfg.rpn_post_nms_train if training else cfg.rpn_post_nms_test
    scores = tf.stop_gradient(rpn_out["objectness"])
    boxes = box_ops.decode(tf.stop_gradient(rpn_out["deltas"]), rpn_out["anchors"][None])
    boxes = box_ops.clip_boxes(boxes, image_shape)
    k = tf.minimum(pre_nms, tf.shape(scores)[1])
    scores, index = tf.math.top_k(scores, k=k)
    boxes = tf.gather(boxes, index, batch_dims=1)

    def one_image(args):
      b, s = args
      keep = tf.image.non_max_suppression(b, s, post_nms, iou_threshold=cfg.rpn_nms_iou)
      n = tf.shape(keep)[0]
      kept = tf.pad(tf.gather(b, keep), [[0, post_nms - n], [0, 0]])
      valid = tf.range(post_nms) < n
      return kept, valid

    kept, valid = tf.map_fn(one_image, (boxes, scores),
                            fn_output_signature=(tf.TensorSpec([post_nms, 4], tf.float32),
                                                 tf.TensorSpec([post_nms], tf.bool)))
    return tf.stop_gradient(kept), valid

  def roi_features(self, features: tf.Tensor, rois: tf.Tensor) -> tf.Tensor:
    """[B, S, 4] pixel boxes -> [B * S, crop, crop, C] by bilinear sampling at the bin centres."""
    shape = tf.shape(features)
    batch, num = tf.shape(rois)[0], tf.shape(rois)[1]
    size = self.config.crop_size
    boxes = tf.reshape(rois, [-1, 4]) / float(self.stride)            # feature coordinates
    bin_h = (boxes[:, 2] - boxes[:, 0]) / size
    bin_w = (boxes[:, 3] - boxes[:, 1]) / size
    limit_h = tf.cast(shape[1] - 1, tf.float32)
    limit_w = tf.cast(shape[2] - 1, tf.float32)
    # First and last sample points, clamped to the map (RoIAlign's border rule), then normalised the way
    # crop_and_resize expects (coordinate / (size - 1)).
    y1 = tf.clip_by_value(boxes[:, 0] + 0.5 * bin_h, 0.0, limit_h)
    y2 = tf.clip_by_value(boxes[:, 2] - 0.5 * bin_h, 0.0, limit_h)
    x1 = tf.clip_by_value(boxes[:, 1] + 0.5 * bin_w, 0.0, limit_w)
    x2 = tf.clip_by_value(boxes[:, 3] - 0.5 * bin_w, 0.0, limit_w)
    norm_h, norm_w = tf.maximum(limit_h, 1.0), tf.maximum(limit_w, 1.0)
    normalized = tf.stack([y1 / norm_h, x1 / norm_w, y2 / norm_h, x2 / norm_w], axis=1)
    box_indices = tf.repeat(tf.range(batch), num)
    return tf.image.crop_and_resize(features, normalized, box_indices, [size, size])

  # ---- training -----------------------------------------------------------------------------------
  def losses_for_batch(self, batch: Dict[str, tf.Tensor], seed: tf.Tensor) -> Dict[str, tf.Tensor]:
    """The four Faster R-CNN losses of a training batch (without weight decay).

    Args:
      batch: `image` [B, H, W, 3] trunk input (zero-padded), `image_shape` int32 [B, 2],
        `boxes` [B, G, 4] pixels, `labels` int32 [B, G] (0-based), `valid` bool [B, G].
      seed: stateless seed [2] for the anchor and RoI sampling.
    Returns:
      rpn_objectness, rpn_box, rcnn_class, rcnn_box (float32 scalars), their sum `detection_loss`,
      and `num_fg_rois` (foreground RoIs in the batch, for monitoring).
    """
    cfg = self.config
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    image_shape = batch["image_shape"]
    feats = self.features(batch["image"], training=True)
    rpn_out = self.rpn(feats)
    anchor_valid = box_ops.inside_image(rpn_out["anchors"], image_shape)
    rpn_t = targets_lib.rpn_targets(rpn_out["anchors"], anchor_valid, batch["boxes"], batch["valid"],
                                    seeds[0], cfg.rpn_positive_iou, cfg.rpn_negative_iou,
                                    cfg.rpn_batch_per_image, cfg.rpn_positive_fraction)
    sampled = tf.cast(rpn_t["labels"] >= 0, tf.float32)
    positive = tf.cast(rpn_t["labels"] == 1, tf.float32)
    num_sampled = tf.maximum(tf.reduce_sum(sampled), 1.0)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=rpn_out["objectness"])
    rpn_objectness = tf.reduce_sum(bce * sampled) / num_sampled
    rpn_box = tf.reduce_sum(
        tf.reduce_sum(box_ops.smooth_l1(rpn_out["deltas"] - rpn_t["box_targets"], cfg.rpn_box_beta), -1)
        * positive) / num_sampled

    proposals, proposal_valid = self.proposals(rpn_out, image_shape, training=True)
    rois = targets_lib.sample_rois(proposals, proposal_valid, batch["boxes"], batch["labels"],
                                   batch["valid"], seeds[1], cfg.roi_batch_per_image, cfg.roi_fg_fraction,
                                   cfg.roi_fg_iou, cfg.roi_fg_iou, cfg.roi_bg_iou_low, cfg.box_weights)
    head = self.box_classifier(self.roi_features(feats, rois["rois"]), training=True)
    labels = tf.reshape(rois["labels"], [-1])
    roi_sampled = tf.cast(labels >= 0, tf.float32)
    num_rois = tf.maximum(tf.reduce_sum(roi_sampled), 1.0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=head["logits"])
    rcnn_class = tf.reduce_sum(ce * roi_sampled) / num_rois
    fg = labels > 0
    # Class-specific regression: only the deltas of each foreground RoI's own class are trained.
    class_deltas = tf.gather(head["deltas"], tf.maximum(labels - 1, 0), batch_dims=1)
    box_err = tf.reduce_sum(box_ops.smooth_l1(class_deltas - tf.reshape(rois["box_targets"], [-1, 4]),
                                              cfg.rcnn_box_beta), -1)
    rcnn_box = tf.reduce_sum(box_err * tf.cast(fg, tf.float32)) / num_rois
    losses = {"rpn_objectness": rpn_objectness, "rpn_box": rpn_box, "rcnn_class": rcnn_class,
              "rcnn_box": rcnn_box}
    losses["detection_loss"] = tf.add_n(list(losses.values()))
    losses["num_fg_rois"] = tf.reduce_sum(tf.cast(fg, tf.float32))
    return losses

  def regularization_loss(self, weight_decay: float) -> tf.Tensor:
    """weight_decay / 2 * sum of squared conv/dense kernels (plain SGD weight decay), plus the lasso's
    L1 penalty on its alpha row when present."""
    kernels = [v for v in self.trainable_variables if v.path.endswith("kernel")]
    loss = 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in kernels])
    if self.lasso is not None:
      loss += self.lasso.l1_penalty(common.EVAL_LASSO_ROW)
    return loss

  # ---- inference ----------------------------------------------------------------------------------
  def detect(self, images: tf.Tensor, image_shape: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Detections per image after per-class NMS.

    Returns:
      boxes [B, D, 4] pixels of the input image, scores [B, D], classes int32 [B, D] (0-based),
      num_detections int32 [B] (entries past it are padding), D = config.max_detections.
    """
    cfg = self.config
    feats = self.features(images, training=False)
    rpn_out = self.rpn(feats)
    proposals, valid = self.proposals(rpn_out, image_shape, training=False)
    head = self.box_classifier(self.roi_features(feats, proposals), training=False)
    batch, num = tf.shape(proposals)[0], tf.shape(proposals)[1]
    probs = tf.reshape(tf.nn.softmax(head["logits"]), [batch, num, cfg.num_classes + 1])
    probs = probs[:, :, 1:] * tf.cast(valid, tf.float32)[:, :, None]     # drop background, padding
    deltas = tf.reshape(head["deltas"], [batch, num, cfg.num_classes, 4])
    boxes = box_ops.decode(deltas, proposals[:, :, None, :], cfg.box_weights)
    boxes = tf.reshape(box_ops.clip_boxes(tf.reshape(boxes, [batch, -1, 4]), image_shape),
                       [batch, num, cfg.num_classes, 4])
    nms = tf.image.combined_non_max_suppression(
        boxes, probs, max_output_size_per_class=cfg.max_detections, max_total_size=cfg.max_detections,
        iou_threshold=cfg.test_nms_iou, score_threshold=cfg.test_score_threshold, pad_per_class=False,
        clip_boxes=False)
    return {"boxes": nms.nmsed_boxes, "scores": nms.nmsed_scores,
            "classes": tf.cast(nms.nmsed_classes, tf.int32), "num_detections": nms.valid_detections}

  def call(self, inputs: Dict[str, tf.Tensor], training: bool = False) -> Dict[str, tf.Tensor]:
    """Inference: {"image": [B, H, W, 3] trunk input, "image_shape": int32 [B, 2]} -> `detect`."""
    del training
    return self.detect(inputs["image"], inputs["image_shape"])
