package smolvm

// State is where a VM is in its life (Info.State). Stopped and failed VMs
// keep their state folder until deleted.
type State string

// The states of a VM.
const (
	// StateCreating: the VM is being made and booted.
	StateCreating State = "creating"
	// StateRunning: the guest runs and its agent answers.
	StateRunning State = "running"
	// StatePaused: the guest's vCPUs are stopped (VM.Pause); VM.Resume
	// lets it run again.
	StatePaused State = "paused"
	// StateStopped: the VM was stopped; VM.Start boots it again.
	StateStopped State = "stopped"
	// StateFailed: the VM ended on its own (its supervisor or hypervisor
	// died, a boot failed); Info.Reason says why.
	StateFailed State = "failed"
	// StateUnresponsive is the state List and Info report for a VM whose
	// supervisor lives but does not answer; it is not recorded (SIGCONT
	// cures it).
	StateUnresponsive State = "unresponsive"
)

// Live tells whether a VM in this state holds host resources: a
// hypervisor and a supervisor (creating, running, paused or unresponsive).
func (s State) Live() bool {
	switch s {
	case StateCreating, StateRunning, StatePaused, StateUnresponsive:
		return true
	}
	return false
}
