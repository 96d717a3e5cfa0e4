package agent

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/fuzzseed"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// FuzzPutArchive extracts arbitrary bytes as a PutArchive tar stream next
// to a folder it must not touch: whatever the stream holds, nothing is
// written outside the target (setuid bits are the host's to give here).
func FuzzPutArchive(f *testing.F) {
	for _, b := range fuzzseed.Tars() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if hasSparse(data) {
			// The agent writes a sparse file's holes as zeros, as many as
			// the host's archive claims: what the host asked for.
			t.Skip("a sparse file")
		}
		base, target := fuzzseed.TarTree(t)
		_, _ = extractInto(bytes.NewReader(data), target)
		fuzzseed.CheckTarTree(t, base, true)
	})
}

func hasSparse(data []byte) bool {
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err != nil {
			return false
		}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "GNU.sparse.") {
				return true
			}
		}
	}
}

// FuzzCleanPath: a path from the host is refused, or absolute, clean and
// free of NUL bytes.
func FuzzCleanPath(f *testing.F) {
	for _, p := range []string{"/", "/tmp/x", "relative", "", "/a/../../b", "/a\x00b", "//a//b/./"} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p string) {
		c, err := cleanPath(p)
		if err != nil {
			return
		}
		if !filepath.IsAbs(c) || filepath.Clean(c) != c || strings.ContainsRune(c, 0) {
			t.Fatalf("cleanPath(%q) = %q", p, c)
		}
	})
}

// laneServer is an agent whose files are in a folder of the test's.
func laneServer(t *testing.T) *Server {
	dir := t.TempDir()
	s, err := NewServer(Config{
		EnvFile:       filepath.Join(dir, "env"),
		ProfileFile:   filepath.Join(dir, "profile"),
		MachineIDFile: filepath.Join(dir, "machine-id"),
		DefaultDir:    dir,
		Logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		Reaper:        testReaper,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// defang rewrites the calls in frames that would change the machine the
// fuzzer runs on: a run runs /bin/true whatever it asked for (its other
// fields stay), and a refresh keeps only what is refused or harmless
// (never the clock, the hostname or entropy that would be accepted).
// Bytes that do not parse as frames are kept as they are.
func defang(data []byte) []byte {
	var out []byte
	r := bytes.NewReader(data)
	for r.Len() > 0 {
		rest := data[len(data)-r.Len():]
		f, err := lane.Read(r, nil)
		if err != nil {
			return append(out, rest...)
		}
		switch f.Type {
		case lane.TypeRun:
			var m agentpb.ExecStart
			if proto.Unmarshal(f.Payload, &m) == nil {
				m.Argv, m.Shell = []string{"/bin/true"}, ""
				m.Env = slices.DeleteFunc(m.Env, func(e string) bool { return strings.HasPrefix(e, "LD_") })
				f.Payload, _ = proto.Marshal(&m)
			}
		case lane.TypeRefresh:
			var m agentpb.RefreshRequest
			if proto.Unmarshal(f.Payload, &m) == nil {
				if validHostname(m.Hostname) {
					m.Hostname = ""
				}
				if len(m.Entropy) <= maxEntropy {
					m.Entropy = nil
				}
				m.TimeUnixNs = 0
				f.Payload, _ = proto.Marshal(&m)
			}
		}
		out = append(out, header(f)...)
		out = append(out, f.Payload...)
	}
	return out
}

func header(f lane.Frame) []byte {
	h := binary.BigEndian.AppendUint32(nil, uint32(len(f.Payload)))
	h = binary.BigEndian.AppendUint32(h, f.ID)
	return append(h, f.Type)
}

// FuzzServeLane sends the agent's fast lane arbitrary frames (defanged,
// see defang) and hangs up: the agent answers with well-formed frames
// only, never panics, and ends the connection once the host has.
func FuzzServeLane(f *testing.F) {
	for _, b := range fuzzseed.LaneRequests() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := laneServer(t)
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		conns := make([]net.Conn, 2)
		for i, fd := range fds {
			f := os.NewFile(uintptr(fd), "lane")
			conns[i], err = net.FileConn(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
		}
		host, guest := conns[0].(*net.UnixConn), conns[1]
		defer host.Close()
		served := make(chan error, 1)
		go func() { served <- s.ServeLane(guest) }()
		go func() {
			_, _ = host.Write(defang(data))
			_ = host.CloseWrite()
		}()
		_ = host.SetReadDeadline(time.Now().Add(time.Minute))
		for {
			_, err := lane.Read(host, nil)
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("reply from the agent: %v", err)
				}
				break
			}
		}
		select {
		case err := <-served:
			t.Logf("ServeLane ended: %v", err)
		case <-time.After(time.Minute):
			t.Fatal("ServeLane still runs after the host hung up")
		}
	})
}

// TestAckPastTheWindow: an ack of more than the window (up to the largest
// int64) fills the window; it must not wrap the credit around to a
// negative number, which stalled the run for good.
func TestAckPastTheWindow(t *testing.T) {
	c := newCollector(t.Context(), &agentpb.ExecStart{Stream: true}, func(*agentpb.RunOutput) error { return nil })
	defer c.stop()
	c.spend(10)
	c.ack(math.MaxInt64, false)
	done := make(chan bool, 1)
	go func() { done <- c.window() }()
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("the output was abandoned")
		}
	case <-time.After(time.Minute):
		t.Fatalf("a run waits for its window after an ack of MaxInt64 (credit %d)", c.credit)
	}
}
