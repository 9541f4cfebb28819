# The two commands of the README: `make run` (main job, offline default) and `make test`.
# DEVICE=gpu switches the install to paddlepaddle-gpu (requirements/gpu.lock).
DEVICE ?= cpu
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run test lock
setup:
	bash scripts/setup.sh $(DEVICE)

run: setup
	$(PY) -m ernie_lab.pipeline $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

# Re-resolve both locks after editing requirements/*.in.
lock:
	cd requirements && uv pip compile cpu.in -p 3.11 --python-platform x86_64-manylinux_2_28 -o cpu.lock \
	  && uv pip compile gpu.in -p 3.11 --python-platform x86_64-manylinux_2_28 -o gpu.lock
