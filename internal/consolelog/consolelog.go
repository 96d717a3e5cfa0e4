// Package consolelog keeps a guest's serial console on the host within a
// size bound: the newest bytes are kept, the oldest dropped. The log is two
// files, path (being written) and path.1 (the half before it): when path
// reaches half the bound it replaces path.1 and a new path starts, so the
// two together never hold more than the bound. Readers see both, oldest
// first.
package consolelog

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultMaxBytes bounds a console log unless told otherwise: 1 MiB.
const DefaultMaxBytes = 1 << 20

// MinMaxBytes is the smallest bound a log accepts (a boot's messages fit).
const MinMaxBytes = 16 << 10

// Old is the suffix of the older half of a log.
const Old = ".1"

// Log is a console log being written. Writes never fail and never block
// on anything but the file system: what cannot be written (a full disk) is
// dropped, so the guest's console is drained whatever happens on the host.
type Log struct {
	mu      sync.Mutex
	path    string
	half    int64
	f       *os.File
	size    int64
	lastErr string // the last write error logged, so a full disk logs once
}

// Open starts writing the log at path, after what it holds already (a VM
// that boots again keeps its earlier console). limit bounds both files
// together; 0 means DefaultMaxBytes, and below MinMaxBytes is raised to it.
func Open(path string, limit int64) (*Log, error) {
	l := &Log{path: path, half: half(limit)}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open console log: %w", err)
	}
	l.f, l.size = f, fi.Size()
	return l, nil
}

// half is what one of a log's two files holds at most.
func half(limit int64) int64 {
	if limit == 0 {
		limit = DefaultMaxBytes
	}
	return max(limit, MinMaxBytes) / 2
}

// Move tells the log that its file is at path now (its folder was
// renamed; the open file stays valid, rotation uses the new path) and
// that it keeps at most limit bytes from now on.
func (l *Log) Move(path string, limit int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.path, l.half = path, half(limit)
}

// Write appends p, rotating as needed. It always reports success.
func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		if l.size >= l.half || l.f == nil {
			l.rotate()
		}
		k := int(min(int64(len(p)), l.half-l.size))
		if l.f != nil {
			if _, err := l.f.Write(p[:k]); err != nil {
				l.report(err)
			} else {
				l.lastErr = ""
			}
		}
		// Counted even when dropped: the next rotation frees the older
		// half, which is what a full disk needs.
		l.size += int64(k)
		p = p[k:]
	}
	return n, nil
}

// rotate makes the current file the older half and starts a new one.
func (l *Log) rotate() {
	if l.f != nil {
		_ = l.f.Close()
		l.f = nil
		if err := os.Rename(l.path, l.path+Old); err != nil && !errors.Is(err, os.ErrNotExist) {
			l.report(err)
		}
	}
	l.size = 0
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		l.report(err)
		return
	}
	l.f = f
}

func (l *Log) report(err error) {
	if s := err.Error(); s != l.lastErr {
		l.lastErr = s
		slog.Warn("console log: output dropped", "path", l.path, "err", err)
	}
}

// Close closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}

// drainPause is how long Drain lets output gather after a short read.
// An emulated serial port hands over one byte at a time: read as it comes,
// a flood of 2.5 MiB cost the reader 10 s of CPU (a wakeup, a read and a
// write per byte); with the pause, reads take what came in the meantime
// (a socket holds far more than a serial line sends in 20 ms, so the
// guest is never held up) and the reader's cost is a rounding error.
const drainPause = 20 * time.Millisecond

// Drain copies r into the log until r ends (the hypervisor closed its
// side), then closes the log.
func (l *Log) Drain(r io.Reader) {
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			_, _ = l.Write(buf[:n])
		}
		if err != nil {
			break
		}
		if n < len(buf)/2 {
			time.Sleep(drainPause)
		}
	}
	_ = l.Close()
}

// Remove deletes both files of the log at path.
func Remove(path string) {
	_ = os.Remove(path + Old)
	_ = os.Remove(path)
}

// Copy writes the whole log at path to w, oldest first. A log that does
// not exist is an error.
func Copy(w io.Writer, path string) error {
	if err := copyOld(w, path); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// copyOld writes the older half of the log at path to w, if there is one.
func copyOld(w io.Writer, path string) error {
	old, err := os.Open(path + Old)
	if err != nil {
		return nil
	}
	defer old.Close()
	_, err = io.Copy(w, old)
	return err
}

// Tail returns the last n lines of the log at path (of its last 64 KiB at
// most), or a note saying why there are none.
func Tail(path string, n int) string {
	const window = 64 << 10
	var buf bytes.Buffer
	for _, p := range []string{path + Old, path} {
		f, err := os.Open(p)
		if err != nil {
			if p == path && buf.Len() == 0 {
				return "(no console output: " + err.Error() + ")"
			}
			continue
		}
		if fi, err := f.Stat(); err == nil && fi.Size() > window {
			_, _ = f.Seek(fi.Size()-window, io.SeekStart)
		}
		_, _ = io.Copy(&buf, f)
		f.Close()
	}
	b := buf.Bytes()
	if len(b) > window {
		b = b[len(b)-window:]
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, window), window)
	for sc.Scan() {
		lines = append(lines, strings.TrimRight(sc.Text(), "\r"))
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	if len(lines) == 0 {
		return "(console is empty)"
	}
	return "  " + strings.Join(lines, "\n  ")
}

// Follow writes the log at path to w, oldest first, then what is added to
// it, across rotations, every interval until ctx ends or more reports
// false (checked after each round, so the last output is written).
func Follow(ctx context.Context, w io.Writer, path string, interval time.Duration, more func() bool) error {
	if err := copyOld(w, path); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { f.Close() }()
	for {
		if _, err := io.Copy(w, f); err != nil {
			return err
		}
		// Rotated: the open file is the older half now; its rest is
		// written above and again here, then the new file from its start.
		if rotated(f, path) {
			if _, err := io.Copy(w, f); err != nil {
				return err
			}
			if nf, err := os.Open(path); err == nil {
				f.Close()
				f = nf
				continue
			}
		}
		if !more() {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}

// rotated reports whether path names another file than f now.
func rotated(f *os.File, path string) bool {
	a, err1 := f.Stat()
	b, err2 := os.Stat(path)
	if err1 != nil || err2 != nil {
		return false
	}
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Ino != sb.Ino
}
