// Package bench measures what a user of smolvm waits for, phase by phase,
// as the seed's benchmark does: create, launch, first command, warm
// command, stop + delete, and create → first command. It is `smolvm
// bench`, and a client of the smolvm package like any other program: it
// makes its VMs through a smolvm.Host (only the soak's leak check reaches
// inside the module, to internal/leaks).
//
// Every VM it makes is named with a prefix private to the run and is
// deleted before Run returns, also when ctx is cancelled or a step fails.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/smolvm/smolvm"
)

// The modes Run knows.
const (
	ModeCold    = "cold"    // stock kernel, cold boot
	ModeRestore = "restore" // restore of the warm snapshot made by Setup
	ModeTuned   = "tuned"   // cold boot of the tuned kernel
	// ModePrelaunch restores the warm snapshot into a QEMU started ahead
	// of time (smolvm.Config.Prelaunch); before each VM the bench waits
	// until that QEMU is up, as a steady supply of VMs would find it.
	ModePrelaunch = "prelaunch"
)

// modes are every mode, in the order Run measures them (see Modes).
var modes = []string{ModeCold, ModeRestore, ModePrelaunch, ModeTuned}

// Modes lists every mode, in the order Run measures them. The slice is
// the caller's.
func Modes() []string { return slices.Clone(modes) }

// warmPerVM is how many `true` commands each VM of a mode runs; its median
// is that VM's warm command.
const warmPerVM = 5

// Options tune Run.
type Options struct {
	// Home is the state folder ("" = smolvm.Home()).
	Home string
	// VMs is how many VMs each mode creates, one after another.
	VMs int
	// Modes to measure, from Modes(); empty means all.
	Modes []string
	// WarmRuns is how many pings and `true` commands the warm round trip
	// makes (0 skips it).
	WarmRuns int
	// Concurrency, when above 0, also creates VMs this many at a time,
	// VMs in all, and reports throughput and memory per idle VM.
	Concurrency int
	// NoSSH skips the SSH comparison.
	NoSSH bool
	// WarmNetwork is the network mode of the warm round trip's VM ("" =
	// the library's default, user). With a NIC the SSH comparison goes
	// through a forwarded host port, as SmolVM's; with "none" it is
	// bridged over the agent's exec stream (and the VM boots cold: the
	// warm snapshot has a NIC).
	WarmNetwork string
	// TunedKernel returns the tuned kernel's path, or "" when there is
	// none. nil means DefaultTunedKernel.
	TunedKernel func(home string) (string, error)
	// Prefix starts every VM name; default "bench-PID-".
	Prefix string
	// BootTimeout bounds each VM's boot; 0 is the library's default.
	BootTimeout time.Duration
	// Verbose, when set, receives one line per VM as it finishes.
	Verbose io.Writer
	// Progress, when set (a terminal), receives a progress line that is
	// rewritten in place.
	Progress io.Writer
	// Logger is passed to the library; nil means slog.Default.
	Logger *slog.Logger
	// Command is recorded in the report.
	Command string
}

// DefaultTunedKernel finds the tuned kernel that `smolvm kernel build`
// left in the state folder's cache ("" when there is none).
func DefaultTunedKernel(home string) (string, error) {
	h, err := smolvm.OpenHost(home)
	if err != nil {
		return "", err
	}
	defer h.Close()
	if ti, ok := h.TunedKernel(); ok {
		return ti.Vmlinux, nil
	}
	return "", nil
}

// ErrNoWarmSnapshot means the restore mode has nothing to restore.
var ErrNoWarmSnapshot = errors.New("no warm snapshot: run 'smolvm setup'")

type runner struct {
	opts    Options
	log     *slog.Logger
	rep     *Report
	mu      sync.Mutex
	live    map[*smolvm.VM]struct{}
	host    *smolvm.Host // the state folder, one store for every VM
	seq     int
	hasWarm bool
}

