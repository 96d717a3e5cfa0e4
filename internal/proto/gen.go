// Package proto holds the wire protocols of smolvm: agentpb between host and
// guest agent, controlpb between clients and a VM's supervisor. The generated
// code is checked in; run `go generate ./internal/proto` after editing a
// .proto file (needs protoc, protoc-gen-go and protoc-gen-go-grpc: go install
// google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2).
package proto

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative agentpb/agent.proto agentpb/fast.proto controlpb/control.proto
