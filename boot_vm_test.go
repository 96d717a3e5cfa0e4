package smolvm_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// A cold boot whose agent does not answer in time fails saying where the
// guest is (the console of a quiet kernel may be empty): QEMU's process
// and threads, the run state and the vCPU's instruction pointer; the VM
// leaves nothing behind (the home's cleanup checks its processes).
func TestBootTimeoutSaysWhere(t *testing.T) {
	home := testutil.Home(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// No guest answers within 300 ms under emulation.
	vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Cold: true, BootTimeout: 300 * time.Millisecond})
	if err == nil {
		_ = vm.Close()
		t.Skip("the guest answered within 300 ms (KVM?): nothing to inspect")
	}
	for _, want := range []string{"guest agent did not answer within 300ms", "\nguest: QEMU pid ", " of CPU in ", "threads [", "run state running", "vCPU 0 "} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("New: %v\nwant it to say %q", err, want)
		}
	}
}
