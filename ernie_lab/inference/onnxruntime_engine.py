"""runtime=onnxruntime: the backend, and the models it runs: a float Paddle export converted to ONNX (paddle2onnx),
and INT8 models made from it by ONNX Runtime's own tools, dynamic (`quantize_dynamic`) or static QDQ (`quantize_static`,
calibrated on the held-out slice of train, as Paddle PTQ is).

Cached beside the exports, one directory per variant, rebuilt when the source export or a setting changes:

    <task dir>/onnx/<export name>/fp32/model.onnx
    <task dir>/onnx/<export name>/int8-dynamic/model.onnx
    <task dir>/onnx/<export name>/int8-static/model.onnx
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.artifacts import INPUT_NAMES, MODEL_FILE, PARAMS_FILE
from ernie_lab.errors import ConfigError, MissingArtifactError, check_choice
from ernie_lab.inference.calibration import calibration_feeds, feeds_digest
from ernie_lab.reporting import console, quiet_library
from ernie_lab.runtime import has_vnni

ONNX_FILE = "model.onnx"
Batch = dict[str, np.ndarray]
ENGINE = "onnxruntime"
INT8_MODES = ("dynamic", "static")
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
REDUCE_RANGE = ("auto", True, False)


def uses_onnxruntime(runtime: DictConfig) -> bool:
    return runtime.get("engine") == ENGINE


def prepare_for_runtime(cfg: DictConfig, task, model_dir: Path) -> Path:
    """The model directory the runtime runs: `model_dir` itself for Paddle runtimes; for runtime=onnxruntime
    the cached ONNX model of the precision (`.../fp32`, `.../int8-dynamic`, `.../int8-static`), made if needed."""
    if not uses_onnxruntime(cfg.runtime):
        return model_dir
    return ensure_onnx_model(cfg, task, model_dir)


def variant_name(runtime: DictConfig, precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    if precision == "int8":
        check_choice("runtime.int8_mode", runtime.int8_mode, INT8_MODES)
        return f"int8-{runtime.int8_mode}"
    raise ConfigError(f"precision={precision!r} cannot run on runtime={runtime.name}; valid there: fp32, int8")


def onnx_dir(cfg: DictConfig, export_dir: Path, variant: str) -> Path:
    return artifacts.task_dir(cfg) / "onnx" / export_dir.name / variant


def ensure_onnx_model(cfg: DictConfig, task, export_dir: Path, precision: str | None = None) -> Path:
    """The variant's directory for `precision` (default cfg.precision), built from the float export in
    `export_dir` unless a cached one was built from the same export with the same settings."""
    runtime = cfg.runtime
    variant = variant_name(runtime, precision or cfg.precision.name)
    source = source_stamp(export_dir)
    fp32_key = {"variant": "fp32", "source": source, "opset": int(runtime.onnx.opset), "versions": versions()}
    fp32_dir = _cached(onnx_dir(cfg, export_dir, "fp32"), fp32_key,
                       lambda out: convert(export_dir, out, fp32_key["opset"]))
    if variant == "fp32":
        return fp32_dir
    settings = int8_settings(runtime)
    if variant == "int8-static":
        feeds = calibration_feeds(cfg, task, settings["calibration"]["method"] != "minmax")
        settings["calibration"]["digest"] = feeds_digest(feeds)
    else:
        feeds = []
        settings.pop("calibration")
        settings.pop("activation_type")
    key = {**fp32_key, "variant": variant, "int8": settings}
    source_model = fp32_dir / ONNX_FILE
    return _cached(onnx_dir(cfg, export_dir, variant), key, lambda out: quantize(source_model, out, settings, feeds))


def source_stamp(export_dir: Path) -> dict:
    """What identifies the float export: its manifest's time, and its files' size and mtime (a re-export
    within the same second still differs)."""
    made_by = "python compress.py ... strategy=none (or another float strategy)"
    manifest = artifacts.read_manifest(export_dir, made_by)
    if manifest.get("weights") != "float":
        raise MissingArtifactError(
            f"{export_dir} holds {manifest.get('weights')} weights; ONNX Runtime quantizes a float export itself"
        )
    stats = {name: (export_dir / name).stat() for name in (MODEL_FILE, PARAMS_FILE)}
    files = {name: f"{st.st_size}:{st.st_mtime_ns}" for name, st in stats.items()}
    return {"dir": str(export_dir), "created_at": manifest.get("created_at"), "files": files,
            "outputs": manifest.get("outputs")}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("paddle2onnx", "onnx", "onnxruntime")}


def int8_settings(runtime: DictConfig) -> dict:
    """`runtime.int8` with every choice checked and `reduce_range: auto` decided for this CPU."""
    q = OmegaConf.to_container(runtime.int8, resolve=True)
    for key in ("weight_type", "activation_type"):
        check_choice(f"runtime.int8.{key}", q[key], QUANT_TYPES)
    check_choice("runtime.int8.reduce_range", q["reduce_range"], REDUCE_RANGE)
    check_choice("runtime.int8.calibration.method", q["calibration"]["method"], CALIBRATION_METHODS)
    if q["reduce_range"] == "auto":
        # Without VNNI, u8s8 kernels (vpmaddubsw) saturate 16-bit pair sums; 7-bit weights avoid it
        # (per-channel u8s8 on an AVX2 EPYC: 13% relative error in a 768x3072 MatMul, 2% with 7-bit weights).
        q["reduce_range"] = not has_vnni()
    return q


def _cached(directory: Path, key: dict, build) -> Path:
    """Reuse `directory` if its manifest has `key`, else build it atomically: `build(work_dir)` writes ONNX_FILE."""
    manifest_path = directory / artifacts.MANIFEST
    if artifacts.read_json(manifest_path).get("key") == key and (directory / ONNX_FILE).is_file():
        return directory
    console.print(f"[bold]onnx[/] building {directory}")
    with artifacts.atomic_dir(directory) as work:
        build(work)
        manifest = {"key": key, "files": [ONNX_FILE], "file_size_bytes": (work / ONNX_FILE).stat().st_size,
                    "precision": "fp32" if key["variant"] == "fp32" else "int8", "created_at": artifacts.now_iso()}
        artifacts.write_json_atomic(work / artifacts.MANIFEST, manifest)
    return directory


# ---- fp32: paddle2onnx --------------------------------------------------------------------------------------
def convert(export_dir: Path, out_dir: Path, opset: int) -> None:
    import onnx
    import paddle2onnx

    raw = out_dir / "raw.onnx"
    paddle2onnx.export(str(export_dir / MODEL_FILE), str(export_dir / PARAMS_FILE), str(raw),
                       opset_version=opset, auto_upgrade_opset=False, verbose=False)
    model = onnx.load(str(raw))
    raw.unlink()
    constants_to_initializers(model)
    name_dynamic_axes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / ONNX_FILE))


def constants_to_initializers(model) -> int:
    """paddle2onnx 1.x stores weights as Constant nodes, which ORT's quantizers do not see as weights (nothing
    gets quantized). Move every tensor-valued Constant of the main graph into the initializers."""
    from onnx import numpy_helper

    kept, moved = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            weight = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
            moved += 1
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return moved


def name_dynamic_axes(model) -> None:
    """paddle2onnx names every dynamic dimension apart (DynamicDimension.0, .1, ...); one `batch` and one `seq`
    tell shape inference and ORT's optimizer that both inputs (and per-token outputs) share them."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", "seq")):
            if not dim.HasField("dim_value"):
                dim.dim_param = name


