"""runtime=openvino: the float Paddle export read by OpenVINO's Paddle frontend (no ONNX step), FP32 with the
inference precision pinned to f32, BF16 where the CPU has it, and INT8 made by NNCF post-training quantization
(transformer preset) calibrated on the held-out examples Paddle PTQ calibrates on.

The converted models are cached beside the exports, one directory per variant, rebuilt when the source export,
a setting or the openvino/nncf version changes:

    <task dir>/openvino/<export name>/fp32/model.xml (+ .bin)      fp32 and bf16 (bf16 is a compile-time hint)
    <task dir>/openvino/<export name>/int8-ptq/model.xml (+ .bin)
    <task dir>/openvino/<export name>/int8-accuracy_control/...   NNCF's accuracy-controlled quantization
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.artifacts import INPUT_NAMES, MODEL_FILE, PARAMS_FILE
from ernie_lab.errors import ConfigError, MissingArtifactError, check_choice
from ernie_lab.reporting import console, quiet_library

ENGINE = "openvino"
XML_FILE, BIN_FILE = "model.xml", "model.bin"
INT8_MODES = ("ptq", "accuracy_control")
PRESETS = {"mixed": "MIXED", "performance": "PERFORMANCE"}
MODEL_TYPES = {"transformer": "TRANSFORMER", None: None}
OVERFLOW_FIX = {"auto": None, "enable": "ENABLE", "first_layer_only": "FIRST_LAYER", "disable": "DISABLE"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# INFERENCE_PRECISION_HINT per precision: without an explicit f32, the CPU plugin runs "FP32" as BF16 on CPUs
# with AVX512-BF16/AMX. INT8 models keep their float parts in f32. On a CPU without FP16 arithmetic the plugin
# quietly compiles an f16 hint as something else (bf16 on a Zen 4 with AVX512-BF16, f32 elsewhere), which is why the
# compiled precision is read back (OpenVinoBackend).
INFERENCE_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}
COMPILED_CACHE = "compiled"


def uses_openvino(runtime: DictConfig) -> bool:
    return runtime.get("engine") == ENGINE


def variant_name(runtime: DictConfig, precision: str) -> str:
    """The cached model a precision runs: bf16 and fp16 compile the fp32 model with their hint."""
    if precision in ("fp32", "bf16", "fp16"):
        return "fp32"
    if precision == "int8":
        check_choice("runtime.int8_mode", runtime.int8_mode, INT8_MODES)
        return f"int8-{runtime.int8_mode}"
    raise ConfigError(f"precision={precision!r} cannot run on runtime={runtime.name}; valid there: "
                      f"{', '.join(runtime.precisions)}")


def model_dir_for(cfg: DictConfig, export_dir: Path, variant: str) -> Path:
    return artifacts.task_dir(cfg) / "openvino" / export_dir.name / variant


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("openvino", "nncf")}


def source_stamp(export_dir: Path) -> dict:
    """What identifies the float export: its manifest's time and its files' size and mtime."""
    manifest = artifacts.read_manifest(export_dir, "python compress.py ... strategy=none (or another float strategy)")
    if manifest.get("weights") != "float":
        raise MissingArtifactError(f"{export_dir} holds {manifest.get('weights')} weights; runtime=openvino reads a "
                                   "float export and quantizes it with NNCF itself")
    files = {}
    for name in (MODEL_FILE, PARAMS_FILE):
        st = (export_dir / name).stat()
        files[name] = f"{st.st_size}:{st.st_mtime_ns}"
    return {"dir": str(export_dir), "created_at": manifest.get("created_at"), "files": files,
            "outputs": manifest.get("outputs")}


def int8_settings(runtime: DictConfig) -> dict:
    """`runtime.int8` with every choice checked and `overflow_fix: auto` decided for this CPU."""
    from ernie_lab.runtime import has_vnni

    q = OmegaConf.to_container(runtime.int8, resolve=True)
    check_choice("runtime.int8.preset", q["preset"], PRESETS)
    check_choice("runtime.int8.model_type", q["model_type"], MODEL_TYPES)
    check_choice("runtime.int8.overflow_fix", q["overflow_fix"], OVERFLOW_FIX)
    if q["overflow_fix"] == "auto":
        q["overflow_fix"] = "first_layer_only" if has_vnni() else "enable"
    alpha = q["smooth_quant_alpha"]
    if not isinstance(alpha, (int, float)) or not (alpha == -1 or 0 <= alpha <= 1):
        raise ConfigError(f"runtime.int8.smooth_quant_alpha={alpha!r} is not valid; choose a number in [0, 1] or -1 (off)")
    return q


def prepare_model(cfg: DictConfig, task, export_dir: Path, precision: str | None = None) -> Path:
    """The variant's directory for `precision` (default cfg.precision), converted (and for int8 quantized) from
    the float export in `export_dir` unless a cached one was made from the same export with the same settings."""
    from ernie_lab.inference.calibration import calibration_feeds, feeds_digest

    runtime = cfg.runtime
    variant = variant_name(runtime, precision or cfg.precision.name)
    fp32_key = {"variant": "fp32", "source": source_stamp(export_dir), "versions": versions()}
    fp32_dir = _cached(model_dir_for(cfg, export_dir, "fp32"), fp32_key, lambda out: convert(export_dir, out))
    if variant == "fp32":
        return fp32_dir
    settings = int8_settings(runtime)
    feeds = calibration_feeds(cfg, task, same_width=False)
    settings["calibration"] = {"examples": sum(len(f[INPUT_NAMES[0]]) for f in feeds), "batches": len(feeds),
                               "digest": feeds_digest(feeds)}
    validation = None
    if runtime.int8_mode == "accuracy_control":
        validation = HeldoutValidation(cfg, task, skip=settings["calibration"]["examples"])
        settings["accuracy_control"]["validation_examples"] = len(validation.examples)
    key = {**fp32_key, "variant": variant, "int8": settings}
    return _cached(model_dir_for(cfg, export_dir, variant), key,
                   lambda out: quantize(fp32_dir / XML_FILE, out, settings, feeds, validation))


def _cached(directory: Path, key: dict, build) -> Path:
    """Reuse `directory` if its manifest has `key`, else build it atomically: `build(work_dir)` writes the IR."""
    if artifacts.read_json(directory / artifacts.MANIFEST).get("key") == key and (directory / XML_FILE).is_file():
        return directory
    console.print(f"[bold]openvino[/] building {directory}")
    with artifacts.atomic_dir(directory) as work:
        notes = build(work) or {}
        manifest = {**notes, "key": key, "files": [XML_FILE, BIN_FILE],
                    "file_size_bytes": sum((work / f).stat().st_size for f in (XML_FILE, BIN_FILE)),
                    "weights": "float" if key["variant"] == "fp32" else "int8", "created_at": artifacts.now_iso()}
        artifacts.write_json_atomic(work / artifacts.MANIFEST, manifest)
    return directory


# ---- fp32: the Paddle frontend --------------------------------------------------------------------------------
def convert(export_dir: Path, out_dir: Path) -> dict:
    """The export as OpenVINO IR with dynamic batch and sequence axes; what the manifest should say about how."""
    import openvino as ov

    try:
        model, how = ov.Core().read_model(str(export_dir / MODEL_FILE)), "paddle frontend"
    except RuntimeError as exc:
        if "get_shape() must be called on a static shape" not in str(exc):
            raise
        # Some converters need static input shapes (2026.4's `unstack`, which CMRC2018's span head ends with,
        # reads its input's whole shape to split along a static axis of 2): convert with a placeholder shape,
        # then make batch and sequence dynamic again. Outputs are checked against Paddle's in the tests.
        model, how = _convert_static_then_dynamic(export_dir), "paddle frontend, static placeholder shape then reshaped"
    model = in_fetch_order(model)
    # compress_to_fp16=False: save_model would otherwise store the weights in FP16, and "FP32" would not be.
    ov.save_model(model, str(out_dir / XML_FILE), compress_to_fp16=False)
    return {"conversion": how}


def _convert_static_then_dynamic(export_dir: Path, placeholder: tuple[int, int] = (1, 64)):
    import openvino as ov
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("paddle")
    input_model = frontend.load(str(export_dir / MODEL_FILE))
    for place in input_model.get_inputs():
        input_model.set_partial_shape(place, ov.PartialShape(list(placeholder)))
    model = frontend.convert(input_model)
    model.reshape({p.get_any_name(): ov.PartialShape([-1, -1]) for p in model.inputs})
    return model


def in_fetch_order(model):
    """The model with its outputs in the Paddle export's fetch order (start logits before end logits, ...).
    save_inference_model names fetch targets `save_infer_model/scale_<i>.tmp_<j>`, i being the fetch position."""
    import openvino as ov

    def position(output) -> int:
        found = [re.search(r"scale_(\d+)\.tmp", name) for name in output.get_names()]
        hits = [int(m.group(1)) for m in found if m]
        return hits[0] if hits else 1 << 30

    outputs = list(model.outputs)
    order = sorted(range(len(outputs)), key=lambda i: position(outputs[i]))
    if order == list(range(len(outputs))):
        return model
    results = [model.get_results()[i] for i in order]
    return ov.Model(results, model.get_parameters(), model.get_friendly_name())


# ---- int8: NNCF post-training quantization ------------------------------------------------------------------
class HeldoutValidation:
    """The task metric on held-out examples (those after the calibration ones, never the eval split), as NNCF's
    accuracy control measures a candidate model: one data item per example (all its features in one batch), so
    that any subset of items NNCF picks still scores whole examples."""

    def __init__(self, cfg: DictConfig, task, skip: int):
        n = int(cfg.runtime.int8.accuracy_control.samples)
        heldout = task.load("heldout")
        self.examples = heldout[skip : skip + n]
        if len(self.examples) < n:
            raise ConfigError(
                f"runtime.int8.accuracy_control.samples={n} but the held-out slice has {len(heldout)} examples, "
                f"{skip} of them for calibration; lower it or raise task.data.heldout_size"
            )
        self.task = task
        by_example: dict[int, list[dict]] = {}
        for feature in task.featurize(self.examples, training=False):
            by_example.setdefault(feature["example_index"], []).append(feature)
        self.items = [(index, features) for index, features in sorted(by_example.items())]

    def inputs(self, item) -> dict:
        return {name: array for name, array in self.task.collate(item[1]).items() if name in INPUT_NAMES}

    def __call__(self, compiled_model, items) -> tuple[float, None]:
        """NNCF's validation_fn: the primary metric of the items' examples (None: NNCF ranks layers by outputs)."""
        from ernie_lab.inference.batching import unbatch

        examples, features, outputs = [], [], []
        for index, item_features in items:
            local = len(examples)
            examples.append(self.examples[index])
            result = compiled_model(self.inputs((index, item_features)))
            arrays = [result[i] for i in range(len(compiled_model.outputs))]
            outputs.extend(unbatch(item_features, arrays, self.task.per_token_outputs))
            features.extend({**f, "example_index": local} for f in item_features)
        predictions = self.task.postprocess(examples, features, outputs)
        return float(self.task.metrics(examples, predictions)[self.task.primary_metric]), None


def quantize(fp32_xml: Path, out_dir: Path, settings: dict, feeds: Sequence[dict],
             validation: HeldoutValidation | None = None) -> dict:
    """NNCF post-training quantization of the fp32 IR; with `validation`, accuracy-controlled: the layers that
    cost most are reverted to float until the held-out metric is within `max_drop` points of the float model's."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    model = ov.Core().read_model(str(fp32_xml))
    names = {p.get_any_name() for p in model.inputs}
    dataset = nncf.Dataset(list(feeds), lambda batch: {name: batch[name] for name in INPUT_NAMES if name in names})
    alpha = float(settings["smooth_quant_alpha"])
    model_type = MODEL_TYPES[settings["model_type"]]
    advanced = AdvancedQuantizationParameters(
        overflow_fix=getattr(OverflowFix, OVERFLOW_FIX[settings["overflow_fix"]]),
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha),
    )
    common = dict(
        preset=getattr(nncf.QuantizationPreset, PRESETS[settings["preset"]]),
        model_type=getattr(nncf.ModelType, model_type) if model_type else None,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(feeds),
        fast_bias_correction=bool(settings["fast_bias_correction"]),
    )
    notes: dict = {}
    with quiet_library("nncf"):
        if validation is None:
            quantized = nncf.quantize(model, dataset, advanced_parameters=advanced, **common)
        else:
            control = settings["accuracy_control"]
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(validation.items, validation.inputs), validation,
                max_drop=float(control["max_drop"]), drop_type=nncf.DropType.ABSOLUTE,
                advanced_quantization_parameters=advanced,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=int(control["max_num_iterations"])),
                **common,
            )
            core, f32 = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
            notes["accuracy_control"] = {
                "heldout_examples": len(validation.examples),
                "heldout_metric_float": validation(core.compile_model(model, "CPU", f32), validation.items)[0],
                "heldout_metric_int8": validation(core.compile_model(quantized, "CPU", f32), validation.items)[0],
                "fake_quantize_nodes": _fake_quantize_count(quantized),
            }
    ov.save_model(quantized, str(out_dir / XML_FILE), compress_to_fp16=False)
    return notes


