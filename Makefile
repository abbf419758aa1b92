# Basalt: `make run` starts the appliance, `make test` runs every test.
#
# One target directory, outside the clone, serves every build, test and CI run: a clean
# build compiles RocksDB from C++, which takes minutes, so it is done once and kept.
# Everything uses the release profile for the same reason (see Cargo.toml).

CARGO_TARGET_DIR ?= $(HOME)/.cache/basalt-target
export CARGO_TARGET_DIR
DATA_DIR ?= ./var
BASALT := $(CARGO_TARGET_DIR)/release/basalt
CARGO ?= cargo

.PHONY: run build test lint fmt bench fuzz deps test-deps bench-deps clean-var

deps:
	./deploy/install-deps.sh build

test-deps:
	./deploy/install-deps.sh test

bench-deps:
	./deploy/install-deps.sh bench

build: deps
	$(CARGO) build --release --bin basalt

run: build
	$(BASALT) serve --data-dir $(DATA_DIR)

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets --all-features -- -D warnings

test: test-deps lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --release --workspace --all-features --no-fail-fast; \
	else \
		$(CARGO) test --release --workspace --all-features --no-fail-fast; \
	fi
	$(CARGO) test --release --workspace --all-features --doc

bench: bench-deps
	./bench/run.sh

# Every cargo-fuzz target for FUZZ_SECONDS each (nightly toolchain; not part of CI, whose
# tests run each target's property through proptest instead).
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	for t in $$($(CARGO) +nightly fuzz list); do \
		echo "=== $$t"; \
		$(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

fmt:
	$(CARGO) fmt --all

clean-var:
	rm -rf $(DATA_DIR)
