package main

// Tests of the bounds on what one VM can take of the host: its console
// log, copies out of it, its state folder.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testutil"
)

// consoleSize is what a VM's console log holds on disk, both of its files.
func consoleSize(t *testing.T, home, id string) int64 {
	t.Helper()
	var n int64
	for _, f := range []string{"console.log", "console.log.1"} {
		if fi, err := os.Stat(filepath.Join(home, "vms", id, f)); err == nil {
			n += fi.Size()
		}
	}
	return n
}

// flood makes the guest write n bytes of lines to its console between a
// start and an end marker, and waits until 'smolvm logs' shows the end.
func flood(t *testing.T, home, id string, n int) string {
	t.Helper()
	script := fmt.Sprintf("echo FLOOD-START > /dev/console; yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde | head -c %d > /dev/console; echo FLOOD-END > /dev/console", n)
	mustOK(t, home, "", "exec", id, "--", "sh", "-c", script)
	var out string
	if err := testutil.Poll(3*time.Minute, func() bool {
		out = smolvmRun(t, home, "", "logs", id).stdout
		return strings.Contains(out, "FLOOD-END")
	}); err != nil {
		t.Fatalf("the console's last line never reached the log: %v", err)
	}
	return out
}

// TestConsoleLogBounded: a guest that floods its console leaves at most
// the console log's bound on the host (1 MiB unless --console-log-size
// says otherwise), the newest part; 'smolvm logs -f' following the whole
// flood sees all of it; the guest keeps working. Before the bound,
// console.log grew by all the guest wrote.
func TestConsoleLogBounded(t *testing.T) {
	home := testutil.Home(t)
	id := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "flood").stdout)

	t.Run("Default", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		follow := exec.CommandContext(ctx, testutil.Binary(t), "logs", "-f", id)
		follow.Env = append(os.Environ(), "SMOLVM_HOME="+home)
		var followed testutil.SyncBuffer
		follow.Stdout = &followed
		if err := follow.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cancel(); _ = follow.Wait() }()

		out := flood(t, home, id, 5<<19) // 2.5 MiB
		if n := consoleSize(t, home, id); n > 1<<20 {
			t.Errorf("console log holds %d bytes after a 2.5 MiB flood, want at most 1 MiB", n)
		}
		if len(out) > 1<<20 || strings.Contains(out, "FLOOD-START") {
			t.Errorf("logs printed %d bytes (start marker kept: %v); want the newest 1 MiB at most",
				len(out), strings.Contains(out, "FLOOD-START"))
		}
		if err := testutil.Poll(time.Minute, func() bool { return strings.Contains(followed.String(), "FLOOD-END") }); err != nil {
			t.Fatalf("logs -f never printed the end of the flood: %v", err)
		}
		if got := followed.String(); !strings.Contains(got, "FLOOD-START") || len(got) < 5<<19 {
			t.Errorf("logs -f printed %d bytes (start marker: %v); want all of the 2.5 MiB flood",
				len(got), strings.Contains(got, "FLOOD-START"))
		}
		if r := mustOK(t, home, "", "exec", id, "--", "echo", "alive"); r.stdout != "alive\n" {
			t.Errorf("after the flood the guest answered %q", r.stdout)
		}
	})

	t.Run("Flag", func(t *testing.T) {
		small := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "small", "--console-log-size", "64K").stdout)
		flood(t, home, small, 256<<10)
		if n := consoleSize(t, home, small); n > 64<<10 {
			t.Errorf("console log of a VM made with --console-log-size 64K holds %d bytes", n)
		}
		if r := smolvmRun(t, home, "", "create", "--console-log-size", "1K"); r.code != 3 || !strings.Contains(r.stderr, "at least") {
			t.Errorf("create --console-log-size 1K: exit %d, %q; want exit 3 naming the least size", r.code, r.stderr)
		}
	})
}
