package network

import (
	"bytes"
	"errors"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/time/rate"
)

// A flood of denied packets logs a bounded number of lines, and the next
// line logged counts the ones dropped.
func TestDenyLogBounded(t *testing.T) {
	var buf bytes.Buffer
	d := newDenyLog(slog.New(slog.NewTextHandler(&buf, nil)))
	dst := netip.MustParseAddr("192.0.2.1")
	const flood = 5000
	for range flood {
		d.denied("udp", dst, 53, errors.New("not allowed"))
	}
	lines := strings.Count(buf.String(), "egress denied")
	if lines < 1 || lines > 100 {
		t.Fatalf("%d packets logged %d lines; want between 1 and 100", flood, lines)
	}
	if !strings.Contains(buf.String(), "dst=192.0.2.1:53") {
		t.Fatalf("log does not name the destination:\n%s", buf.String())
	}
	buf.Reset()
	d.limit = rate.NewLimiter(rate.Inf, 1)
	d.denied("tcp", dst, 80, errors.New("not allowed"))
	want := "suppressed=" + strconv.Itoa(flood-lines)
	if !strings.Contains(buf.String(), want) {
		t.Fatalf("next line = %q; want it to say %s", buf.String(), want)
	}
}
