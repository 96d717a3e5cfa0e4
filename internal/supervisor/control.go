package supervisor

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
)

// control serves the supervisor's own API on the VM's socket.
type control struct {
	controlpb.UnimplementedControlServer
	s *Supervisor
}

func (c *control) Status(ctx context.Context, _ *controlpb.StatusRequest) (*controlpb.StatusResponse, error) {
	s := c.s
	info := s.machine.Info()
	state := "running"
	s.mu.Lock()
	switch {
	case s.stopping:
		state = "stopping"
	case s.paused:
		state = "paused"
	}
	s.mu.Unlock()
	return &controlpb.StatusResponse{
		Id: s.id, State: state,
		SupervisorPid: int32(os.Getpid()), HypervisorPid: int32(s.machine.PID()),
		Accel: string(info.Accel), Channel: string(info.Channel),
	}, nil
}

func (c *control) Stop(ctx context.Context, req *controlpb.StopRequest) (*controlpb.StopResponse, error) {
	c.s.stopMachine(ctx, req.Force, time.Duration(req.TimeoutMs)*time.Millisecond)
	return &controlpb.StopResponse{}, nil
}

func (c *control) Pause(ctx context.Context, _ *controlpb.PauseRequest) (*controlpb.PauseResponse, error) {
	if err := c.s.setPaused(ctx, true); err != nil {
		return nil, err
	}
	return &controlpb.PauseResponse{}, nil
}

func (c *control) Resume(ctx context.Context, _ *controlpb.ResumeRequest) (*controlpb.ResumeResponse, error) {
	if err := c.s.setPaused(ctx, false); err != nil {
		return nil, err
	}
	return &controlpb.ResumeResponse{}, nil
}

// setPaused freezes or thaws the machine's vCPUs and records the state.
func (s *Supervisor) setPaused(ctx context.Context, pause bool) error {
	if !s.caps.Pause {
		return fmt.Errorf("pause: %w", hypervisor.ErrUnsupported)
	}
	p := s.machine
	s.mu.Lock()
	stopping := s.stopping
	s.mu.Unlock()
	if stopping {
		return fmt.Errorf("%w: VM is stopping", errdefs.ErrNotRunning)
	}
	state := store.StateRunning
	if pause {
		state = store.StatePaused
		if err := p.Pause(ctx); err != nil {
			return fmt.Errorf("pause: %w", err)
		}
	} else if err := p.Resume(ctx); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	s.mu.Lock()
	s.paused = pause
	s.mu.Unlock()
	_, err := s.st.UpdateVM(context.WithoutCancel(ctx), s.id, func(v *store.VM) error { v.State = state; return nil })
	return err
}

// Paused tells whether the machine is paused (Control.Pause).
func (s *Supervisor) Paused() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.paused
}

// errPaused is the error of a call that needs the guest while it is
// paused: at once, rather than a wait for the frozen guest.
func (s *Supervisor) errPaused() error {
	name := s.spec.Hostname
	if name == "" {
		name = s.id
	}
	return fmt.Errorf("%w: VM %s is paused: resume it first with 'smolvm resume %s'", errdefs.ErrNotRunning, name, name)
}

// refreshRequest is what makes a restored guest a machine of its own:
// fresh entropy, the host's clock, its hostname and a new machine id.
func refreshRequest(hostname string) (*agentpb.RefreshRequest, error) {
	entropy := make([]byte, 64)
	if _, err := rand.Read(entropy); err != nil {
		return nil, err
	}
	mid := make([]byte, 16)
	if _, err := rand.Read(mid); err != nil {
		return nil, err
	}
	return &agentpb.RefreshRequest{
		Entropy:    entropy,
		TimeUnixNs: time.Now().UnixNano(),
		Hostname:   hostname,
		MachineId:  fmt.Sprintf("%x", mid),
	}, nil
}

// panicMarker starts the line a Linux kernel prints when it panics.
const panicMarker = "Kernel panic - not syncing: "

// consoleSize is the size of a console log: where the output of a boot
// that appends to it starts.
func consoleSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// GuestPanic returns the reason the guest kernel gave for panicking
// ("Kernel panic - not syncing: REASON"), from what the console log got
// after offset from, or "" when it did not panic. The console is the
// guest's: only its last 256 KiB are read, and the reason is cut to 200
// bytes of printable text.
func GuestPanic(path string, from int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	size := fi.Size()
	if from > size { // not the file of that boot
		from = 0
	}
	start := max(from, size-256<<10)
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		return ""
	}
	sc := bufio.NewScanner(io.LimitReader(f, size-start))
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for sc.Scan() {
		line := sc.Text()
		i := strings.Index(line, panicMarker)
		if i < 0 || strings.HasSuffix(line[:i], "end ") {
			continue // "---[ end Kernel panic - not syncing: … ]---" repeats it
		}
		return printable(line[i+len(panicMarker):], 200)
	}
	return ""
}

// printable is s without control characters or invalid UTF-8, trimmed and
// cut to at most n bytes.
func printable(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, strings.TrimSpace(s))
	for len(s) > n {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}

// ConsoleTail returns the last n lines of a console log.
func ConsoleTail(path string, n int) string { return consolelog.Tail(path, n) }
