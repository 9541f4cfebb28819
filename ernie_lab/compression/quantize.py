"""Post-training INT8 quantization with PaddleSlim, calibrated on batches from the held-out slice of train."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig

from ernie_lab.compression.export import MODEL_FILE, PARAMS_FILE
from ernie_lab.errors import check_choice

# avg raises IndexError on scalar activations in paddleslim 2.6 (see README "Known limitations").
ALGOS = ("hist", "mse", "KL", "abs_max")


def quantize_ptq(float_dir: Path, out_dir: Path, feeds: Sequence[dict], qcfg: DictConfig,
                 on_batch: Callable[[], None] = lambda: None) -> None:
    """Quantize the float model in `float_dir` into `out_dir`; `feeds` are collated calibration batches."""
    import paddle
    from paddleslim.quant import quant_post_static

    check_choice("quantize.algo", qcfg.algo, ALGOS)

    class FeedLoader(paddle.io.DataLoader):
        """quant_post_static only accepts a paddle.io.DataLoader; this one replays ready feed dicts."""

        def __init__(self, batches):  # noqa: D107 - DataLoader's own __init__ wants a Dataset we do not need
            self.batches = list(batches)

        def __call__(self):
            for batch in self.batches:
                on_batch()
                yield batch

        def __iter__(self):
            return self()

        def __len__(self):
            return len(self.batches)

    logging.getLogger("paddle.static.quantization.post_training_quantization").setLevel(logging.WARNING)
    logging.getLogger("PostTrainingQuantization").setLevel(logging.WARNING)
    paddle.enable_static()
    try:
        executor = paddle.static.Executor(paddle.CPUPlace())
        quant_post_static(
            executor=executor,
            model_dir=str(float_dir),
            quantize_model_path=str(out_dir),
            data_loader=FeedLoader(feeds),
            model_filename=MODEL_FILE,
            params_filename=PARAMS_FILE,
            save_model_filename=MODEL_FILE,
            save_params_filename=PARAMS_FILE,
            batch_size=int(qcfg.batch_size),
            batch_nums=len(feeds),
            algo=qcfg.algo,
            hist_percent=float(qcfg.hist_percent),
            quantizable_op_type=list(qcfg.quantizable_op_type),
            weight_bits=int(qcfg.weight_bits),
            activation_bits=int(qcfg.activation_bits),
            weight_quantize_type=qcfg.weight_quantize_type,
            onnx_format=bool(qcfg.onnx_format),
        )
    finally:
        paddle.disable_static()
