"""A stage record stands for its stage only while what it computed would come out the same."""
from __future__ import annotations

from hydra import compose, initialize_config_dir

from ernie_lab import artifacts, stages
from ernie_lab.config import CONF_DIR
from ernie_lab.tasks.msra_ner import MsraNerTask


def test_an_inference_recorded_before_a_post_processing_change_runs_again(tmp_path, monkeypatch):
    export = tmp_path / "manifest.json"
    export.write_text("{}")
    monkeypatch.setattr(stages, "input_files", lambda stage, cfg: {"export": export})

    def infer_cfg(task: str):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name="pipeline", overrides=[f"task={task}", "strategy=none", "precision=fp32",
                                                              "runtime=cpu"])

    def before_revisions(cfg) -> str:  # how an inference was fingerprinted before tasks had output revisions
        return artifacts.json_sha256({"stage": "infer", "settings": stages.settings("infer", cfg),
                                      "inputs": {"export": stages.digest(export)}, "machine": stages.machine()})

    tnews, ner = infer_cfg("tnews"), infer_cfg("msra_ner")
    assert stages.fingerprint("infer", tnews) == before_revisions(tnews)  # its post-processing never changed
    assert MsraNerTask.output_revision == 2  # BIO-constrained decoding
    revised = stages.fingerprint("infer", ner)
    assert revised != before_revisions(ner)
    monkeypatch.setattr(MsraNerTask, "output_revision", 3)
    assert stages.fingerprint("infer", ner) not in (revised, before_revisions(ner))
