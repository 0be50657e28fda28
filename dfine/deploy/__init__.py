"""Shipping a trained model: ONNX export, the after-export parity check, model size (the ``[export]`` extra).

- `onnx_export`: the deployable detector (model + post-processing) and :func:`export_onnx`;
- `export_check`: onnxruntime parity on real images and latency benchmarks;
- `model_info`: parameters and GFLOPs.
"""
