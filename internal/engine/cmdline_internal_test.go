package engine

import (
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/hypervisor"
)

// SMOLVM_BOOT_ARGS goes last on every VM's command line, after the VM's
// own arguments, so that its loglevel wins over the quiet default.
func TestBootArgsEnv(t *testing.T) {
	t.Setenv(BootArgsEnv, "")
	plain := GuestCmdline("vm", hypervisor.AccelTCG, "extra=1", false)
	if !strings.HasSuffix(plain, " extra=1") {
		t.Fatalf("command line %q: the VM's arguments are not last", plain)
	}
	t.Setenv(BootArgsEnv, " loglevel=7 smolvm.debug=1 ")
	got := GuestCmdline("vm", hypervisor.AccelTCG, "extra=1", false)
	if got != plain+" loglevel=7 smolvm.debug=1" {
		t.Errorf("with %s set: %q, want %q and the arguments", BootArgsEnv, got, plain)
	}
	if !strings.Contains(got, "quiet loglevel=3") {
		t.Errorf("command line %q: the default console settings are gone", got)
	}
}
