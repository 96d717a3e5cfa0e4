package smolvm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
	"github.com/smolvm/smolvm/internal/wire"
)

// New creates a VM, boots it and returns once its agent answers. Unless
// cfg.Persistent, the VM lives in this process: Close stops and deletes it.
// A failed create leaves nothing behind.
func New(ctx context.Context, cfg Config) (*VM, error) {
	started := time.Now()
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	st, err := openStore(ctx, cfg.Home)
	if err != nil {
		return nil, err
	}
	vm, err := create(ctx, st, &cfg, started, nil)
	var we warmError
	// A supervisor that died (killed, say) is no fault of the snapshot:
	// the create fails, and says so.
	if errors.Is(err, errSupervisorDied) {
		st.Close()
		return nil, err
	}
	if errors.As(err, &we) && we.prelaunched && ctx.Err() == nil {
		// The QEMU started ahead of time failed (it died, say): restore
		// into a QEMU of this VM's own.
		cfg.Logger.Debug("restore into the prelaunched hypervisor failed; restoring into a new one", "err", we.error)
		cfg.Prelaunch = false
		vm, err = create(ctx, st, &cfg, started, nil)
	}
	if errors.As(err, &we) && ctx.Err() == nil {
		// A warm snapshot that no longer restores (say, a QEMU upgrade
		// changed the machine) must not stop anyone: boot instead.
		cfg.Logger.Warn(fmt.Sprintf("the warm snapshot did not restore; booting instead (remake it: smolvm snapshot rm %s && smolvm setup)", we.snapshot), "err", we.error)
		cfg.Cold = true
		vm, err = create(ctx, st, &cfg, started, nil)
	}
	if err != nil {
		st.Close()
		return nil, err
	}
	return vm, nil
}

// warmError is a failure to start a VM from the warm snapshot of its shape.
type warmError struct {
	error
	snapshot    string
	prelaunched bool // the restore was into a prelaunched hypervisor
}

func (e warmError) Unwrap() error { return e.error }

// create allocates a VM and starts it: a cold boot, or a restore of snap
// when it is set (or of the warm snapshot matching the VM's shape).
func create(ctx context.Context, st *store.Store, cfg *Config, started time.Time, snap *snapshotSource) (_ *VM, err error) {
	// A full state folder fails with an error that names it: what was
	// made is undone, and the database and other VMs stay as they were.
	defer func() { err = noSpace(homeOf(st), err, stateFix) }()
	log := cfg.Logger
	log.Debug("phase create: allocating state", "name", cfg.Name)
	var img *resolvedImage
	if snap != nil {
		img = snap.image
	} else if img, err = resolveImage(ctx, homeOf(st), cfg); err != nil {
		return nil, err
	} else if err = useNamedImage(ctx, st, cfg, img); err != nil {
		return nil, err
	}
	rec := &store.VM{Name: cfg.Name, State: store.StateCreating, Ephemeral: !cfg.Persistent, Image: img.name, SupervisorPID: os.Getpid(), MemoryMiB: cfg.MemoryMiB}
	if snap != nil {
		rec.Snapshot, rec.MemoryMiB = snap.name, snap.spec.Machine.MemoryMiB
	}
	capacity, err := cfg.capacity()
	if err != nil {
		return nil, err
	}
	if err := checkStateSpace(homeOf(st)); err != nil {
		return nil, err
	}
	if err := st.CreateVMWithin(ctx, rec, capacity); err != nil {
		return nil, capacityErr(err)
	}
	dir := filepath.Join(homeOf(st), "vms", rec.ID)
	undo := func(cause error) error {
		_ = os.RemoveAll(dir)
		return errors.Join(cause, st.DeleteVM(context.WithoutCancel(ctx), rec.ID))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, undo(fmt.Errorf("create state folder: %w", err))
	}
	var spec *supervisor.Spec
	var spare *supervisor.Spare // a prelaunched hypervisor, until the supervisor has it
	defer func() {
		if spare != nil {
			spare.Discard()
		}
	}()
	if snap != nil {
		spec, err = restoreSpec(ctx, st, cfg, snap, rec, dir)
	} else {
		spec, err = buildSpec(ctx, st, cfg, img, rec, dir)
		if err == nil && !cfg.Cold {
			if warm := findWarm(ctx, st, spec); warm == nil {
				warnStaleWarm(ctx, st, spec, log)
			} else {
				log.Debug("restoring the warm snapshot of this VM shape", "snapshot", warm.Name)
				rec.Snapshot = warm.Name
				spec.Restored = true
				restoreFrom(&spec.Machine, warm.Dir) // findWarm checked its memory file
				if cfg.Prelaunch && !cfg.Persistent {
					spare = takeSpare(homeOf(st), warm.Name)
				}
			}
		}
	}
	if err != nil {
		return nil, undo(err)
	}
	if spare != nil {
		// Its folder becomes the VM's; its machine is the one built for
		// this shape (same devices, sockets now in dir).
		if mc, err := spare.Claim(dir, rec.ID, cfg.ConsoleLogMaxBytes); err != nil {
			log.Debug("prelaunched hypervisor not usable; starting one", "err", err)
			spare.Discard()
			spare = nil
		} else {
			spec.Machine.Net, spec.Prelaunched = mc.Net, true
		}
	}
	if snap == nil && spec.Restored {
		// Failures from here on are the warm snapshot's: New boots instead.
		inner := undo
		undo = func(cause error) error { return warmError{inner(cause), rec.Snapshot, spec.Prelaunched} }
	}
	sj, _ := json.Marshal(spec)
	if _, err := st.UpdateVM(ctx, rec.ID, func(v *store.VM) error {
		v.Dir, v.Config, v.Snapshot = dir, sj, rec.Snapshot
		return nil
	}); err != nil {
		return nil, undo(err)
	}
	createDone := time.Now()
	log.Debug("phase create done", "vm", rec.ID, "took", createDone.Sub(started))
	if cfg.Persistent {
		if err := spawnSupervisor(ctx, cfg, homeOf(st), rec.ID, started, createDone); err != nil {
			return nil, undo(err)
		}
		vm, err := open(ctx, st, rec.ID, cfg.Logger)
		if err != nil {
			return nil, undo(err)
		}
		return vm, nil
	}
	sup, err := supervisor.Start(ctx, rec.ID, supervisor.Options{Store: st, Logger: log, Started: started, CreateDone: createDone, Spare: spare})
	spare = nil // the supervisor's now, or ended with it
	if err != nil {
		return nil, undo(err)
	}
	if cfg.Prelaunch && snap == nil && spec.Restored {
		prelaunch(homeOf(st), rec.Snapshot, spec.Driver, spec.Machine, log)
	}
	vm, err := open(ctx, st, rec.ID, cfg.Logger)
	if err != nil {
		_ = sup.Stop(context.WithoutCancel(ctx), true, 0)
		return nil, undo(err)
	}
	vm.sup, vm.owned = sup, true
	vm.agent = sup.Agent()
	return vm, nil
}

