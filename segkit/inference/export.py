"""Export a Segmenter to ONNX / TorchScript, check it against PyTorch and time it on the CPU.

The exported graph is the whole Segmenter (normalisation, padding to the stride, resizing the
logits back), so a deployment feeds it images in [0, 1] exactly like PyTorch. Export traces the
model on an example whose size is *not* a multiple of the stride, so the padding branch is
recorded; with dynamic axes the padding amounts are then computed from the input's shape.

The graph is the network at the training scale. The training geometry travels in the file's
metadata (`segkit.geometry`), and `onnx_logits` runs the same geometry as `Predictor` around an
onnxruntime session: an image of any size is letterboxed to the training scale, predicted (whole
or in sliding windows), and its scores are resized back to its own size.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segkit import safe_files
from segkit.data.geometry import TrainingGeometry, letterbox_images, restore_logits
from segkit.errors import SegkitError
from segkit.extras import require_extra
from segkit.models.sliding import predict_logits

INPUT, OUTPUT = "images", "logits"
GEOMETRY_KEY = "segkit.geometry"
DEFAULT_OPSET = 18  # Resize with antialias: what a ViT's position embeddings need at another input size


class ExportError(SegkitError):
    """Export failed or the exported model disagrees with PyTorch; the message names the file."""


def example_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """The requested size, nudged off the stride grid so the padding path is traced."""
    return (height + (stride // 2 if height % stride == 0 else 0),
            width + (stride // 2 if width % stride == 0 else 0))


def _antialiased_bicubic(g, images, output_size, align_corners, scale_factors):  # noqa: ANN001 - ONNX symbolic
    """aten::_upsample_bicubic2d_aa as ONNX Resize (opset 18: cubic, antialias, PIL's a = -0.5, as torch).
    timm resamples a ViT's position embeddings to the input's patch grid with it; torch's exporter has no
    symbolic for it."""
    from torch.onnx import symbolic_helper

    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    leading = g.op("Slice", g.op("Shape", images), g.op("Constant", value_t=torch.tensor([0])),
                   g.op("Constant", value_t=torch.tensor([2])))
    size = output_size
    if symbolic_helper._is_packed_list(size):
        one = g.op("Constant", value_t=torch.tensor([1]))
        size = g.op("Concat", *(symbolic_helper._reshape_helper(g, s, one)
                                for s in symbolic_helper._unpack_list(size)), axis_i=0)
    sizes = g.op("Concat", leading, g.op("Cast", size, to_i=7), axis_i=0)  # 7: int64
    corners = symbolic_helper._maybe_get_const(align_corners, "b")
    return g.op("Resize", images, empty, empty, sizes, mode_s="cubic", antialias_i=1, cubic_coeff_a_f=-0.5,
                exclude_outside_i=1, coordinate_transformation_mode_s="align_corners" if corners else "half_pixel")


def export_onnx(
    model: nn.Module, path: Path, size: Sequence[int], opset: int = DEFAULT_OPSET, dynamic: bool = True,
    geometry: TrainingGeometry | None = None,
) -> Path:
    """Write `path` with the TorchScript-based exporter (dynamo=False: no onnxscript needed).

    `geometry` is stored in the file's metadata, for `onnx_logits` and other deployments.
    """
    require_extra("format", "onnx", "onnx")
    example = torch.rand(1, 3, int(size[0]), int(size[1]))
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _antialiased_bicubic, 18)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about the stride branch: handled by example_size
            buffer = io.BytesIO()
            torch.onnx.export(
                model.eval(), (example,), buffer, dynamo=False, opset_version=opset,  # type: ignore[arg-type]
                input_names=[INPUT], output_names=[OUTPUT], dynamic_axes={INPUT: axes, OUTPUT: axes},
            )
    except Exception as error:  # noqa: BLE001 - exporter errors are many types; report one line
        raise ExportError(f"{path}: ONNX export failed ({str(error).splitlines()[0]})") from None
    import onnx

    graph = onnx.load_from_string(buffer.getvalue())
    if geometry is not None:
        onnx.helper.set_model_props(graph, {GEOMETRY_KEY: json.dumps(geometry.as_dict())})
    onnx.checker.check_model(graph)
    safe_files.write_bytes(path, graph.SerializeToString())
    return path


def onnx_geometry(session) -> TrainingGeometry:
    """The training geometry stored in an exported file's metadata."""
    stored = session.get_modelmeta().custom_metadata_map.get(GEOMETRY_KEY)
    if stored is None:
        raise ExportError(f"the ONNX file has no '{GEOMETRY_KEY}' metadata; export it again with segkit-export")
    try:
        return TrainingGeometry.from_dict(json.loads(stored))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ExportError(f"the ONNX file's '{GEOMETRY_KEY}' metadata is not valid ({error})") from None


@torch.no_grad()
def onnx_logits(session, images: torch.Tensor, geometry: TrainingGeometry | None = None) -> torch.Tensor:
    """Scores (B, C, H, W) at the images' own size from an onnxruntime session, as `Predictor.logits` does:
    letterbox to the training scale, run the network (whole or sliding windows), restore the size."""
    geometry = geometry or onnx_geometry(session)
    boxed = letterbox_images(images, geometry.image_size)
    if boxed.dtype == torch.uint8:
        boxed = boxed.float().div(255)
    run = onnx_runner(session)

    def network(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run(batch.contiguous().numpy()))

    window = geometry.window or geometry.image_size
    return restore_logits(predict_logits(network, boxed, geometry.mode, window), images.shape[-2:])


def export_torchscript(model: nn.Module, path: Path, size: Sequence[int]) -> Path:
    example = torch.rand(1, 3, int(size[0]), int(size[1]))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model.eval(), example, check_trace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        safe_files.write_with(path, lambda buffer: torch.jit.save(traced, buffer))
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"{path}: TorchScript export failed ({str(error).splitlines()[0]})") from None
    return path


