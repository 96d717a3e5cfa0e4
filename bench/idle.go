package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smolvm/smolvm"
)

// IdleOptions tune RunIdle.
type IdleOptions struct {
	// Home is the state folder ("" = smolvm.Home()); it is passed to the
	// binary as $SMOLVM_HOME.
	Home string
	// Binary is the smolvm binary that creates, runs commands in and
	// deletes the VMs ("" = this executable). Another build's binary
	// measures that build: its supervisor, QEMU arguments and warm
	// snapshot.
	Binary string
	// Counts are the numbers of idle VMs to measure, ascending: VMs are
	// added up to each count in turn and kept.
	Counts []int
	// Window is how long each VM's host CPU is measured (default 30 s).
	Window time.Duration
	// Settle is how long the VMs idle before the window opens (default
	// 15 s): a restored guest finishes what it was doing.
	Settle time.Duration
	// Parallel is how many VMs are created at a time (default 2).
	Parallel int
	// ExecRuns is how many `exec -- true` are timed per count, each into
	// another VM while the rest idle (default 10).
	ExecRuns int
	// Prefix starts every VM name; default "idle-PID-".
	Prefix string
	// Progress, when set (a terminal), receives a progress line that is
	// rewritten in place.
	Progress io.Writer
	// Command is recorded in the report.
	Command string
}

// IdleReport is what RunIdle measured.
type IdleReport struct {
	Command string        `json:"command,omitempty"`
	Started time.Time     `json:"started"`
	Host    Host          `json:"host"`
	Binary  string        `json:"binary"`
	Window  time.Duration `json:"-"`
	Steps   []*IdleStep   `json:"steps"`
	Error   string        `json:"error,omitempty"`
}

// IdleStep is the measurement of one count of idle VMs. CPU figures are
// percent of one host core, per VM (the hypervisor and the supervisor
// process with all their threads, from /proc/PID/task/*/schedstat);
// memory figures are MiB per VM (PSS counts the pages VMs share, the
// snapshot's memory and the binaries, once in all).
type IdleStep struct {
	VMs        int     `json:"vms"`
	CreateTime float64 `json:"create_seconds"` // to add this step's VMs
	// CPU per VM: QEMU + supervisor; then each alone (medians).
	CPU           PctStats `json:"cpu_pct"`
	CPUHypervisor float64  `json:"cpu_hypervisor_pct_median"`
	CPUSupervisor float64  `json:"cpu_supervisor_pct_median"`
	CPUAll        float64  `json:"cpu_all_cores"` // all VMs together, in cores
	// Memory per VM, medians.
	PSS           float64 `json:"pss_mib_median"`
	PSSHypervisor float64 `json:"pss_hypervisor_mib_median"`
	PSSSupervisor float64 `json:"pss_supervisor_mib_median"`
	RSSHypervisor float64 `json:"rss_hypervisor_mib_median"`
	RSSSupervisor float64 `json:"rss_supervisor_mib_median"`
	MemAvailable  float64 `json:"host_mem_available_mib"`
	// Exec is the CLI wall time of `smolvm exec VM -- true`, each the
	// first command into its VM since it was made; ExecAgain that of a
	// second one into the same VM right after.
	Exec       Stats   `json:"exec_true"`
	ExecAgain  Stats   `json:"exec_true_again"`
	ExecFailed int     `json:"exec_failed,omitempty"`
	Load       string  `json:"load,omitempty"` // load averages at the window's end
	WindowSecs float64 `json:"window_seconds"`
}

// PctStats summarise percentages.
type PctStats struct {
	N      int     `json:"n"`
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	P95    float64 `json:"p95"`
	Max    float64 `json:"max"`
}

func summarizePct(v []float64) PctStats {
	if len(v) == 0 {
		return PctStats{}
	}
	ds := make([]time.Duration, len(v))
	for i, x := range v {
		ds[i] = time.Duration(x * 1e6) // Summarize's rules, at 1e-6 % precision
	}
	s := Summarize(ds)
	f := func(d time.Duration) float64 { return float64(d) / 1e6 }
	return PctStats{N: s.N, Min: f(s.Min), Median: f(s.Median), P95: f(s.P95), Max: f(s.Max)}
}

func median(v []float64) float64 { return summarizePct(v).Median }

// idleVM is one VM of the run and its host processes.
type idleVM struct {
	name       string
	supervisor int
	hypervisor int
}

