"""Faster R-CNN fine-tuning for the PASCAL VOC 2007 detection protocol (paper_spec 7.2).

Box format everywhere in this package: `[ymin, xmin, ymax, xmax]` in pixels of the (resized) input
image, float32, unless a docstring says "normalized".

Modules:
  box_ops   anchors, IoU, box encoding/decoding, clipping.
  targets   RPN anchor labels and second-stage RoI sampling with their regression targets.
  model     the detector (`FasterRCNN`): trunk up to block 3 -> RPN -> RoI crops -> fresh block 4 -> heads.
  data      detection examples (`tfds:voc/2007` or the embedded set) and their input pipeline.
  train     the training loop, VOC evaluation, checkpoints and TensorBoard summaries.
"""
