# Two commands for a newcomer: `make demo` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The only pin of torch in the project: the CPU wheel this machine kind ships (pip finds it locally).
TORCH_PIN := torch==2.13.0

.PHONY: install test demo bench check-wheel clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN) numpy "triton>=3.6" "setuptools>=64" wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[test,bench,diffusers,triton]"
	touch $(STAMP)

install: $(STAMP)

# The unit tests, then each benchmark case once (--benchmark-disable) so the suite stays runnable.
test: $(STAMP)
	$(PY) -m pytest -q -ra tests benchmarks --benchmark-disable

demo: $(STAMP)
	$(VENV)/bin/repa-kernels demo

bench: $(STAMP)
	$(VENV)/bin/repa-kernels bench --device cpu --out benchmarks/results
	$(VENV)/bin/repa-kernels bench --e2e --device cpu --threads 1 --out benchmarks/results

# A wheel built without isolation installs into a fresh environment that already has torch,
# imports, and computes a loss.
check-wheel: $(STAMP)
	rm -rf dist build /tmp/repa-wheel-venv
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	$(PYTHON) -m venv /tmp/repa-wheel-venv
	/tmp/repa-wheel-venv/bin/python -m pip install -q $(TORCH_PIN) numpy
	/tmp/repa-wheel-venv/bin/python -m pip install -q dist/repa_kernels-*.whl
	cd /tmp && /tmp/repa-wheel-venv/bin/python -c "import torch, repa_kernels as rk; \
	r = rk.crepa_loss(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)); \
	print('wheel OK:', rk.__version__, float(r.loss))"

clean:
	rm -rf $(VENV) build dist *.egg-info