def _fake_quantize_count(model) -> int:
    """FakeQuantize nodes in the model: accuracy control reverts layers to float by removing theirs."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


# ---- the backend --------------------------------------------------------------------------------------------------
def compile_properties(runtime: DictConfig, precision: str, cache_dir: Path | None) -> dict:
    """The CPU plugin's properties for a run, as plain strings (tested without compiling anything)."""
    hint = str(runtime.get("performance_hint", "LATENCY")).upper()
    check_choice("runtime.performance_hint", hint, PERFORMANCE_HINTS)
    if precision not in INFERENCE_PRECISION:
        raise ConfigError(f"precision={precision!r} cannot run on runtime=openvino; valid there: "
                          f"{', '.join(INFERENCE_PRECISION)}")
    props = {
        "PERFORMANCE_HINT": hint,
        "INFERENCE_NUM_THREADS": str(int(runtime.threads)),
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
        "CPU_DENORMALS_OPTIMIZATION": "YES" if runtime.get("flush_denormals") else "NO",
    }
    if hint == "LATENCY":
        props["NUM_STREAMS"] = "1"
    if cache_dir is not None:
        props["CACHE_DIR"] = str(cache_dir)
    return props


def _plain(value) -> str:
    """A property value as a string: element types by their short name (f32, bf16)."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OpenVinoBackend:
    """OpenVINO's CPU plugin on a model directory made by `prepare_model` for the precision (fp32 also serves
    bf16 and fp16); `properties` are the compiled model's own, read back and logged with the run. One infer
    request, inputs set by name without a copy, outputs copied out (the request reuses them)."""

    def __init__(self, model_dir: Path, runtime: DictConfig, precision: str, sample_batches: Sequence = ()):
        import openvino as ov

        weights = artifacts.read_json(model_dir / artifacts.MANIFEST).get("weights")
        needed = "int8" if precision == "int8" else "float"
        if not (model_dir / XML_FILE).is_file() or weights != needed:
            # A float model timed as precision=int8 (or the reverse) would be a mislabelled row.
            raise MissingArtifactError(f"{model_dir} holds no {needed} OpenVINO model for precision={precision} "
                                       f"(manifest says {weights!r}); infer.py makes it with runtime=openvino")
        cache = model_dir / COMPILED_CACHE if runtime.get("compiled_cache", True) else None
        props = compile_properties(runtime, precision, cache)
        core = ov.Core()
        self.compiled = core.compile_model(str(model_dir / XML_FILE), "CPU", props)
        self.properties = {k: _plain(self.compiled.get_property(k)) for k in
                           ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")}
        if self.properties["INFERENCE_PRECISION_HINT"] != props["INFERENCE_PRECISION_HINT"]:
            # the row would be labelled with a precision the CPU never ran
            raise ConfigError(f"OpenVINO compiled {model_dir} at inference precision "
                              f"{self.properties['INFERENCE_PRECISION_HINT']}, not the {props['INFERENCE_PRECISION_HINT']} "
                              f"that precision={precision} needs: this CPU cannot run it; use precision=fp32")
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.n_outputs = len(self.compiled.outputs)

    def feed(self, batch: dict) -> None:
        import openvino as ov

        # shared_memory: the tensors wrap the arrays, which must stay alive until execute().
        self.inputs = {name: np.ascontiguousarray(batch[name]) for name in self.input_names}
        for name, array in self.inputs.items():
            self.request.set_tensor(name, ov.Tensor(array, shared_memory=True))

    def execute(self) -> None:
        self.request.infer()

    def fetch(self) -> list[np.ndarray]:
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_outputs)]

    def run(self, batch: dict) -> list[np.ndarray]:
        self.feed(batch)
        self.execute()
        return self.fetch()