// buildSpec turns the user's config into what the supervisor runs.
func buildSpec(ctx context.Context, st *store.Store, cfg *Config, img *resolvedImage, rec *store.VM, dir string) (*supervisor.Spec, error) {
	accel, err := resolveAccel(ctx, homeOf(st), cfg, img)
	if err != nil {
		return nil, err
	}
	channel, err := resolveChannel(cfg.Channel)
	if err != nil {
		return nil, err
	}
	mc := hypervisor.MachineConfig{
		ID: rec.ID, Dir: dir, Kernel: img.kernel, Initrd: img.initrd,
		Cmdline: guestCmdline(rec.Name, accel, cfg.BootArgs, img.tuned), VCPUs: cfg.VCPUs, MemoryMiB: cfg.MemoryMiB,
		Accel: accel, Channel: channel, ConsoleLog: filepath.Join(dir, supervisor.ConsoleLog),
		ConsoleLogMaxBytes: cfg.ConsoleLogMaxBytes,
	}
	if cfg.fileMemory {
		mc.MemoryFile = filepath.Join(dir, supervisor.MemoryFile)
	}
	if err := attachDisks(ctx, st, cfg, rec, &mc); err != nil {
		return nil, err
	}
	if channel == hypervisor.ChannelVsock {
		cid, err := st.Allocate(ctx, "vsock-cid", rec.ID, 3, 1<<31)
		if err != nil {
			return nil, fmt.Errorf("allocate vsock cid: %w", err)
		}
		mc.CID = uint32(cid)
	}
	netCfg, err := buildNetwork(ctx, st, cfg, rec, &mc) // network.go
	if err != nil {
		return nil, err
	}
	return &supervisor.Spec{Driver: cfg.Hypervisor, Machine: mc, BootTimeout: cfg.BootTimeout, Hostname: rec.Name,
		Persistent: cfg.Persistent, SupervisorBinary: cfg.SupervisorBinary, ImageFingerprint: img.fingerprint,
		MachineLayout: hypervisor.MachineLayout,
		Network:       netCfg}, nil
}

func kernelCmdline(hostname string, accel hypervisor.Accel, extra string) string {
	return guestCmdline(hostname, accel, extra, false)
}

