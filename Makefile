# smolvm build, setup, demo and tests. Needs Go and (for setup) root on Debian.
GO      ?= go
BIN     := bin
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/smolvm/smolvm.Version=$(VERSION)
GOBIN_DIR := $(or $(shell $(GO) env GOBIN),$(shell $(GO) env GOPATH)/bin)
AGENT_LDFLAGS := -s -w -X github.com/smolvm/smolvm/internal/agent.Version=$(VERSION)

.PHONY: build demo test test-clients test-short fuzz lint setup clean generate tools

# All three are static (no cgo: nothing here needs libc) and leave out
# gRPC's tracing pages: a CLI call starts ~7 ms of CPU sooner without the
# dynamic loader and libc's start-up (docs/benchmarks.md).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -tags grpcnotrace -ldflags '$(LDFLAGS)' -o $(BIN)/smolvm ./cmd/smolvm
	CGO_ENABLED=0 $(GO) build -trimpath -tags grpcnotrace -ldflags '$(AGENT_LDFLAGS)' -o $(BIN)/smolvm-agent ./cmd/smolvm-agent
	CGO_ENABLED=0 $(GO) build -trimpath -tags grpcnotrace -ldflags '-s -w' -o $(BIN)/smolvm-supervisor ./cmd/smolvm-supervisor

# One command from a fresh clone: build, set the host up, run a command in a sandbox.
demo: build
	$(BIN)/smolvm setup
	$(BIN)/smolvm run -- uname -a

setup: build
	$(BIN)/smolvm setup

# The whole suite: unit tests and real-VM tests (QEMU, TCG here).
test: build test-clients
	$(BIN)/smolvm setup
	SMOLVM_AGENT=$(CURDIR)/$(BIN)/smolvm-agent SMOLVM_BIN=$(CURDIR)/$(BIN)/smolvm $(GO) test -count=1 -timeout 45m ./...

# The official clients some tests drive smolvm with (Node.js 18 or later):
# the TypeScript MCP SDK (test/mcp) and the e2b SDK (test/e2b), each pinned
# by its package-lock.json, installed when missing or older than the lock.
test-clients:
	@for d in test/mcp test/e2b; do \
		if [ ! -f $$d/node_modules/.package-lock.json ] || [ $$d/package-lock.json -nt $$d/node_modules/.package-lock.json ]; then \
			command -v npm >/dev/null || { echo "npm is needed for the official clients' tests: apt-get install nodejs npm"; exit 1; }; \
			echo "npm ci --prefix $$d"; npm ci --prefix $$d --no-audit --no-fund || exit 1; \
		fi; \
	done

test-short:
	$(GO) test -short -count=1 ./...

# Every fuzz target (the decoders of bytes from the other side of a channel)
# for FUZZTIME each, one after the other (.ci/fuzz; it tries a target once
# more when Go's coordinator fails it on the fuzztime deadline alone). New
# crashers land in the package's testdata/fuzz.
FUZZTIME ?= 10s
FUZZ_PKGS := . ./internal/lane ./internal/agent ./internal/network ./internal/supervisor ./internal/tarx
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) .ci/fuzz $(FUZZ_PKGS)

# Lint: formatting, vet, staticcheck, errorlint (errors compared with == or
# asserted instead of errors.Is/As) and errcheck (unchecked errors; the
# exclusions, each with its reason, are in .errcheck-excludes). The tools'
# versions are the ones .ci/run installs (make tools).
lint:
	test -z "$$(gofmt -l .)"
	$(GO) vet ./...
	$(GOBIN_DIR)/staticcheck ./...
	$(GOBIN_DIR)/go-errorlint ./...
	$(GOBIN_DIR)/errcheck -exclude .errcheck-excludes ./...

# The linters and protoc's Go plugins at the versions the checked-in code
# was made with (the generated files' headers name the plugins' versions).
tools:
	$(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2
	$(GO) install codeberg.org/polyfloyd/go-errorlint@v1.9.1
	$(GO) install github.com/kisielk/errcheck@v1.30.0
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
	$(GO) install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1

# Regenerate the protobuf code (needs protoc, Debian's protobuf-compiler and libprotobuf-dev,
# and the plugins of make tools). .ci/run fails when the result differs
# from what is checked in.
generate:
	PATH="$(GOBIN_DIR):$$PATH" $(GO) generate ./...

clean:
	rm -rf $(BIN)
