package smolvm

import (
	"context"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/image"
)

// OnLane reports whether calls to vm go over the agent's fast lane (a VM
// of this process whose lane is up), for tests that must know the lane,
// not its gRPC fallback, did the work.
func OnLane(ctx context.Context, vm *VM) bool { return vm.lane(ctx) != nil }

// LaneDialedEarly reports whether vm, restored in this process, made its
// first call over a fast lane connected before the guest resumed.
func LaneDialedEarly(vm *VM) bool { return vm.sup != nil && vm.sup.LaneDialedEarly() }

// CmdOnLane reports whether a started Cmd runs over the fast lane.
func CmdOnLane(c *Cmd) bool { return c.lane != nil }

// FailTunedKernelBuild makes Setup's tuned kernel build fail with err until
// the test ends.
func FailTunedKernelBuild(t interface{ Cleanup(func()) }, err error) {
	old := engine.BuildTunedKernel
	engine.BuildTunedKernel = func(context.Context, image.KernelBuildOptions) (string, error) { return "", err }
	t.Cleanup(func() { engine.BuildTunedKernel = old })
}

// LiveSpares counts this process's prelaunched hypervisors that are ready
// and still run.
func LiveSpares() int { return engine.LiveSpares() }
