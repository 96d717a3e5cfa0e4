package agent

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// An init step that outlasts the interval is named on the log, with how
// long it has run, until the watch is done.
func TestStepWatch(t *testing.T) {
	var out lockedBuffer
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
