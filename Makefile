# Two commands on a fresh machine (see README): `make serve` and `make test`. Both set up .venv first.
VENV ?= .venv
STAMP := $(VENV)/.chatvla-installed
ARGS ?=

.PHONY: setup serve demo test test-fast fuzz hostile lint check-proto

$(STAMP): pyproject.toml requirements/constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

# The glibc allocator pinned as in the server images (docs/deployment.md, "Memory allocator"), unless
# the environment already sets it.
serve: setup
	MALLOC_MMAP_THRESHOLD_=$${MALLOC_MMAP_THRESHOLD_:-67108864} MALLOC_TRIM_THRESHOLD_=$${MALLOC_TRIM_THRESHOLD_:-134217728} \
		$(VENV)/bin/chatvla serve $(ARGS)

demo: setup
	$(VENV)/bin/chatvla demo $(ARGS)

test: setup
	$(VENV)/bin/pytest $(ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(ARGS)

# The fuzz tests (tests/fuzz) with a long budget: hypothesis examples per property, raw-bytes messages
# per gRPC method, and (a third of it) requests and frames on the live HTTP and openpi sockets (the
# default, in `make test`, is 150 and deterministic). CHATVLA_FUZZ_SEED varies the raw-bytes mutations.
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	CHATVLA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest tests/fuzz -p no:cacheprovider $(ARGS)

# The same kinds of input against a live `chatvla serve` process on every transport (benchmarks/hostile.py):
# HOSTILE_N per endpoint (issue #12's target: 10000), figures in benchmarks/results/hostile.json; exits 1
# if a target is missed. ARGS for more flags (--engine null, --concurrency, --endpoints, ...).
HOSTILE_N ?= 10000
hostile: setup
	$(VENV)/bin/python benchmarks/hostile.py --per-endpoint $(HOSTILE_N) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

check-proto: setup
	PYTHON=$(VENV)/bin/python bash scripts/gen_proto.sh --check
