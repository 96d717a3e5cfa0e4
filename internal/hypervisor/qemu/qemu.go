// Package qemu is the QEMU driver: x86_64 `-M microvm` machines, one QEMU
// process each, controlled through QMP and sandboxed with seccomp.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"github.com/mdlayher/vsock"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
)

// Binary is the QEMU system emulator the driver runs.
const Binary = "qemu-system-x86_64"

// Driver starts QEMU microVMs.
type Driver struct {
	// Path of the QEMU binary; empty means look up Binary in PATH.
	Path string
}

var _ hypervisor.Driver = (*Driver)(nil)
var _ hypervisor.Machine = (*Machine)(nil)

// Name is the driver's name in the registry.
const Name = "qemu"

func init() { hypervisor.Register(Name, &Driver{}) }

// Layout is where a QEMU snapshot keeps what: the migration stream (device
// state, and memory unless the machine's memory was a file), the memory
// file, and each writable disk's frozen qcow2 overlay.
var Layout = hypervisor.SnapshotLayout{State: "memory", Memory: "ram", DiskPattern: "disk%d.qcow2"}

// Capabilities implements hypervisor.Driver.
func (d *Driver) Capabilities() hypervisor.Capabilities {
	return hypervisor.Capabilities{
		Accels:        []hypervisor.Accel{hypervisor.AccelKVM, hypervisor.AccelTCG},
		Channels:      []hypervisor.Channel{hypervisor.ChannelVirtioSerial, hypervisor.ChannelVsock},
		Pause:         true,
		Snapshot:      true,
		Prelaunch:     true,
		MemoryFile:    true,
		TAP:           true,
		UserLink:      hypervisor.LinkStream, // -netdev stream
		DiskFormats:   []string{"raw", "qcow2"},
		OverlayFormat: "qcow2",
	}
}

// SnapshotLayout implements hypervisor.Driver.
func (d *Driver) SnapshotLayout() hypervisor.SnapshotLayout { return Layout }

// CacheKey implements hypervisor.Driver: the QEMU binary's path, not its
// -version output: running it would add a process start (10–60 ms) to
// every create on a host with /dev/kvm; an upgrade replaces the file,
// which the caller's key notices by the file's identity.
func (d *Driver) CacheKey() string {
	p, _ := d.binary()
	return p
}

func (d *Driver) binary() (string, error) {
	if d.Path != "" {
		return d.Path, nil
	}
	p, err := exec.LookPath(Binary)
	if err != nil {
		return "", fmt.Errorf("%s not found: run 'smolvm setup' (or apt-get install qemu-system-x86)", Binary)
	}
	return p, nil
}

// Check implements hypervisor.Driver.
func (d *Driver) Check(ctx context.Context) error {
	_, err := Version(ctx, d.Path)
	return err
}

var versionRE = regexp.MustCompile(`version (\d+\.\d+(\.\d+)?)`)

// Version returns QEMU's version, e.g. "7.2.0".
func Version(ctx context.Context, path string) (string, error) {
	d := Driver{Path: path}
	bin, err := d.binary()
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, bin, "-version").Output()
	if err != nil {
		return "", fmt.Errorf("run %s -version: %w", bin, err)
	}
	return parseVersion(string(out))
}

func parseVersion(out string) (string, error) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("cannot read QEMU version from %q", strings.TrimSpace(out))
	}
	return m[1], nil
}

