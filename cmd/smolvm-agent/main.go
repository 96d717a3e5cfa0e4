// Command smolvm-agent is the guest agent of smolvm: PID 1 (/init) of the
// guest's initramfs, serving the Agent gRPC service to the host over
// virtio-serial or vsock. Build it static, without gRPC's request tracing
// (golang.org/x/net/trace, which nothing in the guest reads: a third of
// the binary, and package initialisation the guest pays at every boot):
//
//	CGO_ENABLED=0 go build -tags grpcnotrace -o smolvm-agent ./cmd/smolvm-agent
package main

import "github.com/smolvm/smolvm/internal/agent"

func main() {
	agent.Main()
}