# ---- int8: ONNX Runtime quantization ----------------------------------------------------------------------
def quantize(source_model: Path, out_dir: Path, settings: dict, feeds: list[dict]) -> None:
    """Dynamic INT8 when `feeds` is empty, else static QDQ calibrated on `feeds`. Only MatMuls with a weight
    are quantized unless `attention_matmuls` (like Paddle's int8_ops=[fc]: QK^T and P.V stay float)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_dir / "prepared.onnx"
    # ORT's recommended pre-processing: its basic graph optimizations and ONNX shape inference (symbolic shape
    # inference needs sympy, which this stack does not install; ONNX's own inference covers this graph).
    quant_pre_process(str(source_model), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    common = {
        "op_types_to_quantize": ["MatMul"],
        "per_channel": bool(settings["per_channel"]),
        "reduce_range": bool(settings["reduce_range"]),
        "weight_type": getattr(QuantType, QUANT_TYPES[settings["weight_type"]]),
        "nodes_to_exclude": [] if settings["attention_matmuls"] else activation_matmuls(model),
    }

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(feeds)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch[name] for name in INPUT_NAMES}

    with quiet_library():
        if feeds:
            calibration = settings["calibration"]
            quantize_static(
                str(prepared), str(out_dir / ONNX_FILE), Reader(), quant_format=QuantFormat.QDQ,
                activation_type=getattr(QuantType, QUANT_TYPES[settings["activation_type"]]),
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[calibration["method"]]),
                extra_options={"CalibPercentile": float(calibration["percentile"])}, **common,
            )
        else:
            quantize_dynamic(str(prepared), str(out_dir / ONNX_FILE), **common)
    prepared.unlink()


def activation_matmuls(model) -> list[str]:
    """MatMuls of two activations (attention's QK^T and P.V): neither input is a weight."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not weights & set(n.input)]


# ---- the backend --------------------------------------------------------------------------------------------------
class OnnxRuntimeBackend:
    """ONNX Runtime on CPU, the peer baseline: `model_dir` is the directory `ensure_onnx_model` made
    for the precision (fp32, or INT8 from ORT's dynamic or static quantization), run with every graph
    optimization on."""

    def __init__(self, model_dir: Path, runtime: DictConfig, precision: str, sample_batches: Sequence[Batch] = ()):
        import onnxruntime as ort

        built_for = artifacts.read_json(model_dir / artifacts.MANIFEST).get("precision")
        if not (model_dir / ONNX_FILE).is_file() or built_for != precision:
            # A float model timed as precision=int8 (or the reverse) would be a mislabelled row.
            raise MissingArtifactError(f"{model_dir} holds no {precision} ONNX model (manifest says {built_for!r}); "
                              "infer.py makes it with runtime=onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One batch at a time: all threads inside each op (intra), none across ops.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(runtime.threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if runtime.get("flush_denormals"):
            # ORT's own switch for its pool threads, as runtime.prepare does for the main thread.
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.session = ort.InferenceSession(str(model_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        # An IO binding splits a run into feed / execute / fetch as the benchmark times them; inputs are bound
        # without a copy. Graph outputs keep the Paddle export's fetch order (the task's output_names order).
        self.binding = self.session.io_binding()
        self.output_names = [output.name for output in self.session.get_outputs()]

    def feed(self, batch: Batch) -> None:
        # Bound by reference: the arrays must stay alive until execute().
        self.inputs = {name: np.ascontiguousarray(batch[name]) for name in INPUT_NAMES}
        for name, array in self.inputs.items():
            self.binding.bind_cpu_input(name, array)
        # Outputs re-bound every batch: a bound output keeps the shape of its first run, and the last batch of a
        # split (or another sequence length) has another shape.
        self.binding.clear_binding_outputs()
        for name in self.output_names:
            self.binding.bind_output(name, "cpu")

    def execute(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def fetch(self) -> list[np.ndarray]:
        return self.binding.copy_outputs_to_cpu()

    def run(self, batch: Batch) -> list[np.ndarray]:
        self.feed(batch)
        self.execute()
        return self.fetch()
