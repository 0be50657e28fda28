"""ONNX export of a deployed D-FINE model, post-processing included.

The exported graph takes ``images`` float32 [B, 3, H, W] in 0..1 (RGB, no mean/std normalisation; H, W the
config's ``eval_spatial_size``) and ``orig_target_sizes`` int64 [B, 2] (width, height of each original image
in pixels, as the original D-FINE's exported models do) and returns ``labels`` int64 [B, K], ``boxes`` float32
[B, K, 4] xyxy in pixels of the original image and ``scores`` float32 [B, K] in 0..1, best first. Without
post-processing it takes ``images`` alone and returns ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4]
cxcywh in 0..1.

H and W are fixed: D-FINE's decoder anchors and the encoder's position embedding are precomputed for
``eval_spatial_size``. The batch dimension is fixed too unless ``dynamic_batch`` is set.

Checking a file against PyTorch and timing it live in :mod:`dfine.deploy.export_check`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DETECTION_OUTPUTS",
    "IMAGE_INPUT",
    "INSTALL_HINT",
    "RAW_OUTPUTS",
    "SIZE_INPUT",
    "ExportableDetector",
    "baked_batch_dimension",
    "export_onnx",
    "graph_op_types",
    "make_session",
    "require_onnx",
    "simplify_onnx",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[export]"'
IMAGE_INPUT = "images"
SIZE_INPUT = "orig_target_sizes"
DETECTION_OUTPUTS: tuple[str, ...] = ("labels", "boxes", "scores")
RAW_OUTPUTS: tuple[str, ...] = ("pred_logits", "pred_boxes")


def require_onnx(with_runtime: bool = True) -> tuple[Any, Any]:
    """Import ``onnx`` (and ``onnxruntime``), or explain how to install them.

    Returns:
        ``(onnx, onnxruntime)``; the second is None when ``with_runtime`` is False.

    Raises:
        ImportError: a package is missing; the message names the ``export`` extra.
    """
    missing = []
    try:
        import onnx
    except ImportError:
        onnx, missing = None, ["onnx"]
    runtime = None
    if with_runtime:
        try:
            import onnxruntime as runtime
        except ImportError:
            missing.append("onnxruntime")
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}, which is not installed; install the export extra: "
            f"{INSTALL_HINT} (or pip install onnx onnxruntime)"
        )
    return onnx, runtime


def _deployed_copy(module: nn.Module) -> nn.Module:
    """A deployed (fused, eval-mode) copy; the caller's module is left untouched and trainable."""
    module = copy.deepcopy(module)
    deploy = getattr(module, "deploy", None)
    # Every convert_to_deploy is idempotent, so an already deployed model passes through unchanged.
    return deploy() if callable(deploy) else module.eval()


class ExportableDetector(nn.Module):
    """A deployed model and, optionally, its deploy-mode post-processor, as one traceable module.

    Args:
        model: a D-FINE model, deployed or not (a deployed copy is made; ``model`` itself is not changed).
        postprocessor: a :class:`~dfine.models.postprocessor.DFINEPostProcessor` (a deploy-mode copy is made),
            or None to export the raw outputs.
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module | None = None) -> None:
        super().__init__()
        self.model = _deployed_copy(model)
        self.postprocessor = None if postprocessor is None else _deployed_copy(postprocessor)
        self.eval()

    @property
    def input_names(self) -> tuple[str, ...]:
        return (IMAGE_INPUT,) if self.postprocessor is None else (IMAGE_INPUT, SIZE_INPUT)

    @property
    def output_names(self) -> tuple[str, ...]:
        return RAW_OUTPUTS if self.postprocessor is None else DETECTION_OUTPUTS

    def train(self, mode: bool = True) -> ExportableDetector:
        if mode:
            raise RuntimeError("ExportableDetector holds a deployed model and runs in eval mode only")
        return super().train(False)

    def forward(self, images: Tensor, orig_target_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float32 in 0..1.
            orig_target_sizes: [B, 2] (width, height) of the original images in pixels, any numeric dtype;
                required with a post-processor, ignored without.

        Returns:
            ``(labels [B, K] int64, boxes [B, K, 4] xyxy pixels, scores [B, K])`` with a post-processor, else
            ``(pred_logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh in 0..1)``.
        """
        outputs = self.model(images)
        if self.postprocessor is None:
            return outputs["pred_logits"], outputs["pred_boxes"]
        if orig_target_sizes is None:
            raise ValueError("orig_target_sizes [B, 2] (width, height) is required with post-processing")
        return tuple(self.postprocessor(outputs, orig_target_sizes.to(torch.float32)))


def _model_spatial_size(model: nn.Module) -> tuple[int, int] | None:
    decoder = getattr(model, "decoder", None)
    size = getattr(decoder, "eval_spatial_size", None)
    return None if size is None else (int(size[0]), int(size[1]))


