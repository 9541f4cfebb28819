"""Benchmark an exported model: QPS (batch 32, the seed's definition) and the task metric on the eval split.

    python infer.py -m task=tnews,msra_ner,cmrc2018 precision=fp32,int8,bf16
"""
import hydra
from omegaconf import DictConfig

from ernie_lab.cli import prepare_cli, run_stage


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return run_stage("infer", cfg)


if __name__ == "__main__":
    prepare_cli(stage="infer")
    main()