// RunIdle holds idle persistent VMs (`smolvm create`), Counts[0] of them,
// then Counts[1], …, and at each count measures every VM's host CPU and
// memory over a settled window, then the latency of `smolvm exec -- true`
// into some of them while the rest idle. Every VM it made is deleted
// before it returns, also when ctx is cancelled or a step fails.
func RunIdle(ctx context.Context, opts IdleOptions) (rep *IdleReport, err error) {
	if len(opts.Counts) == 0 || !slices.IsSorted(opts.Counts) || opts.Counts[0] < 1 {
		return nil, fmt.Errorf("%w: idle counts must be ascending and at least 1, got %v", smolvm.ErrInvalid, opts.Counts)
	}
	if opts.Home == "" {
		opts.Home = smolvm.Home()
	}
	if err := idleRoom(opts.Counts[len(opts.Counts)-1]); err != nil {
		return nil, err
	}
	if opts.Binary == "" {
		if opts.Binary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("find the smolvm binary: %w", err)
		}
	}
	if opts.Window <= 0 {
		opts.Window = 30 * time.Second
	}
	if opts.Settle <= 0 {
		opts.Settle = 15 * time.Second
	}
	opts.Parallel = max(opts.Parallel, 1)
	if opts.ExecRuns <= 0 {
		opts.ExecRuns = 10
	}
	if opts.Prefix == "" {
		opts.Prefix = fmt.Sprintf("idle-%d-", os.Getpid())
	}
	r := &idleRunner{opts: opts}
	rep = &IdleReport{Command: opts.Command, Started: time.Now(), Host: hostInfo(), Binary: opts.Binary, Window: opts.Window}
	defer func() {
		r.progress("")
		err = errors.Join(err, r.cleanup())
		rep.Host.LoadAfter = loadAvg()
		if err != nil {
			rep.Error = err.Error()
		}
	}()
	for _, n := range opts.Counts {
		st, err := r.step(ctx, n)
		if st != nil {
			rep.Steps = append(rep.Steps, st)
		}
		if err != nil {
			return rep, fmt.Errorf("%d idle VMs: %w", n, err)
		}
	}
	return rep, nil
}

// idleRoom checks, before any VM is made, that the host's capacity
// limits (smolvm.Capacity: Config, environment, host setting, default)
// let n default VMs be created: they count each VM's whole guest memory,
// which an idle VM does not use, so a bench of hundreds must lift them.
func idleRoom(n int) error {
	maxVMs, maxMiB, err := smolvm.Capacity()
	if err != nil {
		return err
	}
	need := n * smolvm.DefaultMemoryMiB
	if (maxVMs > 0 && n > maxVMs) || (maxMiB > 0 && need > maxMiB) {
		return fmt.Errorf("%w: %d idle VMs need room for %d VMs and %d MiB of guest memory, and the host's limits are %s VMs and %s MiB (an idle VM uses far less than its guest memory): lift them for the bench, e.g. %s=-1 %s=-1 smolvm bench --idle …",
			smolvm.ErrCapacity, n, n, need, limitText(maxVMs), limitText(maxMiB), smolvm.MaxVMsEnv, smolvm.MaxMemoryMiBEnv)
	}
	return nil
}

// limitText shows a resolved limit (0: none).
func limitText(n int) string {
	if n == 0 {
		return "no"
	}
	return strconv.Itoa(n)
}

type idleRunner struct {
	opts IdleOptions
	mu   sync.Mutex
	made []string // names of the VMs created, in order
}

func (r *idleRunner) progress(s string) {
	if r.opts.Progress != nil {
		fmt.Fprintf(r.opts.Progress, "\r\033[K%s", s)
	}
}

