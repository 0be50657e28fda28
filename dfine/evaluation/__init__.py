"""Evaluation: the loop over a validation loader, the COCO evaluator (faster-coco-eval), PR/F1 curves.

- `loop`: :func:`evaluate` (model + post-processor + loader -> COCO metrics), :func:`predict_batch`;
- `coco_evaluator`: :class:`CocoEvaluator` (ground truth indexed once, detections gathered over ranks);
- `curves`: precision/recall and F1-vs-confidence curves from the evaluator's matching.
"""
