"""Tests of tf_mtssl.evaluation.metrics against plain NumPy references and hand cases."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_mtssl.evaluation import metrics


# ---- depth ----------------------------------------------------------------------------------------
def _numpy_depth_metrics(pred, gt, mask):
  valid = (gt > 0) & mask
  d, g = np.maximum(pred[valid], 1e-3).astype(np.float64), gt[valid].astype(np.float64)
  ratio = np.maximum(d / g, g / d)
  return {
      "delta1": np.mean(ratio < 1.25), "delta2": np.mean(ratio < 1.25 ** 2),
      "delta3": np.mean(ratio < 1.25 ** 3), "abs_rel": np.mean(np.abs(d - g) / g),
      "sq_rel": np.mean((d - g) ** 2 / g), "rmse": np.sqrt(np.mean((d - g) ** 2)),
      "rmse_log": np.sqrt(np.mean((np.log(d) - np.log(g)) ** 2)),
      "log10": np.mean(np.abs(np.log10(d) - np.log10(g))), "num_valid": int(valid.sum()),
  }


def test_depth_metrics_match_numpy_with_invalid_pixels():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.5, 10.0, size=(3, 17, 23)).astype(np.float32)
  gt[rng.random(gt.shape) < 0.3] = 0.0                       # missing depth
  pred = (gt * rng.uniform(0.6, 1.6, size=gt.shape) + rng.normal(0, 0.2, gt.shape)).astype(np.float32)
  pred[0, 0, :5] = -1.0                                       # non-positive predictions get clamped
  mask = rng.random(gt.shape) < 0.8
  got = tf.function(metrics.depth_metrics)(pred, gt, mask)
  want = _numpy_depth_metrics(pred, gt, mask)
  assert int(got["num_valid"]) == want["num_valid"]
  for name in metrics.DEPTH_METRIC_NAMES:
    assert got[name].dtype == tf.float32
    np.testing.assert_allclose(float(got[name]), want[name], rtol=2e-5, err_msg=name)
  # delta thresholds really discriminate on this data (a test that can fail).
  assert 0.1 < float(got["delta1"]) < float(got["delta2"]) <= float(got["delta3"]) <= 1.0


def test_depth_metrics_without_mask_and_perfect_prediction():
  gt = np.array([[[1.0, 2.0], [0.0, 4.0]]], np.float32)
  got = metrics.depth_metrics(gt, gt)
  assert int(got["num_valid"]) == 3
  assert float(got["delta1"]) == 1.0
  for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10"):
    assert float(got[name]) == pytest.approx(0.0, abs=1e-7)


def test_depth_metrics_no_valid_pixel_gives_nan_and_zero_count():
  got = metrics.depth_metrics(tf.ones([2, 4, 4]), tf.zeros([2, 4, 4]))
  assert int(got["num_valid"]) == 0
  for name in metrics.DEPTH_METRIC_NAMES:
    assert math.isnan(float(got[name])), name


# ---- classification -------------------------------------------------------------------------------
def test_top_k_accuracy_hand_example():
  logits = np.array([[0.1, 0.5, 0.2, 0.9],    # ranking 3, 1, 2, 0
                     [0.8, 0.1, 0.05, 0.0],   # ranking 0, 1, 2, 3
                     [0.0, 0.1, 0.3, 0.2]],   # ranking 2, 3, 1, 0
                    np.float32)
  labels = np.array([1, 0, 0])
  assert float(metrics.top_k_accuracy(labels, logits, 1)) == pytest.approx(1 / 3)
  assert float(metrics.top_k_accuracy(labels, logits, 2)) == pytest.approx(2 / 3)
  assert float(metrics.top_k_accuracy(labels, logits, 4)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="k must be"):
    metrics.top_k_accuracy(labels, logits, 0)


# ---- VOC detection mAP ----------------------------------------------------------------------------
def _devkit_voc_eval(gt_boxes, gt_labels, gt_difficult, det_boxes, det_labels, det_scores,
                     num_classes, ovthresh=0.5, use_07_metric=True):
  """A plain port of py-faster-rcnn's voc_eval.py (itself a port of the VOC devkit), per class.

  Boxes are converted to the devkit's (xmin, ymin, xmax, ymax) so this code reads like the original.
  """
  aps = []
  for cls in range(num_classes):
    class_recs = {}
    npos = 0
    for img in range(len(gt_boxes)):
      sel = np.asarray(gt_labels[img]) == cls
      bbox = np.asarray(gt_boxes[img], float).reshape(-1, 4)[sel][:, [1, 0, 3, 2]]
      difficult = np.asarray(gt_difficult[img], bool)[sel]
      det = [False] * len(bbox)
      npos = npos + sum(~difficult)
      class_recs[img] = {"bbox": bbox, "difficult": difficult, "det": det}
    image_ids, confidence, bb = [], [], []
    for img in range(len(det_boxes)):
      for box, label, score in zip(np.asarray(det_boxes[img]).reshape(-1, 4), det_labels[img],
                                   det_scores[img]):
        if label == cls:
          image_ids.append(img)
          confidence.append(score)
          bb.append(box[[1, 0, 3, 2]])
    if npos == 0:
      aps.append(np.nan)
      continue
    confidence = np.array(confidence)
    bb = np.array(bb, float).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="stable")
    bb = bb[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
      R = class_recs[image_ids[d]]
      bb_d = bb[d, :].astype(float)
      ovmax = -np.inf
      BBGT = R["bbox"].astype(float)
      if BBGT.size > 0:
        ixmin = np.maximum(BBGT[:, 0], bb_d[0])
        iymin = np.maximum(BBGT[:, 1], bb_d[1])
        ixmax = np.minimum(BBGT[:, 2], bb_d[2])
        iymax = np.minimum(BBGT[:, 3], bb_d[3])
        iw = np.maximum(ixmax - ixmin + 1., 0.)
        ih = np.maximum(iymax - iymin + 1., 0.)
        inters = iw * ih
        uni = ((bb_d[2] - bb_d[0] + 1.) * (bb_d[3] - bb_d[1] + 1.) +
               (BBGT[:, 2] - BBGT[:, 0] + 1.) * (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
        overlaps = inters / uni
        ovmax = np.max(overlaps)
        jmax = np.argmax(overlaps)
      if ovmax > ovthresh:
        if not R["difficult"][jmax]:
          if not R["det"][jmax]:
            tp[d] = 1.
            R["det"][jmax] = 1
          else:
            fp[d] = 1.
      else:
        fp[d] = 1.
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
      ap = 0.
      for t in np.arange(0., 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.
    else:
      mrec = np.concatenate(([0.], rec, [1.]))
      mpre = np.concatenate(([0.], prec, [0.]))
      for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
      i = np.where(mrec[1:] != mrec[:-1])[0]
      ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    aps.append(ap)
  return np.array(aps)


def _random_boxes(rng, n, size=100.0):
  y, x = rng.uniform(0, size, (2, n))
  h, w = rng.uniform(5, 40, (2, n))
  return np.stack([y, x, y + h, x + w], axis=1)


def _random_detection_problem(rng, num_images=12, num_classes=4):
  gt_b, gt_l, gt_d, det_b, det_l, det_s = [], [], [], [], [], []
  for _ in range(num_images):
    g = int(rng.integers(0, 6))
    boxes = _random_boxes(rng, g)
    labels = rng.integers(0, num_classes, g)
    gt_b.append(boxes)
    gt_l.append(labels)
    gt_d.append(rng.random(g) < 0.25)
    # Detections: jittered copies of ground truth (some duplicated) plus random boxes.
    jittered = boxes + rng.normal(0, 4, boxes.shape)
    copies = np.concatenate([jittered, jittered[: g // 2] + rng.normal(0, 2, (g // 2, 4))])
    copy_labels = np.concatenate([labels, labels[: g // 2]])
    flip = rng.random(len(copy_labels)) < 0.15
    copy_labels = np.where(flip, rng.integers(0, num_classes, len(copy_labels)), copy_labels)
    r = int(rng.integers(0, 5))
    det_b.append(np.concatenate([copies, _random_boxes(rng, r)]))
    det_l.append(np.concatenate([copy_labels, rng.integers(0, num_classes, r)]))
    det_s.append(rng.random(len(det_l[-1])))
  return gt_b, gt_l, gt_d, det_b, det_l, det_s


@pytest.mark.parametrize("use_07_metric", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_map_matches_devkit_port_on_random_detections(seed, use_07_metric):
  rng = np.random.default_rng(seed)
  problem = _random_detection_problem(rng)
  got = metrics.voc_detection_map(*problem, num_classes=4, use_07_metric=use_07_metric)
  want = _devkit_voc_eval(*problem, num_classes=4, use_07_metric=use_07_metric)
  np.testing.assert_allclose(got["AP"], want, rtol=1e-12, equal_nan=True)
  assert got["mAP"] == pytest.approx(np.nanmean(want))
  assert 0.0 < got["mAP"] < 1.0   # imperfect detections: neither trivial value


def test_voc_map_perfect_detections_is_one():
  gt = [np.array([[10, 10, 50, 60], [20, 30, 80, 90]], float), np.array([[0, 0, 30, 30]], float)]
  labels = [np.array([0, 1]), np.array([1])]
  difficult = [np.array([False, False]), np.array([False])]
  scores = [np.array([0.9, 0.8]), np.array([0.7])]
  for use_07 in (True, False):
    out = metrics.voc_detection_map(gt, labels, difficult, gt, labels, scores, num_classes=3,
                                    use_07_metric=use_07)
    assert out["mAP"] == pytest.approx(1.0)
    np.testing.assert_allclose(out["AP"][:2], [1.0, 1.0])
    assert np.isnan(out["AP"][2])   # class without ground truth: NaN, excluded from the mean


def test_voc_map_duplicate_detection_is_false_positive():
  gt = [np.array([[10, 10, 50, 50]], float), np.array([[10, 10, 50, 50]], float)]
  labels = [np.array([0]), np.array([0])]
  difficult = [np.array([False]), np.array([False])]
  # Image 0: the object is found twice (the duplicate scores 0.9, above image 1's true positive 0.5).
  det = [np.array([[10, 10, 50, 50], [11, 10, 50, 51]], float), np.array([[10, 10, 50, 50]], float)]
  det_labels = [np.array([0, 0]), np.array([0])]
  scores = [np.array([0.95, 0.9]), np.array([0.5])]
  out = metrics.voc_detection_map(gt, labels, difficult, det, det_labels, scores, num_classes=1,
                                  use_07_metric=False)
  # Ranked: TP (r=.5, p=1), FP (r=.5, p=.5), TP (r=1, p=2/3) -> AP = .5 * 1 + .5 * 2/3.
  assert out["AP"][0] == pytest.approx(0.5 + 0.5 * 2 / 3)
  without_dup = metrics.voc_detection_map(gt, labels, difficult, [det[0][:1], det[1]],
                                          [det_labels[0][:1], det_labels[1]],
                                          [scores[0][:1], scores[1]], num_classes=1, use_07_metric=False)
  assert without_dup["AP"][0] == pytest.approx(1.0)


def test_voc_map_detection_of_difficult_object_is_ignored():
  gt = [np.array([[10, 10, 50, 50], [60, 60, 90, 90]], float)]
  labels = [np.array([0, 0])]
  difficult = [np.array([False, True])]
  # Highest score on the difficult object: ignored, so AP stays 1 (would be 0.5-ish if it were an FP).
  det = [np.array([[60, 60, 90, 90], [10, 10, 50, 50]], float)]
  out = metrics.voc_detection_map(gt, labels, difficult, det, [np.array([0, 0])],
                                  [np.array([0.9, 0.8])], num_classes=1, use_07_metric=False)
  assert out["AP"][0] == pytest.approx(1.0)
  # Only the difficult object detected: no true positive, so AP is 0 (the difficult match is no TP).
  out = metrics.voc_detection_map(gt, labels, difficult, [det[0][:1]], [np.array([0])],
                                  [np.array([0.9])], num_classes=1)
  assert out["AP"][0] == pytest.approx(0.0)


def test_voc_map_11_point_hand_value():
  gt = [np.array([[0, 0, 9, 9], [20, 20, 29, 29]], float)]
  det = [np.array([[0, 0, 9, 9], [50, 50, 59, 59]], float)]   # one TP, then one FP
  out = metrics.voc_detection_map(gt, [np.array([0, 0])], [np.array([False, False])], det,
                                  [np.array([0, 0])], [np.array([0.9, 0.1])], num_classes=1)
  # Recall reaches 0.5 at precision 1: thresholds 0.0..0.5 (6 of 11) give 1, the rest 0.
  assert out["AP"][0] == pytest.approx(6 / 11)


def test_voc_map_rejects_bad_input():
  with pytest.raises(ValueError, match="same length"):
    metrics.voc_detection_map([np.zeros((0, 4))], [], [], [], [], [], num_classes=1)
  with pytest.raises(ValueError, match=r"det_labels must be in \[0, 2\)"):
    metrics.voc_detection_map([np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0, bool)],
                              [np.zeros((1, 4))], [np.array([2])], [np.array([0.5])], num_classes=2)
