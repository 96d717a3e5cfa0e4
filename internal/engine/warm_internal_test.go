package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// A VM of the warm snapshot's shape whose image (or smolvm) changed since
// the snapshot was made boots cold with a warning that names the fix; a VM
// of another shape boots cold without one.
func TestWarnStaleWarm(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	st, err := store.Open(ctx, home)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	h := &Host{Home: home, Store: st}
	spec := func(fingerprint string, mem int, cmdline string) *supervisor.Spec {
		return &supervisor.Spec{ImageFingerprint: fingerprint, MachineLayout: hypervisor.MachineLayout,
			Machine: hypervisor.MachineConfig{VCPUs: 1, MemoryMiB: mem, Cmdline: cmdline}}
	}
	old := spec("old-kernel-and-agent", 512, "console=ttyS0 smolvm.hostname=warm")
	name := warmKey(old)
	dir := filepath.Join(home, "snapshots", name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(old)
	if err := os.WriteFile(filepath.Join(dir, supervisor.SnapshotSpec), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := st.CreateSnapshot(ctx, &store.Snapshot{Name: name, Dir: dir}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		spec *supervisor.Spec
		warn bool
	}{
		{"new image, same shape", spec("new", 512, "console=ttyS0 smolvm.hostname=other"), true},
		{"other memory", spec("new", 1024, "console=ttyS0 smolvm.hostname=other"), false},
		{"other boot arguments", spec("new", 512, "console=ttyS0 foo=1 smolvm.hostname=other"), false},
	} {
		var logs bytes.Buffer
		h.warnStaleWarm(ctx, c.spec, slog.New(slog.NewTextHandler(&logs, nil)))
		got := strings.Contains(logs.String(), name+" is stale") && strings.Contains(logs.String(), "smolvm setup")
		if got != c.warn {
			t.Errorf("%s: warned %v, want %v (log %q)", c.name, got, c.warn, logs.String())
		}
	}
}