// Run measures the modes asked for and returns the report. The report is
// returned also with an error (a mode that failed, or ctx cancelled): it
// holds what was measured until then. No VM of the run is left behind.
func Run(ctx context.Context, opts Options) (rep *Report, err error) {
	if opts.VMs < 1 {
		return nil, fmt.Errorf("%w: vms must be at least 1, got %d", smolvm.ErrInvalid, opts.VMs)
	}
	if opts.WarmRuns < 0 || opts.Concurrency < 0 {
		return nil, fmt.Errorf("%w: warm runs and concurrency must not be negative", smolvm.ErrInvalid)
	}
	switch opts.WarmNetwork {
	case "", smolvm.NetworkUser, smolvm.NetworkNone, smolvm.NetworkTAP:
	default:
		return nil, fmt.Errorf("%w: warm round trip network %q: use %s, %s or %s", smolvm.ErrInvalid, opts.WarmNetwork,
			smolvm.NetworkUser, smolvm.NetworkNone, smolvm.NetworkTAP)
	}
	if len(opts.Modes) == 0 {
		opts.Modes = Modes()
	}
	for _, m := range opts.Modes {
		if !slices.Contains(modes, m) {
			return nil, fmt.Errorf("%w: mode %q: use %s", smolvm.ErrInvalid, m, strings.Join(modes, ", "))
		}
	}
	if opts.Home == "" {
		opts.Home = smolvm.Home()
	}
	if opts.Prefix == "" {
		opts.Prefix = fmt.Sprintf("bench-%d-", os.Getpid())
	}
	if opts.TunedKernel == nil {
		opts.TunedKernel = DefaultTunedKernel
	}
	host, err := smolvm.OpenHost(opts.Home)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, host.Close()) }()
	r := &runner{opts: opts, log: opts.Logger, live: map[*smolvm.VM]struct{}{}, host: host}
	if r.log == nil {
		r.log = slog.Default()
	}
	r.rep = &Report{Command: opts.Command, Started: time.Now(), VMsPerMode: opts.VMs, Host: hostInfo()}
	defer func() {
		r.progress("")
		err = errors.Join(err, r.cleanup())
		r.rep.Host.LoadAfter = loadAvg()
	}()

	sns, err := host.Snapshots(ctx)
	if err != nil {
		return r.rep, err
	}
	for _, sn := range sns {
		r.hasWarm = r.hasWarm || sn.Warm
	}

	var errs []error
	for _, mode := range opts.Modes {
		mr := r.mode(ctx, mode)
		r.rep.Modes = append(r.rep.Modes, mr)
		if mr.Error != "" {
			errs = append(errs, fmt.Errorf("mode %s: %s", mode, mr.Error))
		}
		if ctx.Err() != nil {
			return r.rep, errors.Join(append(errs, ctx.Err())...)
		}
	}
	if opts.WarmRuns > 0 {
		r.rep.Warm = r.warm(ctx)
		if r.rep.Warm.Error != "" {
			errs = append(errs, fmt.Errorf("warm round trip: %s", r.rep.Warm.Error))
		}
		if ctx.Err() != nil {
			return r.rep, errors.Join(append(errs, ctx.Err())...)
		}
	}
	if opts.Concurrency > 0 {
		r.rep.Concurrency = r.concurrency(ctx)
		if r.rep.Concurrency.Error != "" {
			errs = append(errs, fmt.Errorf("concurrency: %s", r.rep.Concurrency.Error))
		}
	}
	return r.rep, errors.Join(append(errs, ctx.Err())...)
}

// config is the library configuration of a mode, or why the mode cannot
// run here. kernelEnv, when set, is the value of $SMOLVM_KERNEL the mode
// needs: the library picks the stock or the cached tuned kernel by it (a
// KernelPath would build an initramfs without the stock kernel's modules).
func (r *runner) config(mode string) (cfg smolvm.Config, desc, skip, kernelEnv string, err error) {
	cfg = smolvm.Config{Home: r.opts.Home, BootTimeout: r.opts.BootTimeout, Logger: r.log}
	switch mode {
	case ModeCold:
		cfg.Cold = true
		desc = "stock kernel, cold boot"
		kernelEnv = "stock"
	case ModeRestore, ModePrelaunch:
		desc = "restore of the warm snapshot"
		if mode == ModePrelaunch {
			cfg.Prelaunch = true
			desc += " into a QEMU started ahead of time"
		}
		if !r.hasWarm {
			skip = "no warm snapshot in " + r.opts.Home + ": run 'smolvm setup'"
		}
	case ModeTuned:
		cfg.Cold = true
		desc = "tuned kernel, cold boot"
		k, kerr := r.opts.TunedKernel(r.opts.Home)
		cached, _ := DefaultTunedKernel(r.opts.Home)
		switch {
		case kerr != nil:
			err = fmt.Errorf("find the tuned kernel: %w", kerr)
		case k == "":
			skip = "no tuned kernel (run 'smolvm kernel build')"
		case k == cached:
			kernelEnv = "tuned"
		default:
			cfg.KernelPath = k
		}
	}
	return cfg, desc, skip, kernelEnv, err
}

