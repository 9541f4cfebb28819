"""ernie-lab: fine-tune, compress and benchmark ERNIE 3.0 encoders, with every run tracked in MLflow."""
import os

# Paddle reads these once, at import: they must be in place before any module imports paddle.
# setdefault keeps whatever the user exported.
os.environ.setdefault("GLOG_minloglevel", "2")  # glog INFO/WARNING from the C++ core drowns the progress bars
os.environ.setdefault("FLAGS_call_stack_level", "0")  # one-line C++ errors instead of a native stack dump
os.environ.setdefault("TQDM_DISABLE", "1")  # paddleslim/paddlenlp tqdm bars would fight with rich's

__version__ = "0.1.0"
