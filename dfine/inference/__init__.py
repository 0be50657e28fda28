"""Inference on pictures, folders and videos, and the one detection drawer.

- `predictor`: :class:`Predictor` (checkpoint -> per-image labels, boxes, scores and class names);
- `drawing`: :func:`draw_detections` and :func:`save_image`, used by predict, training reports and
  ``--show-batch``;
- `show_batch`: pictures of augmented training batches (``dfine-train --show-batch N``).
"""
