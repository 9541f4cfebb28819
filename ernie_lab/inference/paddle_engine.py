"""runtime=cpu and runtime=gpu: Paddle Inference (oneDNN on CPU; TensorRT or Paddle's own kernels on GPU), with
the GPU's TensorRT shape ranges and engine cache. Like every engine module: a backend class with `feed(batch)`,
`execute()`, `fetch() -> list of output arrays` and `run(batch)` doing all three; precision is its business."""
from __future__ import annotations

import gc
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from ernie_lab.artifacts import INPUT_NAMES, MODEL_FILE, PARAMS_FILE
from ernie_lab.errors import ConfigError

# Paddle's `inference.PrecisionType` member for each precision TensorRT builds engines in.
TRT_PRECISIONS = {"fp32": "Float32", "fp16": "Half", "int8": "Int8"}
SHAPE_FILE = "shape_range_info.pbtxt"

Batch = dict[str, np.ndarray]


class PaddleInferenceBackend:
    """Paddle Inference. CPU: oneDNN FP32, oneDNN INT8 (ops chosen by `runtime.int8_ops`), oneDNN BF16.
    GPU: TensorRT FP32/FP16/INT8 (INT8 from the PTQ model's own scales), or Paddle's GPU kernels for FP32/FP16.

    `sample_batches` are the batches that will be run: TensorRT's dynamic shape ranges are collected from them."""

    def __init__(self, model_dir: Path, runtime: DictConfig, precision: str, sample_batches: Sequence[Batch] = ()):
        from paddle import inference

        if runtime.device == "cpu":
            config = _new_config(model_dir)
            self._configure_cpu(config, runtime, precision)
            # oneDNN's INT8 passes print `--- quantized N ops` on fd 2 whatever glog says.
            self.predictor = _quietly(lambda: inference.create_predictor(config))
        else:
            plan = self.gpu_plan_for(model_dir, runtime, precision, sample_batches)
            if plan["tensorrt"]:
                ensure_shape_file(model_dir, plan["tensorrt"], sample_batches, gpu=(plan["gpu_memory_mb"], plan["gpu_id"]))
            config = _new_config(model_dir)
            config.set_cpu_math_library_num_threads(int(runtime.threads))
            _configure_gpu(config, plan)
            # Not silenced: TensorRT's engine-build errors on fd 2 are the only clue when a build fails.
            self.predictor = inference.create_predictor(config)
        self.input_handles = [self.predictor.get_input_handle(n) for n in INPUT_NAMES]
        self.output_handles = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    @staticmethod
    def gpu_plan_for(model_dir: Path, runtime: DictConfig, precision: str, sample_batches: Sequence[Batch]) -> dict:
        from ernie_lab import runtime as rt

        info = rt.gpu_info(runtime)
        # An engine is only valid for the GPU model, TensorRT and Paddle that built it.
        device_tag = "|".join(str(info.get(k)) for k in ("gpu_name", "tensorrt_runtime", "paddle"))
        max_batch = max((len(b[INPUT_NAMES[0]]) for b in sample_batches), default=1)
        return gpu_plan(model_dir, runtime, precision, max_batch, device_tag)

    @staticmethod
    def _configure_cpu(config, runtime: DictConfig, precision: str) -> None:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(int(runtime.threads))
        # Paddle 2.6 turns oneDNN on by default; say explicitly which one is meant.
        if not runtime.onednn:
            if precision != "fp32":
                raise ConfigError(f"precision={precision} on CPU needs oneDNN (runtime.onednn=true)")
            config.disable_mkldnn()
            return
        config.enable_mkldnn()
        capacity = int(runtime.get("onednn_cache_capacity", 0))
        if capacity < 0:
            raise ConfigError(f"runtime.onednn_cache_capacity={capacity} is not valid; choose 0 (Paddle's default: "
                              "no per-shape cache clearing) or a positive number of input shapes")
        if capacity:
            # Keep oneDNN primitives of at most this many input shapes (least recently used dropped).
            config.set_mkldnn_cache_capacity(capacity)
        if precision == "bf16":
            config.enable_mkldnn_bfloat16()
        elif precision == "int8":
            # Without this switch an INT8 model runs ~4x slower than FP32 (fake-quant ops in float).
            ops = set(runtime.int8_ops or [])
            config.enable_mkldnn_int8(ops) if ops else config.enable_mkldnn_int8()

    # The benchmark times the three phases apart (host-to-device, engine, device-to-host); run() is all three.
    def feed(self, batch: Batch) -> None:
        for name, handle in zip(INPUT_NAMES, self.input_handles):
            handle.reshape(batch[name].shape)
            handle.copy_from_cpu(batch[name])

    def execute(self) -> None:
        self.predictor.run()

    def fetch(self) -> list[np.ndarray]:
        # copy_to_cpu waits for the GPU, so feed + execute + fetch covers the whole computation.
        return [h.copy_to_cpu() for h in self.output_handles]

    def run(self, batch: Batch) -> list[np.ndarray]:
        self.feed(batch)
        self.execute()
        return self.fetch()