// cli runs the binary with the run's state folder.
func (r *idleRunner) cli(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.opts.Binary, args...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+r.opts.Home)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("smolvm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// step adds VMs up to n, lets them settle and measures them.
func (r *idleRunner) step(ctx context.Context, n int) (*IdleStep, error) {
	st := &IdleStep{VMs: n}
	t0 := time.Now()
	if err := r.grow(ctx, n); err != nil {
		return nil, err
	}
	st.CreateTime = time.Since(t0).Seconds()
	r.progress(fmt.Sprintf("%d idle VMs: settling for %s", n, r.opts.Settle))
	if err := sleepCtx(ctx, r.opts.Settle); err != nil {
		return nil, err
	}
	vms, err := r.list(ctx)
	if err != nil {
		return nil, err
	}
	if len(vms) != n {
		return nil, fmt.Errorf("%d of the %d VMs are running", len(vms), n)
	}
	r.progress(fmt.Sprintf("%d idle VMs: measuring CPU for %s", n, r.opts.Window))
	before := make([][2]time.Duration, n)
	for i, vm := range vms {
		if before[i], err = vm.cpu(); err != nil {
			return nil, err
		}
	}
	w0 := time.Now()
	if err := sleepCtx(ctx, r.opts.Window); err != nil {
		return nil, err
	}
	var hv, sv, both []float64
	for i, vm := range vms {
		after, err := vm.cpu()
		if err != nil {
			return nil, err
		}
		window := time.Since(w0)
		h := 100 * float64(after[0]-before[i][0]) / float64(window)
		s := 100 * float64(after[1]-before[i][1]) / float64(window)
		hv, sv, both = append(hv, h), append(sv, s), append(both, h+s)
	}
	st.WindowSecs = time.Since(w0).Seconds()
	st.Load = loadAvg()
	st.CPU = summarizePct(both)
	st.CPUHypervisor, st.CPUSupervisor = median(hv), median(sv)
	for _, v := range both {
		st.CPUAll += v / 100
	}
	var pss, pssH, pssS, rssH, rssS []float64
	for _, vm := range vms {
		h, err := readMemory(vm.hypervisor)
		if err != nil {
			return nil, fmt.Errorf("VM %s: %w", vm.name, err)
		}
		s, err := readMemory(vm.supervisor)
		if err != nil {
			return nil, fmt.Errorf("VM %s: %w", vm.name, err)
		}
		pssH, pssS, pss = append(pssH, h.pss), append(pssS, s.pss), append(pss, h.pss+s.pss)
		rssH, rssS = append(rssH, h.rss), append(rssS, s.rss)
	}
	st.PSS, st.PSSHypervisor, st.PSSSupervisor = median(pss), median(pssH), median(pssS)
	st.RSSHypervisor, st.RSSSupervisor = median(rssH), median(rssS)
	st.MemAvailable = memAvailableMiB()

	r.progress(fmt.Sprintf("%d idle VMs: exec -- true", n))
	// Each VM takes two: its first command since it was restored (the
	// guest's code paths are cold: under TCG they are translated anew),
	// then one more, as an agent's next step into a sandbox it keeps.
	var first, again []time.Duration
	var failed []error
	for i := range r.opts.ExecRuns {
		vm := vms[(i*n)/r.opts.ExecRuns+(n/r.opts.ExecRuns)/2]
		for _, lat := range []*[]time.Duration{&first, &again} {
			t := time.Now()
			if _, err := r.cli(ctx, "exec", vm.name, "--", "true"); err != nil {
				failed = append(failed, err)
				break
			}
			*lat = append(*lat, time.Since(t))
		}
	}
	st.Exec, st.ExecAgain, st.ExecFailed = Summarize(first), Summarize(again), len(failed)
	return st, errors.Join(failed...)
}

// memoryReserveMiB is the host memory the bench does not fill with VMs.
const memoryReserveMiB = 3072

// grow creates VMs, Parallel at a time, until n were made.
func (r *idleRunner) grow(ctx context.Context, n int) error {
	r.mu.Lock()
	have := len(r.made)
	r.mu.Unlock()
	next := make(chan int)
	errs := make(chan error, r.opts.Parallel)
	var wg sync.WaitGroup
	var made atomic.Int64
	for range r.opts.Parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if avail := memAvailableMiB(); avail > 0 && avail < memoryReserveMiB {
					errs <- fmt.Errorf("stopped at %d VMs: the host has %.0f MiB of memory available, less than the %d MiB the bench leaves to others", have+int(made.Load()), avail, memoryReserveMiB)
					return
				}
				name := fmt.Sprintf("%s%d", r.opts.Prefix, i)
				r.mu.Lock()
				r.made = append(r.made, name) // deleted at the end even if create fails half way
				r.mu.Unlock()
				if _, err := r.cli(ctx, "create", "--name", name); err != nil {
					errs <- err
					return
				}
				r.progress(fmt.Sprintf("creating idle VMs: %d of %d", have+int(made.Add(1)), n))
			}
		}()
	}
	var err error