// mode creates the mode's VMs one after another.
func (r *runner) mode(ctx context.Context, mode string) *ModeResult {
	mr := &ModeResult{Mode: mode}
	cfg, desc, skip, kernelEnv, err := r.config(mode)
	mr.Description, mr.Skipped = desc, skip
	if err != nil {
		mr.Error = err.Error()
	}
	if skip != "" || err != nil {
		return mr
	}
	if kernelEnv != "" {
		// The modes run one at a time, so the process-wide switch is safe.
		prev, had := os.LookupEnv(smolvm.KernelEnv)
		if err := os.Setenv(smolvm.KernelEnv, kernelEnv); err != nil {
			mr.Error = err.Error()
			return mr
		}
		defer func() {
			// Restoring a value that was set before cannot fail.
			if had {
				_ = os.Setenv(smolvm.KernelEnv, prev)
			} else {
				_ = os.Unsetenv(smolvm.KernelEnv)
			}
		}()
	}
	if mode == ModePrelaunch {
		defer func() { _ = smolvm.DiscardPrelaunched(context.WithoutCancel(ctx)) }()
		// A first restore starts the QEMU the first measured VM claims.
		vm, err := r.create(ctx, "prime", ModeRestore, cfg)
		if err != nil {
			mr.Error = err.Error()
			return mr
		}
		r.discard(vm)
	}
	samples := map[string][]time.Duration{}
	for i := 0; i < r.opts.VMs; i++ {
		r.progress(fmt.Sprintf("%s: VM %d/%d", mode, i+1, r.opts.VMs))
		if mode == ModePrelaunch {
			if err := smolvm.WaitPrelaunched(ctx); err != nil {
				mr.Error = err.Error()
				break
			}
		}
		res, kernel, err := r.one(ctx, mode, cfg)
		if err != nil {
			mr.Error = err.Error()
			break
		}
		if mr.GuestKernel == "" {
			mr.GuestKernel = kernel
		}
		mr.VMs = append(mr.VMs, res)
		for k, d := range res.Phases {
			samples[k] = append(samples[k], d)
		}
		r.verbose(mode, res)
	}
	if len(samples) > 0 {
		mr.Phases = map[string]Stats{}
		for k, ds := range samples {
			mr.Phases[k] = Summarize(ds)
		}
	}
	var rss []float64
	for _, v := range mr.VMs {
		if v.RSSMiB > 0 {
			rss = append(rss, v.RSSMiB)
		}
	}
	if len(rss) > 0 {
		slices.Sort(rss)
		mr.RSSMiB = rss[len(rss)/2]
		if len(rss)%2 == 0 {
			mr.RSSMiB = (rss[len(rss)/2-1] + rss[len(rss)/2]) / 2
		}
	}
	return mr
}

// one runs a VM through every phase.
func (r *runner) one(ctx context.Context, mode string, cfg smolvm.Config) (VMResult, string, error) {
	vm, err := r.create(ctx, mode, mode, cfg)
	if err != nil {
		return VMResult{}, "", err
	}
	defer r.discard(vm)
	res := VMResult{Name: vm.Name(), Phases: map[string]time.Duration{}}
	first, err := runTrue(ctx, vm, 1)
	if err != nil {
		return res, "", err
	}
	startPhases(res, vm, first[0])
	info, err := vm.Ping(ctx)
	if err != nil {
		return res, "", err
	}
	warm, err := runTrue(ctx, vm, warmPerVM)
	if err != nil {
		return res, "", err
	}
	res.Phases["warm_command"] = Summarize(warm).Median
	if rss, err := hypervisorRSS(ctx, []*smolvm.VM{vm}); err == nil {
		res.RSSMiB = float64(rss) / (1 << 20)
	}
	if err := vm.Delete(ctx); err != nil {
		return res, "", fmt.Errorf("stop + delete VM %s: %w", vm.Name(), err)
	}
	res.Phases["stop_delete"] = vm.Timings().StopDelete
	r.release(vm)
	return res, info.Kernel, nil
}

