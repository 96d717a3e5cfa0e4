package testutil

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm"
)

// ownHostDir is the host folder (smolvm.HostDir) this test process set
// for itself, removed by Main and CloseWarm: the host's capacity counts
// the VMs of this process's state folders, not those of test processes
// running beside it or of the machine's other users, so that a test's
// limits hold whatever else runs. A test that sets limits of its own
// sets a host folder of its own (t.Setenv(smolvm.HostDirEnv, …)).
var ownHostDir string

func init() {
	if os.Getenv(smolvm.HostDirEnv) != "" {
		return
	}
	ownHostDir = filepath.Join(os.TempDir(), fmt.Sprintf("smolvm-host-test-%d", os.Getpid()))
	if err := os.Setenv(smolvm.HostDirEnv, ownHostDir); err != nil {
		panic(err)
	}
}

// removeOwnHostDir removes the host folder this process set.
func removeOwnHostDir() {
	if ownHostDir != "" {
		_ = os.RemoveAll(ownHostDir)
	}
}
