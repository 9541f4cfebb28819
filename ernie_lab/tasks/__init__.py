"""Task registry: `task.name` in the config picks the class."""
from __future__ import annotations

from omegaconf import DictConfig

from ernie_lab.errors import check_choice
from ernie_lab.tasks.base import Task
from ernie_lab.tasks.cmrc2018 import Cmrc2018Task
from ernie_lab.tasks.msra_ner import MsraNerTask
from ernie_lab.tasks.tnews import TnewsTask

TASKS: dict[str, type[Task]] = {"tnews": TnewsTask, "msra_ner": MsraNerTask, "cmrc2018": Cmrc2018Task}


def build_task(cfg: DictConfig, tokenizer) -> Task:
    check_choice("task.name", cfg.name, sorted(TASKS))
    return TASKS[cfg.name](cfg, tokenizer)
