"""compress.py's body: run the strategy's steps on the fine-tuned checkpoint and write the export + manifest."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.artifacts import prunes, quantizes, weights_kind
from ernie_lab.compression.export import INPUT_NAMES, MODEL_FILE, PARAMS_FILE, export_static, max_abs_diff
from ernie_lab.errors import ConfigError
from ernie_lab.inference.batching import batches
from ernie_lab.modeling import count_parameters, load_finetuned
from ernie_lab.reporting import console
from ernie_lab.tasks import build_task
from ernie_lab.tracking import TrackedRun

STEPS = ("prune", "export", "quantize")
EXPORT_CHECK_SAMPLES = 64


def compress(cfg: DictConfig, run: TrackedRun) -> dict:
    from paddlenlp.transformers import ErnieTokenizer

    check_steps(list(cfg.strategy.steps))
    source = artifacts.finetuned_dir(cfg)
    if not (source / "vocab.txt").is_file():
        raise artifacts.MissingArtifactError(
            f"no fine-tuned checkpoint at {source}; run `python train.py task={cfg.task.name} model={cfg.model.name}` first"
        )
    tokenizer = ErnieTokenizer.from_pretrained(str(source))
    task = build_task(cfg.task, tokenizer)
    state = artifacts.read_json(source / "training_state.json")
    out_dir = artifacts.export_dir(cfg, cfg.strategy.name)
    pruning = None
    if prunes(cfg.strategy):
        from ernie_lab.compression.dynabert import prune_step

        model, pruning = prune_step(cfg, task, source, run)
    else:
        model = load_finetuned(source, task.model_class(), expected_task=cfg.task.name)
    heldout = task.load("heldout")
    manifest = base_manifest(cfg, task, model, source, state, pruning)
    with artifacts.atomic_dir(out_dir) as work:
        float_dir = work / "float" if quantizes(cfg.strategy) else work
        float_dir.mkdir(exist_ok=True)
        console.print(f"[bold]export[/] {cfg.task.name}/{cfg.model.name} -> static model ({out_dir.name})")
        export_static(model, float_dir)
        manifest["export_check"] = check_export(model, task, float_dir, heldout[:EXPORT_CHECK_SAMPLES])
        if quantizes(cfg.strategy):
            manifest["calibration"] = quantize_step(cfg, task, heldout, float_dir, work, run, model)
            shutil.rmtree(float_dir)
        tokenizer.save_pretrained(str(work))  # the export carries its own vocabulary: infer needs nothing else
        manifest["file_size_bytes"] = sum((work / f).stat().st_size for f in manifest["files"])
        manifest["created_at"] = artifacts.now_iso()
        artifacts.write_json_atomic(work / artifacts.MANIFEST, manifest)
    run.log_dict(manifest, "manifest.json")
    if pruning:
        run.set_tags({"width_mult": f"{pruning['width_mult']:.2f}"})
    run.log_metrics({
        "export/file_size_mb": manifest["file_size_bytes"] / 2**20,
        "export/parameters": manifest["parameters"],
        "export/max_abs_diff_vs_dygraph": manifest["export_check"]["max_abs_diff"],
    })
    console.print(f"wrote {out_dir} ({manifest['file_size_bytes'] / 2**20:.1f} MiB, weights {manifest['weights']})")
    return manifest


def check_steps(steps: list[str]) -> None:
    known = [s for s in steps if s in STEPS]
    if known != steps or sorted(steps, key=STEPS.index) != steps or "export" not in steps or len(set(steps)) != len(steps):
        raise ConfigError(f"strategy.steps={steps}: steps come from {', '.join(STEPS)}, in that order, export included")


def base_manifest(cfg: DictConfig, task, model, source: Path, state: dict, pruning: dict | None) -> dict:
    """What an export's manifest says before the export is written (checks, calibration and sizes come after)."""
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "model_init": cfg.model.init,
        "strategy": cfg.strategy.name,
        "steps": list(cfg.strategy.steps),
        "weights": weights_kind(cfg.strategy),
        "precisions": ["int8"] if weights_kind(cfg.strategy) == "int8" else ["fp32", "bf16", "fp16"],
        "source_checkpoint": str(source),
        "source_checkpoint_metric": state.get("best", {}).get("scores"),
        "parameters": count_parameters(model),
        **({"pruning": pruning} if pruning else {}),
        "inputs": list(INPUT_NAMES),
        "outputs": list(task.output_names),
        "max_seq_length": int(cfg.task.max_seq_length),
        "files": [MODEL_FILE, PARAMS_FILE],
        "library_versions": artifacts.library_versions(),
    }


def check_export(model, task, model_dir: Path, examples: list[dict]) -> dict:
    """The static model must give the dygraph model's outputs (plain CPU kernels, no oneDNN rewrites), on the
    first features of `examples` (at most as many as examples: a CMRC2018 question makes several windows)."""
    from paddle import inference

    from ernie_lab.inference.batching import unbatch
    from ernie_lab.training import predict_dygraph

    features = task.featurize(examples, training=False)[: len(examples)]
    expected = predict_dygraph(model, task, features, 16)
    config = inference.Config(str(model_dir / MODEL_FILE), str(model_dir / PARAMS_FILE))
    config.disable_gpu()
    config.disable_mkldnn()
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    got = []
    for chunk in batches(features, 16):
        batch = task.collate(chunk)
        for name in INPUT_NAMES:
            predictor.get_input_handle(name).copy_from_cpu(batch[name])
        predictor.run()
        arrays = [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]
        got.extend(unbatch(chunk, arrays, task.per_token_outputs))
    diff = max_abs_diff(expected, got)
    if not np.isfinite(diff) or diff > 1e-3:
        raise RuntimeError(f"exported model disagrees with the dygraph model: max |diff| = {diff:.3g}")
    return {"samples": len(features), "max_abs_diff": diff}


def quantize_step(cfg: DictConfig, task, heldout: list[dict], float_dir: Path, out_dir: Path, run: TrackedRun,
                  model) -> dict:
    """INT8 model files into `out_dir`: one calibration as `quantize` says, or the best of `quantize.search`.
    `model` is the exported dygraph model (its parameter names locate the `quantize.skip` layers)."""
    from ernie_lab.compression.ptq_search import calibrate, search
    from ernie_lab.compression.quantize import skip_tensor_names

    q = cfg.quantize
    skip_tensors = skip_tensor_names(model, list(q.skip))
    settings = OmegaConf.to_container(q, resolve=True)
    common = {"split": "heldout", "heldout_seed": int(cfg.task.data.heldout_seed), "skip_tensors": skip_tensors}
    if q.search.enabled:
        summary = search(cfg, task, heldout, float_dir, out_dir, skip_tensors, run)
        (chosen,) = [c for c in summary["candidates"] if c["name"] == summary["chosen"]]
        return {**common, "samples": chosen["calibration_features"], **settings,
                "algo": chosen["algo"], "batch_nums": chosen["batch_nums"], "search": summary}
    n = int(q.batch_size) * int(q.batch_nums)
    if len(heldout) < n:
        raise ConfigError(
            f"calibration wants {n} samples (quantize.batch_size*batch_nums) but the held-out slice "
            f"has {len(heldout)} (task.data.heldout_size)"
        )
    samples, _ = calibrate(task, heldout[:n], float_dir, out_dir, q, skip_tensors)
    return {**common, "samples": samples, **settings}
