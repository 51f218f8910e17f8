"""`segkit-export checkpoint=<run>/checkpoints/best.pt format=onnx`: export, check, benchmark.

Prints the parity checks (max |logit difference| and argmax agreement against PyTorch on two
input shapes, and on an image of another size run through the training geometry: `onnx_logits`
against `Predictor.logits`) and a markdown latency table, also written to `<stem>.benchmark.md`.
"""

from __future__ import annotations

import logging
import platform
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from segkit import safe_files
from segkit.cli.common import hydra_main, run_or_exit
from segkit.errors import ConfigError

if TYPE_CHECKING:  # torch and the exporters are imported where they are used, so --help answers at once
    import torch

    from segkit.inference.export import Parity, Timing
    from segkit.inference.predictor import Predictor

log = logging.getLogger("segkit")
FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "safetensors": ("safetensors",),
           "all": ("onnx", "torchscript", "safetensors")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_shapes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The traced shape and a different batch / height / width, to prove the axes are dynamic."""
    return [(1, 3, *size), (2, 3, size[0] + 37, size[1] + 21)]


def run(cfg: DictConfig) -> dict[str, Any]:
    checkpoint = Path(cfg.checkpoint).expanduser()
    stem = Path(cfg.output).expanduser() if cfg.output else checkpoint.with_suffix("")
    from segkit.engine.run_lock import guard_run_dir

    with guard_run_dir(stem.parent, "export"):  # no other live process writes into the same run directory
        return export_to(stem, checkpoint, cfg)


def export_to(stem: Path, checkpoint: Path, cfg: DictConfig) -> dict[str, Any]:
    import torch

    from segkit.inference.export import (
        compare,
        example_size,
        export_torchscript,
        onnx_runner,
        time_runner,
        torchscript_runner,
    )
    from segkit.inference.predictor import from_record
    from segkit.runs.checkpoint import read_checkpoint, save_safetensors

    if cfg.format not in FORMATS:
        raise ConfigError("format", f"must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    threads = torch.get_num_threads()
    record = read_checkpoint(checkpoint, trust=bool(cfg.trust_checkpoint))
    predictor = from_record(record, "cpu")
    model = predictor.model.to(memory_format=torch.contiguous_format).eval()
    height = int(cfg.height or predictor.image_size[0])
    width = int(cfg.width or predictor.image_size[1])
    result: dict[str, Any] = {"files": {}, "parity": {}, "timings": []}
    runners = {"PyTorch eager": lambda x: _torch_forward(model, x)}

    if "onnx" in FORMATS[cfg.format]:
        onnx_path = stem.with_suffix(".onnx")
        path, session, checks = export_onnx_checked(predictor, onnx_path, (height, width), cfg, threads)
        result["files"]["onnx"], result["parity"]["onnx"] = path, checks
        runners["onnxruntime (CPU EP)"] = onnx_runner(session)
    if "torchscript" in FORMATS[cfg.format]:
        example = example_size(height, width, model.stride)
        path = export_torchscript(model, Path(f"{stem}.torchscript.pt"), example)
        module = load_torchscript(path)
        result["files"]["torchscript"] = path
        log.info("wrote %s", path)
        if cfg.validate:
            checks = [compare(model, torchscript_runner(module), s) for s in check_shapes((height, width))]
            report_checks("torchscript", path, checks, cfg.atol)
            result["parity"]["torchscript"] = checks
        runners["TorchScript"] = torchscript_runner(module)

    if "safetensors" in FORMATS[cfg.format]:  # no pickle; the config (as checked) in YAML beside it
        # The rest of the record (temperature, geometry, class names, privacy ledger) travels in its metadata, so
        # segkit.load(<stem>.safetensors) predicts exactly as from the checkpoint.
        weights, config = save_safetensors(model, record, stem.with_suffix(".safetensors"))
        result["files"]["safetensors"], result["files"]["config"] = weights, config
        log.info("wrote %s and %s", weights, config)

    if cfg.benchmark:
        shape = (int(cfg.benchmark_batch), 3, height, width)
        timings = [time_runner(name, run_one, shape, threads, cfg.benchmark_runs, cfg.benchmark_warmup)
                   for name, run_one in runners.items()]
        table = benchmark_markdown(timings, predictor, checkpoint)
        print(table)
        bench_path = Path(f"{stem}.benchmark.md")
        safe_files.write_text(bench_path, table + "\n")
        result["timings"] = timings
        result["files"]["benchmark"] = bench_path
    return result


def export_onnx_checked(
    predictor: Predictor, path: Path, size: tuple[int, int], cfg: DictConfig, threads: int
) -> tuple[Path, Any, list[Parity]]:
    """Export with dynamic H/W; if the exported graph fails at another size, export with fixed H/W."""
    from segkit.inference.export import compare, example_size, export_onnx, onnx_runner, onnx_session

    dynamic = bool(cfg.dynamic)
    model, geometry = predictor.model, predictor.geometry
    export_onnx(model, path, example_size(*size, model.stride) if dynamic else size, cfg.opset, dynamic, geometry)
    session = onnx_session(path, threads)
    checks: list[Parity] = []
    if cfg.validate:
        checks = [compare(model, onnx_runner(session), s) for s in check_shapes(size)]
        if dynamic and checks[0].ok(cfg.atol) and not checks[1].ok(cfg.atol):
            log.warning("dynamic height/width failed (%s); exporting for fixed %dx%d instead",
                        checks[1].error or "outputs differ", *size)
            dynamic = False
            export_onnx(model, path, size, cfg.opset, dynamic=False, geometry=geometry)
            session = onnx_session(path, threads)
            checks = [compare(model, onnx_runner(session), (b, 3, *size)) for b in (1, 2)]
        checks.append(original_size_check(predictor, session, size))
        report_checks("onnx", path, checks, cfg.atol)
    axes = "batch, height, width" if dynamic else f"batch (height x width fixed at {size[0]}x{size[1]})"
    log.info("wrote %s (opset %d; dynamic axes: %s; input '%s' float [0, 1] Bx3xHxW -> '%s')",
             path, cfg.opset, axes, "images", "logits")
    return path, session, checks


def original_size_check(predictor: Predictor, session: Any, size: tuple[int, int]) -> Parity:
    """An image of another size and aspect, through the training geometry: ONNX (`onnx_logits`) vs PyTorch."""
    import torch

    from segkit.inference.export import compare, onnx_logits

    shape = (1, 3, size[0] * 3 // 2 + 7, size[1] * 2 + 5)
    return compare(predictor.logits, lambda images: onnx_logits(session, torch.from_numpy(images)).numpy(), shape)


def report_checks(name: str, path: Path, checks: list[Parity], atol: float) -> None:
    from segkit.inference.export import ExportError

    for check in checks:
        log.info("%s", check.line(name))
    bad = [c for c in checks if not c.ok(atol)]
    if bad:
        raise ExportError(f"{path}: {name} output differs from PyTorch: {bad[0].line(name)} (atol={atol})")


def benchmark_markdown(timings: list[Timing], predictor, checkpoint: Path) -> str:
    import onnxruntime
    import torch

    from segkit.inference.export import markdown_table

    arch = type(predictor.model.net).__name__
    backbone = predictor.cfg.model.get("backbone", {}).get("name", "?")
    header = (f"CPU latency of `{checkpoint}` ({arch} on {backbone}, {predictor.num_classes} classes) on "
              f"{cpu_name()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.")
    return header + "\n\n" + markdown_table(timings)


def load_torchscript(path: Path):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the simplest artefact
        return torch.jit.load(str(path))


def _torch_forward(model: torch.nn.Module, images):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(images))


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda: run(cfg))


if __name__ == "__main__":
    main()
