"""Shipping a trained model: ONNX / OpenVINO export, parity, INT8, model size (export, openvino extras).

- `onnx_export`: the deployable detector (model + post-processing) and :func:`export_onnx`;
- `export_check`: parity on real images (any onnxruntime-like session) and latency benchmarks;
- `openvino_export`: the OpenVINO IR converted from the ONNX file, and a session with onnxruntime's interface;
- `quantize`: INT8 post-training quantisation (onnxruntime QDQ or NNCF) and scoring an exported file;
- `exported_predictor`: `Predictor` on an exported ``.onnx`` / ``.xml``;
- `model_info`: parameters and GFLOPs.
"""
