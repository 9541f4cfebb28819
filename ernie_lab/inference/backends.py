"""One class per runtime, all with `run(batch) -> list of output arrays`. Precision is the backend's business."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ernie_lab.compression.export import INPUT_NAMES, MODEL_FILE, PARAMS_FILE
from ernie_lab.errors import ConfigError


class PaddleInferenceBackend:
    """Paddle Inference. CPU: oneDNN FP32, oneDNN INT8 (ops chosen by `runtime.int8_ops`), oneDNN BF16."""

    def __init__(self, model_dir: Path, runtime: DictConfig, precision: str):
        from paddle import inference

        config = inference.Config(str(model_dir / MODEL_FILE), str(model_dir / PARAMS_FILE))
        config.disable_glog_info()
        config.switch_ir_optim(True)
        config.enable_memory_optim()
        if runtime.device == "cpu":
            self._configure_cpu(config, runtime, precision)
        else:
            raise ConfigError("runtime=gpu inference (TensorRT) is not implemented yet; use runtime=cpu")
        self.predictor = _quietly(lambda: inference.create_predictor(config))
        self.input_handles = [self.predictor.get_input_handle(n) for n in INPUT_NAMES]
        self.output_handles = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

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
        if precision == "bf16":
            config.enable_mkldnn_bfloat16()
        elif precision == "int8":
            # Without this switch an INT8 model runs ~4x slower than FP32 (fake-quant ops in float).
            ops = set(runtime.int8_ops or [])
            config.enable_mkldnn_int8(ops) if ops else config.enable_mkldnn_int8()

    def run(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, handle in zip(INPUT_NAMES, self.input_handles):
            handle.reshape(batch[name].shape)
            handle.copy_from_cpu(batch[name])
        self.predictor.run()
        return [h.copy_to_cpu() for h in self.output_handles]


def _quietly(make):
    """oneDNN's INT8 passes print `--- quantized N ops` on fd 2 whatever glog says; keep it off the console."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return make()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def create_backend(model_dir: Path, runtime: DictConfig, precision: str):
    return PaddleInferenceBackend(model_dir, runtime, precision)
