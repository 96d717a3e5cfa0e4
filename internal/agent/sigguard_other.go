//go:build !linux || !(amd64 || arm64)

package agent

// guardFaultSignals has no guard on this architecture: a fault signal
// queued to the agent by guest root (rt_sigqueueinfo) ends it.
func guardFaultSignals() error { return nil }
