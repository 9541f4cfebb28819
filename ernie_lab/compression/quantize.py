"""Post-training INT8 quantization with PaddleSlim, calibrated on batches from the held-out slice of train."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig

from ernie_lab.compression.export import MODEL_FILE, PARAMS_FILE
from ernie_lab.errors import ConfigError, check_choice

# avg raises IndexError on scalar activations in paddleslim 2.6 (docs/compression.md, "Known limitations").
ALGOS = ("hist", "mse", "KL", "abs_max")
# hist/KL read the calibration data twice (range pass, then histogram pass)
TWO_PASS_ALGOS = ("hist", "KL")
# `quantize.skip: [head]`: every task's PaddleNLP class (ErnieForSequenceClassification,
# ErnieForTokenClassification, ErnieForQuestionAnswering) names its output layer `classifier`.
HEAD = "head"
HEAD_LAYER = "classifier"


def check_algo(key: str, algo: str) -> None:
    if algo == "avg":
        raise ConfigError(
            f"{key}='avg' fails in paddleslim 2.6 (IndexError on scalar activations); choose one of: {', '.join(ALGOS)}"
        )
    check_choice(key, algo, ALGOS)


def calibration_passes(algo: str) -> int:
    return 2 if algo in TWO_PASS_ALGOS else 1


def skip_tensor_names(model, skip: Sequence[str]) -> list[str]:
    """Weight names (as in the exported program) of the linear layers `quantize.skip` keeps in float.

    `paddle.jit.save` keeps dygraph parameter names, and PaddleSlim's skip_tensor_list marks every op that
    reads one of the named tensors as skip_quant, so a Linear's weight name keeps its matmul in float."""
    import paddle

    linears = {name: layer for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    names = []
    for entry in skip:
        check_choice("quantize.skip entry", entry, [HEAD, *linears])
        layer = HEAD_LAYER if entry == HEAD else entry
        if layer not in linears:
            raise ConfigError(f"quantize.skip: {type(model).__name__} has no linear layer `{HEAD_LAYER}` "
                              f"to keep as the head")
        weight = linears[layer].weight.name
        if weight not in names:
            names.append(weight)
    return names


def check_skip_tensors(float_dir: Path, names: Sequence[str]) -> None:
    """A skip name missing from the program would be ignored silently by PaddleSlim: refuse it instead."""
    import paddle

    if not names:
        return
    paddle.enable_static()
    try:
        program, _, _ = paddle.static.load_inference_model(
            str(float_dir / Path(MODEL_FILE).stem), paddle.static.Executor(paddle.CPUPlace())
        )
        params = {v.name for v in program.list_vars() if v.persistable}  # a loaded program lists no Parameters
    finally:
        paddle.disable_static()
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"quantize.skip: weights {missing} are not in the exported program {float_dir / MODEL_FILE}")


def quantize_ptq(float_dir: Path, out_dir: Path, feeds: Sequence[dict], qcfg: DictConfig,
                 on_batch: Callable[[], None] = lambda: None, skip_tensors: Sequence[str] = ()) -> None:
    """Quantize the float model in `float_dir` into `out_dir`; `feeds` are collated calibration batches.
    Ops reading a tensor named in `skip_tensors` stay in float."""
    import paddle

    check_algo("quantize.algo", qcfg.algo)

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
    # PaddleSlim loads the float model the deprecated way (a warning per quantization, nothing we can change)
    logging.getLogger("paddle.static.io").setLevel(logging.ERROR)
    # A scope of its own: a search quantizes many times in one process, and PaddleSlim loads the float weights
    # into (and quantizes them in) whatever the global scope is.
    with paddle.static.scope_guard(paddle.static.Scope()):
        check_skip_tensors(float_dir, skip_tensors)
        _quant_post_static(float_dir, out_dir, FeedLoader(feeds), qcfg, skip_tensors)


def _quant_post_static(float_dir: Path, out_dir: Path, loader, qcfg: DictConfig, skip_tensors: Sequence[str]) -> None:
    import paddle
    from paddleslim.quant import quant_post_static

    paddle.enable_static()
    try:
        executor = paddle.static.Executor(paddle.CPUPlace())
        quant_post_static(
            executor=executor,
            model_dir=str(float_dir),
            quantize_model_path=str(out_dir),
            data_loader=loader,
            model_filename=MODEL_FILE,
            params_filename=PARAMS_FILE,
            save_model_filename=MODEL_FILE,
            save_params_filename=PARAMS_FILE,
            batch_size=int(qcfg.batch_size),
            batch_nums=len(loader),
            algo=qcfg.algo,
            hist_percent=float(qcfg.hist_percent),
            quantizable_op_type=list(qcfg.quantizable_op_type),
            weight_bits=int(qcfg.weight_bits),
            activation_bits=int(qcfg.activation_bits),
            weight_quantize_type=qcfg.weight_quantize_type,
            onnx_format=bool(qcfg.onnx_format),
            skip_tensor_list=list(skip_tensors) or None,
        )
    finally:
        paddle.disable_static()