def _check_image_size(model: nn.Module, image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or min(int(v) for v in image_size) <= 0:
        raise ValueError(f"image_size must be (height, width) in pixels, got {image_size!r}")
    height, width = int(image_size[0]), int(image_size[1])
    anchored = _model_spatial_size(model)
    if anchored is not None and anchored != (height, width):
        raise ValueError(
            f"image_size {(height, width)} differs from the model's eval_spatial_size {anchored}, for which "
            "its anchors were computed; export at the eval size or rebuild the model with "
            f"-u eval_spatial_size=[{height}, {width}]"
        )
    if height % 32 or width % 32:
        raise ValueError(f"image_size {(height, width)} must be multiples of 32 (the backbone's stride)")
    return height, width


def export_onnx(
    model: nn.Module,
    postprocessor: nn.Module | None,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    opset: int = 17,
    dynamic_batch: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the deployed model (with post-processing unless ``postprocessor`` is None) as an ONNX file.

    ``model`` may be a training or eval model or an already deployed one: a deployed copy is traced in eval
    mode, so the caller's model is not changed.

    Args:
        model: the detector (eval output ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] cxcywh 0..1).
        postprocessor: the post-processor, or None to export ``pred_logits`` / ``pred_boxes`` (no top-k).
        path: the ``.onnx`` file to write (its folder is created).
        image_size: (H, W) of the input in pixels: the model's ``eval_spatial_size``.
        opset: ONNX opset version (GridSample needs >= 16).
        dynamic_batch: make the batch dimension of every input and output symbolic (``batch``); else it is
            fixed to 1.
        metadata: extra ``key -> value`` strings stored in the file's metadata.

    Returns:
        ``path``.

    Raises:
        ImportError: onnx is not installed (the message names ``pip install -e ".[export]"``).
        ValueError: ``image_size`` does not fit the model.
    """
    onnx, _ = require_onnx(with_runtime=False)
    height, width = _check_image_size(model, image_size)
    wrapper = ExportableDetector(model, postprocessor)
    batch_size = 2 if dynamic_batch else 1  # tracing at 1 could let size-1 broadcasting specialise the graph
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, height, width, generator=generator)
    arguments: tuple[Tensor, ...] = (images,)
    if postprocessor is not None:
        arguments += (torch.tensor([[width, height]] * batch_size, dtype=torch.int64),)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in (*wrapper.input_names, *wrapper.output_names)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-level shape check; those shapes are fixed by design here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            wrapper,
            arguments,
            str(path),
            input_names=list(wrapper.input_names),
            output_names=list(wrapper.output_names),
            opset_version=opset,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter needs no onnxscript and gives stable output names
        )
    proto = onnx.load(str(path))
    properties = {
        "dfine.image_size": f"{height},{width}",
        "dfine.input_format": "RGB float32 in 0..1, no mean/std normalisation",
        "dfine.postprocess": "yes" if postprocessor is not None else "no",
        **dict(metadata or {}),
    }
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))
    logger.info("wrote %s (opset %d, %dx%d, dynamic batch: %s)", path, opset, height, width, dynamic_batch)
    return path


def simplify_onnx(path: str | Path) -> bool:
    """Simplify the file in place with onnxsim when it is installed.

    The PyPI package is ``onnxsim`` (wheels); the older ``onnx-simplifier`` name only builds from source.

    Returns:
        True if the file was simplified; False (with a logged reason) when onnxsim is missing or its check of
        the simplified graph failed, in which case the file is left as it was.
    """
    onnx, _ = require_onnx(with_runtime=False)
    try:
        import onnxsim
    except ImportError:
        logger.warning("--simplify skipped: onnxsim is not installed (pip install onnxsim)")
        return False
    simplified, valid = onnxsim.simplify(onnx.load(str(path)))
    if not valid:
        logger.warning("--simplify skipped: onnxsim could not validate the simplified graph of %s", path)
        return False
    onnx.save(simplified, str(path))
    logger.info("simplified %s with onnxsim", path)
    return True


def baked_batch_dimension(path: str | Path) -> list[str]:
    """Inputs and outputs whose first (batch) dimension is a fixed number in the ONNX graph.

    Only the declared shapes are read: a graph whose inputs are symbolic can still fix the batch inside (e.g.
    a Reshape to a constant shape), which only running it at another batch size reveals (the CLI does).

    Returns:
        Their names, e.g. ``["images", "orig_target_sizes", "labels", ...]`` for a file exported without
        ``dynamic_batch``; empty when every batch dimension is symbolic (or unknown).
    """
    onnx, _ = require_onnx(with_runtime=False)
    graph = onnx.load(str(path), load_external_data=False).graph
    baked = []
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            baked.append(value.name)
    return baked


def graph_op_types(path: str | Path) -> set[str]:
    """Operator types used in the graph (e.g. to confirm that a ``discrete`` export has no GridSample)."""
    onnx, _ = require_onnx(with_runtime=False)
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def make_session(
    path: str | Path,
    num_threads: int | None = None,
    providers: Sequence[str] | None = None,
    spinning: bool = True,
) -> Any:
    """An onnxruntime ``InferenceSession`` for ``path`` (CPU unless ``providers`` says otherwise).

    Args:
        num_threads: intra-op threads (default: onnxruntime's choice, all cores).
        providers: execution providers in order of preference, default ``["CPUExecutionProvider"]``.
        spinning: let idle threads spin (onnxruntime's default). Off when other runtimes are timed in the
            same process: spinning threads would steal their cores between calls.
    """
    _, runtime = require_onnx()
    options = runtime.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if num_threads is not None:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    return runtime.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
