"""Task registry: `task.name` in the config picks the class."""
from __future__ import annotations

from omegaconf import DictConfig

from ernie_lab.errors import check_choice
from ernie_lab.tasks.base import Task


def task_classes() -> dict[str, type[Task]]:
    from ernie_lab.tasks.tnews import TnewsTask

    classes: dict[str, type[Task]] = {"tnews": TnewsTask}
    try:  # tasks added later register here
        from ernie_lab.tasks.msra_ner import MsraNerTask

        classes["msra_ner"] = MsraNerTask
    except ImportError:
        pass
    try:
        from ernie_lab.tasks.cmrc2018 import Cmrc2018Task

        classes["cmrc2018"] = Cmrc2018Task
    except ImportError:
        pass
    return classes


def build_task(cfg: DictConfig, tokenizer) -> Task:
    classes = task_classes()
    check_choice("task.name", cfg.name, sorted(classes))
    return classes[cfg.name](cfg, tokenizer)
