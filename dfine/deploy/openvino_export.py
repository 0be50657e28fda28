"""OpenVINO IR from our exported ONNX file, and a session that runs it with onnxruntime's interface.

The IR (``model.xml`` + ``model.bin``) is converted from the ONNX file ``export_onnx`` wrote, so it has the
same inputs and outputs (and the same dynamic batch). :class:`OpenVinoSession` offers the three methods of an
onnxruntime ``InferenceSession`` that the parity check, the benchmark and the exported-model predictor use
(``get_inputs``, ``get_outputs``, ``run``), so one code path checks and times both runtimes.

OpenVINO picks bf16 on CPUs that have it; sessions here ask for f32 unless told otherwise, so that parity with
PyTorch holds to 1e-4 and timings compare like with like.

``openvino`` is the optional ``[openvino]`` extra.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INSTALL_HINT", "OpenVinoSession", "convert_onnx_to_openvino", "label_map_of", "require_openvino"]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[openvino]"'
_RT_INFO_LABEL_MAP = ["dfine", "label_map"]


def require_openvino() -> Any:
    """Import ``openvino``, or explain how to install it."""
    try:
        import openvino
    except ImportError as error:
        raise ImportError(
            f"OpenVINO export and inference need the openvino package: {INSTALL_HINT}"
        ) from error
    return openvino


def convert_onnx_to_openvino(
    onnx_path: str | Path, xml_path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Convert an ONNX file to an OpenVINO IR (fp32 weights), keeping inputs, outputs and dynamic dims.

    Args:
        onnx_path: the file written by :func:`dfine.deploy.onnx_export.export_onnx`.
        xml_path: the ``.xml`` to write; the weights go to the ``.bin`` beside it.
        metadata: strings stored in the IR's runtime info under ``dfine`` (e.g. ``label_map`` as JSON).

    Returns:
        ``xml_path``.
    """
    ov = require_openvino()
    model = ov.convert_model(str(onnx_path))
    for key, value in (metadata or {}).items():
        model.set_rt_info(str(value), ["dfine", key.removeprefix("dfine.")])
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


@dataclass(frozen=True)
class _Port:
    """What onnxruntime's ``NodeArg`` offers: a name and a shape (``None`` for a dynamic dimension)."""

    name: str
    shape: list[int | None]


def _port(port: Any) -> _Port:
    shape = [None if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape()]
    return _Port(port.get_any_name(), shape)


def _check_files(xml_path: Path) -> None:
    if xml_path.suffix != ".xml":
        raise ValueError(f"{xml_path} is not an OpenVINO IR: pass the model's .xml file")
    if not xml_path.is_file():
        raise FileNotFoundError(f"OpenVINO model not found: {xml_path}")
    weights = xml_path.with_suffix(".bin")
    if not weights.is_file():
        raise FileNotFoundError(
            f"{xml_path} has no weights file {weights.name} beside it: copy {weights.name} (written with the "
            "xml by dfine-export --format openvino) into the same folder"
        )


class OpenVinoSession:
    """An OpenVINO IR compiled for the CPU, used like an onnxruntime ``InferenceSession``.

    Args:
        xml_path: the ``.xml`` (its ``.bin`` beside it).
        num_threads: inference threads (default: OpenVINO's choice, all cores).
        precision: ``f32`` (default; what ONNX Runtime computes) or ``bf16`` / ``f16`` where the CPU has them.

    Raises:
        FileNotFoundError: the ``.xml`` or its ``.bin`` is missing (the message names the file and the fix).
        ImportError: openvino is not installed.
    """

    def __init__(self, xml_path: str | Path, num_threads: int | None = None, precision: str = "f32") -> None:
        ov = require_openvino()
        self.path = Path(xml_path)
        _check_files(self.path)
        core = ov.Core()
        self.model = core.read_model(str(self.path))
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if num_threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(self.model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[_Port]:
        return [_port(port) for port in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        return [_port(port) for port in self.compiled.outputs]

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the model's order (or ``output_names``' order), as numpy arrays."""
        # share_inputs: the request reads the caller's arrays in place (a 640x640 batch is not copied first)
        results = self.request.infer(dict(feed), share_inputs=True)
        by_name = {port.get_any_name(): np.array(results[port]) for port in self.compiled.outputs}
        names = output_names or [port.get_any_name() for port in self.compiled.outputs]
        return [by_name[name] for name in names]


def label_map_of(session: Any) -> list[dict[str, Any]] | None:
    """The ``dfine.label_map`` an exported model carries (ONNX metadata or IR runtime info), or None."""
    text = None
    if isinstance(session, OpenVinoSession):
        if session.model.has_rt_info(_RT_INFO_LABEL_MAP):
            text = session.model.get_rt_info(_RT_INFO_LABEL_MAP).astype(str)
    else:
        text = session.get_modelmeta().custom_metadata_map.get("dfine.label_map")
    return json.loads(text) if text else None