// create makes a VM of the run, named after label, and checks it started
// the way mode means ("" checks nothing).
func (r *runner) create(ctx context.Context, label, mode string, cfg smolvm.Config) (*smolvm.VM, error) {
	r.mu.Lock()
	r.seq++
	cfg.Name = fmt.Sprintf("%s%s-%d", r.opts.Prefix, label, r.seq)
	r.mu.Unlock()
	vm, err := r.host.New(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create VM %s: %w", cfg.Name, err)
	}
	r.mu.Lock()
	r.live[vm] = struct{}{}
	r.mu.Unlock()
	info, err := vm.Info(ctx)
	if err != nil {
		r.discard(vm)
		return nil, err
	}
	if r.rep.Host.Accel == "" {
		r.mu.Lock()
		r.rep.Host.Accel = info.Accel
		r.mu.Unlock()
	}
	restored := info.Snapshot != ""
	wantRestore := mode == ModeRestore || mode == ModePrelaunch
	switch {
	case wantRestore && !restored:
		r.discard(vm)
		return nil, fmt.Errorf("VM %s booted cold: no warm snapshot matches the current image and VM shape (did the kernel, initramfs or agent change since 'smolvm setup'?): run 'smolvm setup'", cfg.Name)
	case mode == ModePrelaunch && !info.Prelaunched:
		r.discard(vm)
		return nil, fmt.Errorf("VM %s was restored, but not into a prelaunched QEMU (see the debug log: 'smolvm --debug bench')", cfg.Name)
	case !wantRestore && mode != "" && restored:
		r.discard(vm)
		return nil, fmt.Errorf("VM %s was restored from %s, not booted cold", cfg.Name, info.Snapshot)
	}
	return vm, nil
}

// startPhases records a new VM's phases up to its first command's output
// (firstExec: the first command run after New returned).
func startPhases(res VMResult, vm *smolvm.VM, firstExec time.Duration) {
	t := vm.Timings()
	res.Phases["create"], res.Phases["launch"] = t.Create, t.Launch
	res.Phases["first_command"], res.Phases["create_to_first_command"] = t.FirstCommand, t.CreateToFirstCommand
	res.Phases["first_exec"], res.Phases["create_to_first_output"] = firstExec, t.CreateToFirstCommand+firstExec
}

// discard deletes a VM of the run (if it is not yet) and releases it.
func (r *runner) discard(vm *smolvm.VM) {
	r.mu.Lock()
	_, ok := r.live[vm]
	delete(r.live, vm)
	r.mu.Unlock()
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := vm.Delete(ctx); err != nil {
		r.log.Warn("delete benchmark VM", "vm", vm.Name(), "err", err)
	}
	if err := vm.Close(); err != nil {
		r.log.Warn("close benchmark VM", "vm", vm.Name(), "err", err)
	}
}

// release forgets a VM the run has deleted itself and closes its handle.
func (r *runner) release(vm *smolvm.VM) {
	r.mu.Lock()
	_, ok := r.live[vm]
	delete(r.live, vm)
	r.mu.Unlock()
	if ok {
		_ = vm.Close()
	}
}

// cleanup deletes every VM of the run that is still there: those this
// process holds, then any other whose name has the run's prefix.
func (r *runner) cleanup() error {
	r.mu.Lock()
	var vms []*smolvm.VM
	for vm := range r.live {
		vms = append(vms, vm)
	}
	r.mu.Unlock()
	var wg sync.WaitGroup
	for _, vm := range vms {
		wg.Add(1)
		go func() { defer wg.Done(); r.discard(vm) }()
	}
	wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	infos, err := r.host.List(ctx)
	if err != nil {
		return fmt.Errorf("list VMs left by the benchmark: %w", err)
	}
	var errs []error
	for _, in := range infos {
		if !strings.HasPrefix(in.Name, r.opts.Prefix) {
			continue
		}
		vm, err := r.host.Open(ctx, in.ID)
		if err == nil {
			err = errors.Join(vm.Delete(ctx), vm.Close())
		}
		if err != nil && !errors.Is(err, smolvm.ErrNotFound) {
			errs = append(errs, fmt.Errorf("delete benchmark VM %s: %w", in.Name, err))
		}
	}
	return errors.Join(errs...)
}