// Start implements hypervisor.Driver.
func (d *Driver) Start(ctx context.Context, cfg *hypervisor.MachineConfig) (hypervisor.Machine, error) {
	m, err := d.launch(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if cfg.Restore != nil {
		if err := m.Restore(ctx, cfg.Dir); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Prelaunch implements hypervisor.Driver: QEMU is started for the restore
// of cfg.Restore (its memory file mapped, its devices built) and waits for
// Restore to load the snapshot's device state.
func (d *Driver) Prelaunch(ctx context.Context, cfg *hypervisor.MachineConfig) (hypervisor.Machine, error) {
	if cfg.Restore == nil {
		return nil, fmt.Errorf("%w: prelaunch: the machine config names no snapshot to restore", errdefs.ErrInvalid)
	}
	return d.launch(ctx, cfg)
}

// launch starts QEMU and returns once QMP answers; a restore is left
// waiting for its migration stream (-incoming defer).
func (d *Driver) launch(ctx context.Context, cfg *hypervisor.MachineConfig) (*Machine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Restore != nil && cfg.MemoryFile != "" {
		return nil, fmt.Errorf("%w: machine config: a restored machine's memory is its snapshot's, not a memory file", errdefs.ErrInvalid)
	}
	bin, err := d.binary()
	if err != nil {
		return nil, err
	}
	if len(filepath.Join(cfg.Dir, qmpSocket)) > 100 {
		return nil, fmt.Errorf("state folder path %q is too long for unix sockets: set SMOLVM_HOME to a shorter path", cfg.Dir)
	}
	for _, s := range []string{qmpSocket, agentSocket, fastSocket} {
		_ = os.Remove(filepath.Join(cfg.Dir, s))
	}
	cmd := exec.Command(bin, buildArgs(cfg, cfg.Dir)...)
	cmd.Dir = cfg.Dir
	stderr := &limitedWriter{max: 16 << 10}
	cmd.Stderr = stderr
	// QEMU dies with the process that started it (the supervisor), so a
	// crashed supervisor never leaves an orphaned guest behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	var memory *os.File
	if cfg.Restore != nil {
		memory, err = os.Open(Layout.StatePath(cfg.Restore.Dir))
		if err != nil {
			return nil, fmt.Errorf("open snapshot memory: %w", err)
		}
		defer memory.Close()
	}
	console, qemuEnd, err := startConsole(cfg)
	if err != nil {
		return nil, err
	}
	// fd 3 = incomingFD when restoring; the console's socket last.
	cmd.ExtraFiles = append(extraFiles(cfg, memory), qemuEnd)
	started := time.Now()
	jl, err := jailFor(cfg, jailHost())
	if err != nil {
		qemuEnd.Close()
		console.stop()
		return nil, err
	}
	var release func()
	if jl != nil {
		release, err = jl.Start(cmd)
	} else {
		err = cmd.Start()
	}
	qemuEnd.Close()
	if err != nil {
		console.stop()
		if jl != nil && jl.Cgroup != nil {
			_ = jail.RemoveRecordedCgroup(cfg.Dir)
		}
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	forked := time.Since(started) // with a jail: its setup too
	m := &Machine{cfg: *cfg, cmd: cmd, done: make(chan struct{}), stderr: stderr, release: release, jailed: jl != nil, console: console}
	m.info = hypervisor.Info{Driver: Name, Accel: cfg.Accel, Channel: cfg.Channel}
	go console.drain()
	go m.wait()

	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := hypervisor.WaitSocket(qctx, filepath.Join(cfg.Dir, qmpSocket), m.done)
	if err == nil {
		c.Close()
		m.mon, err = qmp.NewSocketMonitor("unix", filepath.Join(cfg.Dir, qmpSocket), 10*time.Second)
		if err == nil {
			err = m.mon.Connect()
		}
	}
	if err != nil {
		_ = m.Kill()
		return nil, fmt.Errorf("start qemu: %w%s", err, m.stderrTail())
	}
	// Shared file memory stays out of snapshots: set on every machine, so
	// that all migration streams have one format (a restore must read a
	// stream with the capabilities it was written with).
	err = m.run("migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
		{"capability": "x-ignore-shared", "state": true},
	}}, nil)
	if err != nil {
		_ = m.Kill()
		return nil, fmt.Errorf("start qemu: %w%s", err, m.stderrTail())
	}
	slog.Debug("qemu started", "took", time.Since(started), "fork", forked, "jailed", jl != nil)
	return m, nil
}

// Move implements hypervisor.Machine.
func (m *Machine) Move(dir string, consoleLogMaxBytes int64) {
	m.dirMu.Lock()
	m.cfg.Dir, m.cfg.ConsoleLogMaxBytes = dir, consoleLogMaxBytes
	if m.cfg.ConsoleLog != "" {
		m.cfg.ConsoleLog = filepath.Join(dir, filepath.Base(m.cfg.ConsoleLog))
		m.console.log.Move(m.cfg.ConsoleLog, consoleLogMaxBytes)
	}
	m.dirMu.Unlock()
}

// Restore implements hypervisor.Machine: it loads the snapshot the
// machine was started for and lets the guest run. dir is the machine's
// state folder now (a prelaunched machine's folder moves to its VM's).
func (m *Machine) Restore(ctx context.Context, dir string) error {
	t0 := time.Now()
	if m.Dir() != dir {
		m.Move(dir, m.cfg.ConsoleLogMaxBytes)
	}
	err := m.run("migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(incomingFD)}, nil)
	if err == nil {
		err = m.waitIncoming(ctx)
	}
	if err != nil {
		_ = m.Kill()
		return fmt.Errorf("restore snapshot: %w%s", err, m.stderrTail())
	}
	slog.Debug("qemu restored the snapshot", "took", time.Since(t0))
	return nil
}

// Machine is one QEMU process.
type Machine struct {
	cfg    hypervisor.MachineConfig
	dirMu  sync.Mutex // guards cfg.Dir, which Move changes
	cmd    *exec.Cmd
	mon    *qmp.SocketMonitor
	monMu  sync.Mutex
	info   hypervisor.Info
	done   chan struct{}
	err    error
	stderr *limitedWriter
	// release ends the thread that started a jailed QEMU; jailed says
	// the machine has a jail (and maybe a cgroup to remove).
	release func()
	jailed  bool
	console *console
}

func (m *Machine) wait() {
	err := m.cmd.Wait()
	if err != nil {
		m.err = fmt.Errorf("qemu exited: %w%s", err, m.stderrTail())
	}
	if m.release != nil {
		m.release()
	}
	if m.jailed {
		if err := jail.RemoveRecordedCgroup(m.Dir()); err != nil {
			slog.Warn("remove the machine's cgroup", "err", err)
		}
	}
	// The guest's last words are in the log before anyone learns that
	// the machine is gone (a failed boot quotes them).
	// (A write end held elsewhere keeps the reader waiting for more:
	// then it ends when that closes.)
	select {
	case <-m.console.done:
	case <-time.After(2 * time.Second):
	}
	close(m.done)
}

// Dir is the machine's state folder now.
func (m *Machine) Dir() string {
	m.dirMu.Lock()
	defer m.dirMu.Unlock()
	return m.cfg.Dir
}

// jailHost is what this host allows for jailing QEMU; it is detected
// again until the jail user exists (setup may create it meanwhile).
func jailHost() *jail.Host {
	hostMu.Lock()
	defer hostMu.Unlock()
	if host == nil || !host.Usable() {
		h := jail.Detect()
		host = &h
	}
	return host
}

var (
	hostMu sync.Mutex
	host   *jail.Host
)

func (m *Machine) stderrTail() string {
	s := strings.TrimSpace(m.stderr.String())
	if s == "" {
		return ""
	}
	return ": " + s
}

// PID implements hypervisor.Machine.
func (m *Machine) PID() int { return m.cmd.Process.Pid }

// Done implements hypervisor.Machine.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Err implements hypervisor.Machine.
func (m *Machine) Err() error {
	<-m.done
	return m.err
}

// Info implements hypervisor.Machine.
func (m *Machine) Info() hypervisor.Info { return m.info }

// Kill implements hypervisor.Machine.
func (m *Machine) Kill() error {
	select {
	case <-m.done:
	default:
		_ = m.cmd.Process.Kill()
		<-m.done
	}
	if m.mon != nil {
		_ = m.mon.Disconnect()
	}
	for _, s := range []string{qmpSocket, agentSocket, fastSocket} {
		_ = os.Remove(filepath.Join(m.Dir(), s))
	}
	return nil
}

// DialAgent implements hypervisor.Machine.
func (m *Machine) DialAgent(ctx context.Context) (net.Conn, error) {
	if m.cfg.Channel == hypervisor.ChannelVsock {
		return vsock.Dial(m.cfg.CID, hypervisor.AgentVsockPort, nil)
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", filepath.Join(m.Dir(), agentSocket))
}

// DialFast implements hypervisor.Machine.
func (m *Machine) DialFast(ctx context.Context) (net.Conn, error) {
	if m.cfg.Channel == hypervisor.ChannelVsock {
		return vsock.Dial(m.cfg.CID, hypervisor.FastVsockPort, nil)
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", filepath.Join(m.Dir(), fastSocket))
}

// run executes one QMP command and decodes its "return" into out (may be nil).
func (m *Machine) run(cmd string, args any, out any) error {
	return m.runWithFile(cmd, args, nil, out)
}

func (m *Machine) runWithFile(cmd string, args any, f *os.File, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	m.monMu.Lock()
	defer m.monMu.Unlock()
	var raw []byte
	if f != nil {
		raw, err = m.mon.RunWithFile(b, f)
	} else {
		raw, err = m.mon.Run(b)
	}
	if err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	if out == nil {
		return nil
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return fmt.Errorf("qmp %s: decode reply: %w", cmd, err)
	}
	return json.Unmarshal(resp.Return, out)
}

// Pause implements hypervisor.Machine.
func (m *Machine) Pause(ctx context.Context) error { return m.run("stop", nil, nil) }

// Resume implements hypervisor.Machine.
func (m *Machine) Resume(ctx context.Context) error { return m.run("cont", nil, nil) }

// Quit asks QEMU to exit at once.
func (m *Machine) Quit() error { return m.run("quit", nil, nil) }

type migrateStatus struct {
	Status      string `json:"status"`
	ErrorDesc   string `json:"error-desc"`
	TotalTimeMS int64  `json:"total-time"`
	RAM         struct {
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
}

// Snapshot implements hypervisor.Machine: the guest is paused and its
// device state, and its memory unless that is a file, written into the
// folder through a migration stream (Layout.State); a memory file is then
// saved beside it as it stands (Layout.Memory, see saveMemory).
func (m *Machine) Snapshot(ctx context.Context, dir string, final bool) error {
	if err := m.migrate(ctx, dir); err != nil {
		return err
	}
	if mem, shared := guestMemory(&m.cfg); shared {
		// The migration stream left the memory file out: it is the
		// snapshot's memory as it stands (paused).
		return saveMemory(ctx, mem, Layout.MemoryPath(dir), final)
	}
	return nil
}

// migrate pauses the guest and writes its migration stream into dir.
func (m *Machine) migrate(ctx context.Context, dir string) error {
	if err := m.run("stop", nil, nil); err != nil {
		return err
	}
	f, err := os.OpenFile(Layout.StatePath(dir), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("create snapshot memory file: %w", err)
	}
	defer f.Close()
	if err := m.runWithFile("getfd", map[string]any{"fdname": "snapshot"}, f, nil); err != nil {
		return err
	}
	if err := m.run("migrate", map[string]any{"uri": "fd:snapshot"}, nil); err != nil {
		return err
	}
	for {
		var st migrateStatus
		if err := m.run("query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return f.Sync()
		case "failed", "cancelled":
			return fmt.Errorf("snapshot failed: %s", st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			_ = m.run("migrate_cancel", nil, nil)
			return ctx.Err()
		case <-m.done:
			return errors.New("snapshot failed: qemu exited")
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitIncoming waits until a restored machine has loaded its state, then
// lets it run.
func (m *Machine) waitIncoming(ctx context.Context) error {
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := m.run("query-status", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "paused", "postmigrate", "prelaunch":
			return m.run("cont", nil, nil)
		case "running":
			return nil
		case "inmigrate":
		default:
			return fmt.Errorf("restore snapshot: unexpected machine state %q", st.Status)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("restore snapshot: %w", ctx.Err())
		case <-m.done:
			return fmt.Errorf("restore snapshot: %w", m.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

type limitedWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (w *limitedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func (w *limitedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if room := w.max - w.buf.Len(); room > 0 {
		if len(p) > room {
			w.buf.Write(p[:room])
		} else {
			w.buf.Write(p)
		}
	}
	return len(p), nil
}
