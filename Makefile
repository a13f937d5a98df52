# vmferry — the two commands a user needs are `make demo` and `make test`.
.PHONY: setup guests demo test test-quick check lint typecheck layers bench soak faults clean

UV ?= uv
PYTEST_ARGS ?=
# Three workers on this machine kind's 2 cores (1,196 tests: 6 min 38 s with two workers, 5 min
# 33 s with three; four were slower: counting the QEMUs, which `time` does not, a run keeps both
# cores ~90 % busy). Tests marked xdist_group("netns") share one worker; `solo` tests run alone
# (tests/DURATIONS.md).
PYTEST_XDIST ?= -n 3 --dist loadgroup --durations=15

setup:
	@bash scripts/setup-host.sh

demo: setup
	$(UV) run vmferry demo

# Everything, real QEMU included (a missing QEMU fails here, never skips); tests/DURATIONS.md
test: setup guests
	$(UV) run pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

# The Debian 12 guest the tests run as "your own VM", built from Debian's packages (cached;
# about 35 s the first time, 1 s after)
guests: setup
	$(UV) run python -m vmferry.guest.debian >/dev/null

# The pure tests: unit and fuzz (no guest is booted), in seconds
test-quick: setup
	$(UV) run pytest -q tests/unit tests/fuzz $(PYTEST_ARGS)

check: setup lint typecheck layers

lint:
	$(UV) run ruff check src tests bench
	$(UV) run ruff format --check src tests bench

typecheck:
	$(UV) run mypy --strict src
	$(UV) run mypy tests bench

layers:
	$(UV) run pytest -q tests/unit/test_layers.py

bench: setup
	$(UV) run python bench/raw_vs_vmferry.py

# 100 back-and-forth live migrations, each verified (not part of `make test`); SOAK_ARGS=--count 10
SOAK_ARGS ?=
soak: setup
	$(UV) run python bench/soak.py $(SOAK_ARGS)

# Faults injected at every phase of a migration (root: netns labs); FAULTS_ARGS="--only kill-cli"
FAULTS_ARGS ?=
faults: setup
	$(UV) run python bench/faults.py $(FAULTS_ARGS)

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache bench/results
