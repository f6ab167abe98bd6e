# Two commands do all the set-up on a fresh machine:
#   make demo   # create .venv, install, train CIFAR-10 on 2 ranks (synthetic data when offline)
#   make test   # create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without a GPU (no nvidia-smi, or CPU=1) torch's CPU wheels are installed: a venv of about 1 GB instead of the
# 5-6 GB of the CUDA build. If their index cannot be reached, pip's default index is used instead.
CPU         ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,1)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# What to install from that index; CI pins the releases the project was last verified with.
TORCH_PKGS  ?= torch torchvision

.PHONY: demo test install clean gpu-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if [ "$(CPU)" = "1" ]; then \
		echo "no GPU here (or CPU=1): installing torch's CPU build from $(TORCH_INDEX)"; \
		$(BIN)/pip install --quiet --retries 1 --timeout 15 --index-url $(TORCH_INDEX) $(TORCH_PKGS) \
			|| echo "$(TORCH_INDEX) cannot be reached: torch comes from the default index instead"; \
		if [ -x $(BIN)/torchrun ] && ! $(BIN)/python -c "import torchvision" >/dev/null 2>&1; then \
			echo "the torch and torchvision found beside $(TORCH_INDEX) do not import together" \
				"(a local torch wheel without its torchvision): taking both from the default index instead"; \
			$(BIN)/pip uninstall --quiet --yes torch torchvision; \
		fi; \
	fi
	$(BIN)/pip install --quiet -e '.[test]'
	@$(BIN)/python -c "import torch; b = f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'; \
		print(f'installed torch {torch.__version__} ({b}) in $(VENV); use .venv/bin/python, or: source .venv/bin/activate')"
	touch $@

install: $(BIN)/.installed

demo: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/torchrun --standalone --nproc_per_node=2 \
		-m trainers.cifar --config configs/cifar_demo.yaml $(ARGS)

# Test files run in parallel, TEST_WORKERS at a time (pytest-xdist; -n 0 runs them in this process). A file is
# the unit: its tests run in order on one worker, so the SLURM tests never queue behind each other on the local
# cluster. More workers than half the cores would oversubscribe the 2-rank tests.
TEST_WORKERS ?= $(shell n=$$(($$(nproc 2>/dev/null || echo 2) / 2)); [ $$n -ge 2 ] && echo $$n || echo 2)

test: install
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# On a GPU host: the GPU tests, the speed table (against the published airbench) and the fast recipe's times, in
# one report (OUT/gpu-report.md); each step is bounded and recorded as it ends.
OUT ?= gpu-check
gpu-check: install
	$(BIN)/pip install --quiet airbench || echo "airbench could not be installed: its row will say so"
	$(BIN)/python -m bench.gpu_check $(OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