def _new_config(model_dir: Path):
    from paddle import inference

    config = inference.Config(str(model_dir / MODEL_FILE), str(model_dir / PARAMS_FILE))
    config.disable_glog_info()
    config.switch_ir_optim(True)
    config.enable_memory_optim()
    return config


def gpu_plan(model_dir: Path, runtime: DictConfig, precision: str, max_batch_size: int, device_tag: str = "") -> dict:
    """Every setting of a GPU predictor as plain values (Paddle enum members by name), so that the choice can be
    read and tested without a GPU. `device_tag` names the GPU/TensorRT/Paddle the engines are built with."""
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"precision={precision!r} cannot run on runtime=gpu; choose one of: {', '.join(TRT_PRECISIONS)}")
    plan = {"gpu_id": int(runtime.gpu_id), "gpu_memory_mb": int(runtime.gpu_memory_mb), "tensorrt": None}
    trt = runtime.tensorrt
    if not trt.enabled:
        if precision == "int8":
            raise ConfigError("precision=int8 on runtime=gpu needs runtime.tensorrt.enabled=true; without it choose fp32 or fp16")
        # Paddle 2.6 converts the float model to FP16 itself (its mixed-precision pass) when asked here.
        return {**plan, "gpu_precision": TRT_PRECISIONS[precision]}
    cache_dir = Path(trt.cache_dir) / engine_cache_name(model_dir, precision, device_tag)
    return {
        **plan,
        # Ops TensorRT does not take stay on Paddle's kernels in FP32; the engines carry the precision.
        "gpu_precision": "Float32",
        "tensorrt": {
            "precision_mode": TRT_PRECISIONS[precision],
            "workspace_size": int(trt.workspace_mb) << 20,
            "max_batch_size": int(max_batch_size),
            "min_subgraph_size": int(trt.min_subgraph_size),
            # Serialize engines into cache_dir and reuse them: an ERNIE engine build takes minutes.
            "use_static": True,
            # INT8 scales come from the PTQ model's quantize/dequantize ops, never from a TensorRT calibration.
            "use_calib_mode": False,
            "cache_dir": str(cache_dir),
            "shape_file": str(cache_dir / SHAPE_FILE),
        },
    }


def engine_cache_name(model_dir: Path, precision: str, device_tag: str = "") -> str:
    """`<task>-<strategy>-<precision>-<hash>`. Paddle keys serialized engines by graph structure, not weights, so
    the hash covers the model files' size and mtime (a re-export gets a fresh cache) and the device tag."""
    stamp = [str(model_dir.resolve()), precision, device_tag]
    for name in (MODEL_FILE, PARAMS_FILE):
        st = (model_dir / name).stat()
        stamp.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]
    return f"{model_dir.parent.parent.name}-{model_dir.name}-{precision}-{digest}"


