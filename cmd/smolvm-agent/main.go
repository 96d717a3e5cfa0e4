// Command smolvm-agent is the guest agent of smolvm: PID 1 (/init) of the
// guest's initramfs, serving the Agent gRPC service to the host over
// virtio-serial or vsock. Build it static:
//
//	CGO_ENABLED=0 go build -o smolvm-agent ./cmd/smolvm-agent
package main

import "github.com/smolvm/smolvm/internal/agent"

func main() {
	agent.Main()
}
