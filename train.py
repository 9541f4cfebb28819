"""Fine-tune ERNIE on a task and keep the best checkpoint.

    python train.py task=tnews model=ernie-3.0-medium train.learning_rate=2e-5
"""
import hydra
from omegaconf import DictConfig

from ernie_lab.cli import prepare_cli, run_stage


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return run_stage("train", cfg)


if __name__ == "__main__":
    prepare_cli(stage="train")
    main()
