# Two commands for a newcomer: `make demo` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The only pin of torch in the project: the CPU wheel this machine kind ships (pip finds it locally).
TORCH_PIN := torch==2.13.0
# Every other package of the test environment, pinned (see the file's header for how to bump it).
CONSTRAINTS := constraints/test.txt
BUILD_TOOLS := numpy "triton>=3.6" "setuptools>=64" wheel ninja
EXTRAS := test,bench,diffusers,triton,demo

.PHONY: install test demo bench check-wheel update-constraints python-version clean gpu-check gpu-check-dry

# The pinned set (numpy 2.4, diffusers, transformers, triton) needs Python 3.11 or newer.
python-version:
	@$(PYTHON) -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
	'make needs Python 3.11 or newer for the pinned test environment ($(CONSTRAINTS)); $(PYTHON) is ' \
	+ sys.version.split()[0] + '. Run: make PYTHON=python3.11 test')"

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h) | python-version
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) $(TORCH_PIN) $(BUILD_TOOLS)
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[$(EXTRAS)]"
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
	/tmp/repa-wheel-venv/bin/python -m pip install -q -c $(CONSTRAINTS) $(TORCH_PIN) numpy
	/tmp/repa-wheel-venv/bin/python -m pip install -q dist/repa_kernels-*.whl
	cd /tmp && /tmp/repa-wheel-venv/bin/python -c "import torch, repa_kernels as rk; \
	r = rk.crepa_loss(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)); \
	print('wheel OK:', rk.__version__, float(r.loss))"

# Re-resolve the newest releases that pyproject.toml's ranges allow into a scratch venv and rewrite
# $(CONSTRAINTS) (its comment header is kept). Then run `make test` and commit the file.
update-constraints: python-version
	rm -rf /tmp/repa-constraints-venv
	$(PYTHON) -m venv /tmp/repa-constraints-venv
	/tmp/repa-constraints-venv/bin/python -m pip install -q $(TORCH_PIN) $(BUILD_TOOLS)
	/tmp/repa-constraints-venv/bin/python -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	{ grep '^#' $(CONSTRAINTS); /tmp/repa-constraints-venv/bin/python -m pip freeze --all \
	  | grep -v -E '^(-e |#|pip==|torch==|repa.kernels)'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf /tmp/repa-constraints-venv
	@echo "rewrote $(CONSTRAINTS); now run 'make test' and commit it"

# On a lent GPU machine (benchmarks/GPU_CHECK.md): its own python3, no venv, no registry, the package from
# the source tree. GPU_CHECK_ARGS passes options, e.g. GPU_CHECK_ARGS="--phases tests --e2e".
gpu-check:
	PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(PYTHON) -m repa_kernels.bench.gpu_check $(GPU_CHECK_ARGS)

# The same command at tiny shapes on CPU under the Triton interpreter (tests/test_gpu_check.py runs it in `make test`).
gpu-check-dry: $(STAMP)
	$(PY) -m repa_kernels.bench.gpu_check --dry --e2e --out out/gpu-check-dry $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