def _configure_gpu(config, plan: dict) -> None:
    from paddle.inference import PrecisionType

    config.enable_use_gpu(plan["gpu_memory_mb"], plan["gpu_id"], getattr(PrecisionType, plan["gpu_precision"]))
    trt = plan["tensorrt"]
    if not trt:
        return
    config.enable_tensorrt_engine(
        workspace_size=trt["workspace_size"],
        max_batch_size=trt["max_batch_size"],
        min_subgraph_size=trt["min_subgraph_size"],
        precision_mode=getattr(PrecisionType, trt["precision_mode"]),
        use_static=trt["use_static"],
        use_calib_mode=trt["use_calib_mode"],
    )
    config.set_optim_cache_dir(trt["cache_dir"])
    # allow_build_at_runtime: a shape outside the ranges rebuilds an engine instead of failing. ensure_shape_file
    # makes the ranges cover every batch, so no rebuild happens inside the timed passes.
    config.enable_tuned_tensorrt_dynamic_shape(trt["shape_file"], True)


def batch_shape_ranges(batches: Sequence[Batch]) -> dict[str, tuple[list[int], list[int]]]:
    """Per input, the smallest and largest size of each dimension over the batches."""
    ranges = {}
    for name in INPUT_NAMES:
        shapes = np.array([b[name].shape for b in batches])
        ranges[name] = (shapes.min(axis=0).tolist(), shapes.max(axis=0).tolist())
    return ranges


def read_shape_ranges(shape_file: Path) -> dict[str, tuple[list[int], list[int]]]:
    """The (min_shape, max_shape) of every tensor in a file written by `collect_shape_range_info` (protobuf text)."""
    ranges = {}
    for block in re.findall(r"shape_range_info \{(.*?)\}", shape_file.read_text(), re.S):
        name = re.search(r'name: "([^"]+)"', block).group(1)
        ranges[name] = tuple([int(v) for v in re.findall(rf"{key}: (-?\d+)", block)] for key in ("min_shape", "max_shape"))
    return ranges


def covers(recorded: dict, needed: dict) -> bool:
    for name, (low, high) in needed.items():
        if name not in recorded or len(recorded[name][0]) != len(low):
            return False
        rec_low, rec_high = recorded[name]
        if any(r > v for r, v in zip(rec_low, low)) or any(r < v for r, v in zip(rec_high, high)):
            return False
    return True


def ensure_shape_file(model_dir: Path, trt: dict, batches: Sequence[Batch], gpu: tuple[int, int] | None) -> bool:
    """Make `trt["shape_file"]` cover `batches`; True if the file already did and was reused.

    Reused rather than re-collected every time: the cached engines were built for the file's ranges, and a new
    file (new opt shapes) would make them stale. When the batches fall outside the recorded ranges (a longer
    max_seq_length, a bigger batch), the file is collected afresh from these batches and the engines built for
    the old ranges are deleted with it."""
    if not batches:
        raise ValueError("TensorRT dynamic shapes are collected from the batches to run; none were given")
    shape_file, cache_dir = Path(trt["shape_file"]), Path(trt["cache_dir"])
    if shape_file.is_file() and covers(read_shape_ranges(shape_file), batch_shape_ranges(batches)):
        return True
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    collect_shape_ranges(model_dir, batches, shape_file, gpu)
    return False


def collect_shape_ranges(model_dir: Path, batches: Sequence[Batch], shape_file: Path,
                         gpu: tuple[int, int] | None) -> None:
    """Run every batch once through a plain predictor (GPU `(memory_mb, gpu_id)`, or CPU for None) that records
    the min/max/most frequent shape of every tensor into `shape_file`."""
    _run_recording(model_dir, batches, shape_file, gpu)
    gc.collect()  # Paddle writes the file when the predictor is destroyed
    if not shape_file.is_file():
        raise RuntimeError(f"Paddle wrote no shape range file at {shape_file}")


def _run_recording(model_dir: Path, batches: Sequence[Batch], shape_file: Path, gpu: tuple[int, int] | None) -> None:
    from paddle import inference

    config = _new_config(model_dir)
    if gpu:
        config.enable_use_gpu(*gpu)
    else:
        config.disable_gpu()
    config.collect_shape_range_info(str(shape_file))
    predictor = inference.create_predictor(config)
    handles = [predictor.get_input_handle(n) for n in INPUT_NAMES]
    for batch in batches:
        for name, handle in zip(INPUT_NAMES, handles):
            handle.reshape(batch[name].shape)
            handle.copy_from_cpu(batch[name])
        predictor.run()


def _quietly(make):
    """Run `make` with fd 2 pointed at /dev/null."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return make()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
