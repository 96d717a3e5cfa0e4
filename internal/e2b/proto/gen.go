// Package proto holds smolvm's own .proto files for the wire schema of E2B's
// envd services (process, filesystem), which the e2b SDK speaks over
// Connect-RPC. The generated code is checked in; run
// `go generate ./internal/e2b/proto` after editing a .proto file (needs
// protoc, protoc-gen-go and protoc-gen-connect-go: go install
// connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1).
package proto

//go:generate protoc --go_out=. --go_opt=paths=source_relative --connect-go_out=. --connect-go_opt=paths=source_relative process/process.proto filesystem/filesystem.proto