// guestCmdline is the kernel command line of a VM. The tuned kernel has no
// i8042 (PS/2) driver, so the options that keep the stock kernel's driver
// from probing for a controller microvm does not have are left out; it needs
// nothing else: its drivers are built in and find the virtio-mmio devices
// through ACPI like the stock kernel's modules do.
func guestCmdline(hostname string, accel hypervisor.Accel, extra string, tuned bool) string {
	parts := []string{"console=ttyS0", "reboot=t", "panic=-1", "quiet", "loglevel=3"}
	if !tuned {
		parts = append(parts, "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd")
	}
	// Debian zeroes every page it hands out (init_on_alloc) and runs the
	// crypto self-tests at boot: under software emulation the two cost
	// about half a second of every cold boot and buy a single-tenant
	// sandbox nothing. (The warm snapshot's boot adds init_on_free, so that
	// freed memory is zero and the snapshot small: see warmBootArgs.)
	parts = append(parts, "init_on_alloc=0", "cryptomgr.notests", wire.ParamHostname+"="+hostname)
	// An idle guest should not wake: kcompactd's proactive compaction
	// (every 500 ms) and the lockup watchdog's timer (every 4 s, for
	// lockups a sandbox has no one to report to) were most of an idle
	// guest's timer interrupts after the PIT, each a wake-up of QEMU
	// (under TCG, 0.35 → 0.08 % of a host core). Compaction on demand
	// stays.
	parts = append(parts, idleKernelArgs...)
	if !tuned {
		parts = append(parts, "nowatchdog") // the tuned kernel has no lockup detector
	}
	if accel == hypervisor.AccelTCG {
		parts = append(parts, image.TCGKernelArgs()...)
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}

// idleKernelArgs keep an idle guest's kernel from waking (see guestCmdline).
// The NIC's IPv6 sends no router solicitations: the user-mode network is
// IPv4 only, and each one (backing off from 4 s) woke the supervisor.
var idleKernelArgs = []string{"sysctl.vm.compaction_proactiveness=0", "sysctl.net.ipv6.conf.default.router_solicitations=0"}

func diskFormat(path string) string {
	if strings.HasSuffix(path, ".qcow2") {
		return "qcow2"
	}
	return "raw"
}

func resolveChannel(want string) (hypervisor.Channel, error) {
	switch hypervisor.Channel(want) {
	case hypervisor.ChannelVirtioSerial:
		return hypervisor.ChannelVirtioSerial, nil
	case hypervisor.ChannelVsock:
		if !haveVhostVsock() {
			return "", fmt.Errorf("%w: channel vsock needs /dev/vhost-vsock (modprobe vhost_vsock), or use virtio-serial", ErrUnsupported)
		}
		return hypervisor.ChannelVsock, nil
	}
	if haveVhostVsock() {
		return hypervisor.ChannelVsock, nil
	}
	return hypervisor.ChannelVirtioSerial, nil
}

func haveVhostVsock() bool {
	f, err := os.OpenFile("/dev/vhost-vsock", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// supervisorBinary finds the smolvm CLI that runs detached supervisors.
func supervisorBinary(cfg *Config) (string, error) {
	if cfg.SupervisorBinary != "" {
		return cfg.SupervisorBinary, nil
	}
	if p := os.Getenv("SMOLVM_BIN"); p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil && filepath.Base(exe) == "smolvm" {
		return exe, nil
	}
	if p, err := exec.LookPath("smolvm"); err == nil {
		return p, nil
	}
	return "", errors.New("persistent VMs need the smolvm binary: put it in PATH, set $SMOLVM_BIN or set Config.SupervisorBinary")
}

// errSupervisorDied is a supervisor process that ended before it reported
// the VM ready or why not (it was killed).
var errSupervisorDied = errors.New("supervisor exited before the VM was ready")

// spawnSupervisor starts `smolvm __supervise ID` detached from this process
// and waits until it reports the VM ready (or why not) on a pipe.
func spawnSupervisor(ctx context.Context, cfg *Config, home, id string, started, createDone time.Time) error {
	bin, err := supervisorBinary(cfg)
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	logf, err := os.OpenFile(filepath.Join(home, "vms", id, supervisor.LogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		w.Close()
		return fmt.Errorf("open supervisor log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "__supervise", id,
		"--started", started.Format(time.RFC3339Nano), "--create-done", createDone.Format(time.RFC3339Nano))
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home)
	if cfg.Logger.Enabled(ctx, slog.LevelDebug) {
		// A caller that logs its phases gets the supervisor's in its log.
		cmd.Env = append(cmd.Env, "SMOLVM_DEBUG=1")
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w} // fd 3
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start supervisor %s: %w", bin, err)
	}
	w.Close()
	pid := cmd.Process.Pid
	_ = cmd.Process.Release()
	type result struct {
		line string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		ch <- result{strings.TrimSpace(line), err}
	}()
	select {
	case res := <-ch:
		if valid, err := errdefs.ParseReady(res.line); valid {
			return err
		}
		return fmt.Errorf("%w: see %s", errSupervisorDied, filepath.Join(home, "vms", id, supervisor.LogFile))
	case <-ctx.Done():
		_ = syscall.Kill(pid, syscall.SIGKILL)
		return fmt.Errorf("create VM: %w", ctx.Err())
	}
}