def onnx_session(path: Path, threads: int | None = None):
    require_extra("format", "onnx", "onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Parity:
    shape: tuple[int, ...]
    max_abs_diff: float
    argmax_agreement: float
    error: str | None = None

    def ok(self, atol: float) -> bool:
        return self.error is None and self.max_abs_diff <= atol and self.argmax_agreement >= 0.999

    def line(self, name: str) -> str:
        shape = "x".join(map(str, self.shape))
        if self.error:
            return f"{name} [{shape}]: failed ({self.error})"
        return (f"{name} [{shape}]: max |logit diff| = {self.max_abs_diff:.3g}, "
                f"argmax agreement = {100 * self.argmax_agreement:.3f}%")


def compare(
    reference: Callable[[torch.Tensor], torch.Tensor], run: Callable[[np.ndarray], np.ndarray],
    shape: Sequence[int], seed: int = 0,
) -> Parity:
    """Logits of `run` (an exported model) against PyTorch's (`reference`, e.g. the model in eval mode)
    on one random input of `shape`."""
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(images).float().numpy()
    try:
        got = np.asarray(run(images.numpy()))
    except Exception as error:  # noqa: BLE001 - a runtime refusing a shape is a result, not a crash
        return Parity(tuple(shape), float("inf"), 0.0, str(error).splitlines()[0][:200])
    if got.shape != expected.shape:
        return Parity(tuple(shape), float("inf"), 0.0, f"output shape {got.shape} != {expected.shape}")
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    return Parity(tuple(shape), float(np.abs(got - expected).max()), agreement)


def onnx_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    return lambda images: session.run([OUTPUT], {INPUT: images.astype(np.float32)})[0]


def torchscript_runner(module) -> Callable[[np.ndarray], np.ndarray]:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).float().numpy()

    return run


@dataclass
class Timing:
    runtime: str
    shape: tuple[int, ...]
    threads: int
    ms_per_batch: float

    @property
    def images_per_s(self) -> float:
        return self.shape[0] / (self.ms_per_batch / 1000)


def time_runner(name: str, run: Callable[[np.ndarray], object], shape: Sequence[int], threads: int,
                runs: int = 20, warmup: int = 3) -> Timing:
    """Median wall time of `runs` calls after `warmup` calls, on one fixed random input."""
    images = np.random.default_rng(0).random(tuple(shape), dtype=np.float32)
    for _ in range(warmup):
        run(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return Timing(name, tuple(shape), threads, 1000 * float(np.median(times)))


def markdown_table(timings: Sequence[Timing]) -> str:
    lines = ["| runtime | input (BxCxHxW) | CPU threads | median ms / batch | images / s |",
             "|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t.runtime} | {'x'.join(map(str, t.shape))} | {t.threads} | "
                     f"{t.ms_per_batch:.1f} | {t.images_per_s:.1f} |")
    return "\n".join(lines)