feed:
	for i := have; i < n; i++ {
		select {
		case next <- i:
		case err = <-errs:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(next)
	wg.Wait()
	close(errs)
	for e := range errs {
		err = errors.Join(err, e)
	}
	return err
}

// list finds the run's VMs and their processes.
func (r *idleRunner) list(ctx context.Context) ([]idleVM, error) {
	out, err := r.cli(ctx, "ls", "--json")
	if err != nil {
		return nil, err
	}
	var infos []struct {
		Name          string `json:"name"`
		State         string `json:"state"`
		SupervisorPID int    `json:"supervisor_pid"`
		HypervisorPID int    `json:"hypervisor_pid"`
	}
	if err := json.Unmarshal(out, &infos); err != nil {
		return nil, fmt.Errorf("read smolvm ls --json: %w", err)
	}
	var vms []idleVM
	for _, in := range infos {
		if !strings.HasPrefix(in.Name, r.opts.Prefix) {
			continue
		}
		if in.State != "running" || in.SupervisorPID <= 0 || in.HypervisorPID <= 0 {
			return nil, fmt.Errorf("VM %s is %s (supervisor %d, hypervisor %d)", in.Name, in.State, in.SupervisorPID, in.HypervisorPID)
		}
		vms = append(vms, idleVM{in.Name, in.SupervisorPID, in.HypervisorPID})
	}
	return vms, nil
}

// cleanup deletes every VM the run made, in batches.
func (r *idleRunner) cleanup() error {
	r.mu.Lock()
	names := slices.Clone(r.made)
	r.made = nil
	r.mu.Unlock()
	var errs []error
	for len(names) > 0 {
		r.progress(fmt.Sprintf("deleting idle VMs: %d left", len(names)))
		batch := names[:min(len(names), 50)]
		names = names[len(batch):]
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		out, err := r.cli(ctx, append([]string{"rm", "--force"}, batch...)...)
		cancel()
		// A VM whose create failed may not exist: not an error here.
		if err != nil && !strings.Contains(err.Error(), "not found") {
			errs = append(errs, fmt.Errorf("%w %s", err, out))
		}
	}
	return errors.Join(errs...)
}

// cpu returns the CPU time of the VM's hypervisor and supervisor.
func (v idleVM) cpu() ([2]time.Duration, error) {
	h, err := processCPU(v.hypervisor)
	if err != nil {
		return [2]time.Duration{}, fmt.Errorf("VM %s: %w", v.name, err)
	}
	s, err := processCPU(v.supervisor)
	if err != nil {
		return [2]time.Duration{}, fmt.Errorf("VM %s: %w", v.name, err)
	}
	return [2]time.Duration{h, s}, nil
}

// processCPU sums the time on CPU of a process's threads, from
// /proc/PID/task/*/schedstat (nanoseconds, not rounded to clock ticks as
// /proc/PID/stat is).
func processCPU(pid int) (time.Duration, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("process %d is gone", pid)
	}
	var sum time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // a thread that ended: its time went with it
		}
		ns, err := parseSchedstat(string(b))
		if err != nil {
			return 0, fmt.Errorf("process %d: %w", pid, err)
		}
		sum += ns
	}
	return sum, nil
}

// parseSchedstat reads the first field of a schedstat line: time on CPU.
func parseSchedstat(s string) (time.Duration, error) {
	f := strings.Fields(s)
	if len(f) != 3 {
		return 0, fmt.Errorf("unexpected schedstat %q", s)
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("unexpected schedstat %q: %w", s, err)
	}
	return time.Duration(ns), nil
}

type memory struct{ pss, rss float64 } // MiB

// readMemory reads a process's PSS and RSS from /proc/PID/smaps_rollup.
func readMemory(pid int) (memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return memory{}, fmt.Errorf("read memory of process %d: %w", pid, err)
	}
	kb := parseKBFields(string(b), "Pss", "Rss")
	return memory{pss: kb["Pss"] / 1024, rss: kb["Rss"] / 1024}, nil
}

// parseKBFields reads "Key:   N kB" lines (smaps_rollup, meminfo).
func parseKBFields(s string, keys ...string) map[string]float64 {
	m := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || !slices.Contains(keys, k) {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 2 && f[1] == "kB" {
			if n, err := strconv.ParseFloat(f[0], 64); err == nil {
				m[k] = n
			}
		}
	}
	return m
}

func memAvailableMiB() float64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	return parseKBFields(string(b), "MemAvailable")["MemAvailable"] / 1024
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// WriteJSON writes the report as indented JSON.
func (r *IdleReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report for people.
func (r *IdleReport) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "idle persistent VMs (%s), CPU over %s per count; host: %d CPUs, %s, load %s → %s\n",
		r.Binary, r.Window, r.Host.CPUs, r.Host.QEMU, r.Host.LoadBefore, r.Host.LoadAfter)
	fmt.Fprintf(w, "%6s %9s %9s %9s %9s %9s %8s %8s %8s %9s %9s %9s %9s %8s %s\n",
		"VMs", "cpu% med", "cpu% p95", "qemu%", "superv%", "all cores",
		"PSS MiB", "qemu", "superv", "exec med", "exec p95", "exec max", "again med", "failed", "load")
	for _, s := range r.Steps {
		fmt.Fprintf(w, "%6d %9.3f %9.3f %9.3f %9.3f %9.2f %8.1f %8.1f %8.1f %9s %9s %9s %9s %8d %s\n",
			s.VMs, s.CPU.Median, s.CPU.P95, s.CPUHypervisor, s.CPUSupervisor, s.CPUAll,
			s.PSS, s.PSSHypervisor, s.PSSSupervisor,
			fmtMS(s.Exec.Median, 1), fmtMS(s.Exec.P95, 1), fmtMS(s.Exec.Max, 1), fmtMS(s.ExecAgain.Median, 1), s.ExecFailed, s.Load)
	}
	if r.Error != "" {
		fmt.Fprintf(w, "error: %s\n", r.Error)
	}
	return nil
}
