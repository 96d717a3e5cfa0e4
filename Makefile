# smolvm build, setup, demo and tests. Needs Go and (for setup) root on Debian.
GO      ?= go
BIN     := bin
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/smolvm/smolvm.Version=$(VERSION)
AGENT_LDFLAGS := -s -w -X github.com/smolvm/smolvm/internal/agent.Version=$(VERSION)

.PHONY: build demo test test-short fuzz lint setup clean generate

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/smolvm ./cmd/smolvm
	CGO_ENABLED=0 $(GO) build -trimpath -tags grpcnotrace -ldflags '$(AGENT_LDFLAGS)' -o $(BIN)/smolvm-agent ./cmd/smolvm-agent

# One command from a fresh clone: build, set the host up, run a command in a sandbox.
demo: build
	$(BIN)/smolvm setup
	$(BIN)/smolvm run -- uname -a

setup: build
	$(BIN)/smolvm setup

# The whole suite: unit tests and real-VM tests (QEMU, TCG here).
test: build
	$(BIN)/smolvm setup
	SMOLVM_AGENT=$(CURDIR)/$(BIN)/smolvm-agent SMOLVM_BIN=$(CURDIR)/$(BIN)/smolvm $(GO) test -count=1 -timeout 30m ./...

test-short:
	$(GO) test -short -count=1 ./...

# Every fuzz target (the decoders of bytes from the other side of a channel)
# for FUZZTIME each, one after the other: go test -fuzz takes one target at
# a time. New crashers land in the package's testdata/fuzz.
FUZZTIME ?= 10s
FUZZ_PKGS := . ./internal/lane ./internal/agent ./internal/network ./internal/supervisor
fuzz:
	@set -e; for pkg in $(FUZZ_PKGS); do \
		for t in $$($(GO) test -short -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "== $$pkg $$t ($(FUZZTIME))"; \
			$(GO) test -short -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

lint:
	test -z "$$(gofmt -l .)"
	$(GO) vet ./...
	staticcheck ./...

generate:
	$(GO) generate ./internal/proto

clean:
	rm -rf $(BIN)
