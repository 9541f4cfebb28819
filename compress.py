"""Export the fine-tuned model and compress it (strategy=none: float export; strategy=ptq: INT8 PTQ).

    python compress.py task=tnews strategy=ptq strategy.quantize.algo=mse
"""
import hydra
from omegaconf import DictConfig

from ernie_lab.cli import prepare_cli, run_stage


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return run_stage("compress", cfg)


if __name__ == "__main__":
    prepare_cli(stage="compress")
    main()
