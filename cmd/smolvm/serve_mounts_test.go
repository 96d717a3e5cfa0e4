package main

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServeAllowMountRefuses: an --allow-mount folder that does not exist
// stops the server before it listens, naming the flag (exit 3, invalid).
func TestServeAllowMountRefuses(t *testing.T) {
	home := t.TempDir()
	missing := filepath.Join(home, "missing")
	r := smolvmRunWithin(t, time.Minute, home, "", "serve", "--listen", "127.0.0.1:0", "--allow-mount", missing)
	if r.code != 3 || !strings.Contains(r.stderr, "--allow-mount "+missing+" does not exist") {
		t.Errorf("smolvm serve --allow-mount %s: exit %d, %q; want exit 3 naming the flag", missing, r.code, r.stderr)
	}
}