// runTrue runs `true` n times and returns each round trip.
func runTrue(ctx context.Context, vm *smolvm.VM, n int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		res, err := vm.Run(ctx, "true")
		d := time.Since(t0)
		if err != nil {
			return out, fmt.Errorf("run true in VM %s: %w", vm.Name(), err)
		}
		if res.ExitCode != 0 {
			return out, fmt.Errorf("run true in VM %s: exit code %d", vm.Name(), res.ExitCode)
		}
		out = append(out, d)
	}
	return out, nil
}

// warm measures round trips on one VM, made as New makes it by default.
func (r *runner) warm(ctx context.Context) *WarmResult {
	wr := &WarmResult{Runs: r.opts.WarmRuns}
	r.progress(fmt.Sprintf("warm round trip: %d calls each", r.opts.WarmRuns))
	cfg := smolvm.Config{Home: r.opts.Home, BootTimeout: r.opts.BootTimeout, Logger: r.log, Network: r.opts.WarmNetwork}
	vm, err := r.create(ctx, "warm", "", cfg)
	if err != nil {
		wr.Error = err.Error()
		return wr
	}
	defer r.discard(vm)
	if info, err := vm.Info(ctx); err == nil && info.Snapshot != "" {
		wr.Mode = ModeRestore
	} else {
		wr.Mode = ModeCold
	}
	// A few calls first, so that neither the guest's nor the host's first
	// use of a path counts.
	for i := 0; i < 3; i++ {
		if _, err := vm.Ping(ctx); err != nil {
			wr.Error = err.Error()
			return wr
		}
	}
	if _, err := runTrue(ctx, vm, 3); err != nil {
		wr.Error = err.Error()
		return wr
	}
	pings := make([]time.Duration, 0, r.opts.WarmRuns)
	for i := 0; i < r.opts.WarmRuns; i++ {
		t0 := time.Now()
		if _, err := vm.Ping(ctx); err != nil {
			wr.Error = err.Error()
			return wr
		}
		pings = append(pings, time.Since(t0))
	}
	wr.Ping = Summarize(pings)
	trues, err := runTrue(ctx, vm, r.opts.WarmRuns)
	if err != nil {
		wr.Error = err.Error()
		return wr
	}
	wr.True = Summarize(trues)
	if !r.opts.NoSSH {
		r.progress("warm round trip: ssh")
		wr.SSH = measureSSH(ctx, vm, r.opts.WarmRuns, r.log)
		if wr.SSH.Skipped == "" && wr.True.Median > 0 {
			wr.SSH.Ratio = float64(wr.SSH.True.Median) / float64(wr.True.Median)
		}
	}
	return wr
}

func (r *runner) progress(msg string) { progressFunc(r.opts.Progress, "bench")(msg) }

func (r *runner) verbose(mode string, res VMResult) {
	if r.opts.Verbose == nil {
		return
	}
	r.progress("")
	var b strings.Builder
	fmt.Fprintf(&b, "%-8s %s:", mode, res.Name)
	for _, p := range phases {
		if d, ok := res.Phases[p.Key]; ok {
			fmt.Fprintf(&b, " %s %s,", p.Label, fmtMS(d, 1))
		}
	}
	fmt.Fprintln(r.opts.Verbose, strings.TrimSuffix(b.String(), ","))
}

func hostInfo() Host {
	h := Host{CPUs: runtime.NumCPU(), LoadBefore: loadAvg()}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		first, _, _ := strings.Cut(string(out), "\n")
		h.QEMU = strings.TrimSpace(strings.Replace(first, " emulator version", "", 1))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.HostKernel = strings.TrimSpace(string(b))
	}
	return h
}

// loadAvg is the 1, 5 and 15 minute load average ("" when unknown).
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
