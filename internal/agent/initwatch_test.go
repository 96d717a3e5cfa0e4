package agent

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testutil"
)

// An init step that outlasts the interval is named on the log, with how
// long it has run, until the watch is done.
func TestStepWatch(t *testing.T) {
	var out testutil.SyncBuffer
	w := watchSteps(slog.New(slog.NewTextHandler(&out, nil)), 5*time.Millisecond)
	defer w.done()
	w.enter("load kernel module /lib/modules/virtio_net.ko")
	want := `level=WARN msg="init: a step is slow" step="load kernel module /lib/modules/virtio_net.ko" for=`
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("log %q does not name the slow step: want %q", out.String(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
	w.done()
	w.done() // twice is fine
}
