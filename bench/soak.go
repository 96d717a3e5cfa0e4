package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/leaks"
)

// The ways a soak makes its VMs.
const (
	// SoakPersistent makes persistent VMs (smolvm.Config.Persistent): each
	// runs under a supervisor process of its own, reached over its API
	// socket, as `smolvm create`, `exec` and `rm` do.
	SoakPersistent = "persistent"
	// SoakLibrary makes VMs that live in this process (smolvm.New, Close).
	SoakLibrary = "library"
)

// SoakModes lists the soak's modes. The slice is the caller's.
func SoakModes() []string { return []string{SoakPersistent, SoakLibrary} }

// soakWindow is how many cycles the first and last figures cover.
const soakWindow = 50

// maxSoakErrors bounds the errors a soak report quotes.
const maxSoakErrors = 10

// SoakOptions tune Soak.
type SoakOptions struct {
	// Home is the state folder ("" = smolvm.Home()).
	Home string
	// Cycles is how many create → exec → delete cycles to run.
	Cycles int
	// Mode is SoakPersistent (default) or SoakLibrary.
	Mode string
	// SupervisorBinary is the smolvm CLI persistent VMs run under (""
	// lets the library find it).
	SupervisorBinary string
	// BootTimeout bounds each VM's start; 0 is the library's default.
	BootTimeout time.Duration
	// Prefix starts every VM name; default "soak-PID-".
	Prefix string
	// MaxFailuresInRow ends the soak early after that many failed cycles
	// in a row (default 10): a host that cannot make VMs at all.
	MaxFailuresInRow int
	// LeakWait bounds the wait at the end for what the last VMs hold to
	// go (default 30 s).
	LeakWait time.Duration
	// Progress, when set (a terminal), receives a progress line that is
	// rewritten in place.
	Progress io.Writer
	// Logger is passed to the library; nil means slog.Default.
	Logger *slog.Logger
	// Command is recorded in the report.
	Command string
}

// SoakReport is the outcome of a soak.
type SoakReport struct {
	Command string    `json:"command,omitempty"`
	Mode    string    `json:"mode"`
	Started time.Time `json:"started"`
	Host    Host      `json:"host"`
	// Cycles is how many cycles were asked for, Done how many ran,
	// Failures how many of those failed (Errors quotes the first ones).
	Cycles   int      `json:"cycles"`
	Done     int      `json:"done"`
	Failures int      `json:"failures"`
	Errors   []string `json:"errors,omitempty"`
	// Restored is how many VMs were restored from the warm snapshot
	// (the others booted cold).
	Restored int `json:"restored"`
	// Leaks counts what the cycles left behind, per kind (processes,
	// cgroups, TAP devices, nftables tables, state rows, folders…);
	// LeakDetails names each thing left by kind; Unchecked names the kinds
	// that could not be checked, with why.
	Leaks       map[string]int      `json:"leaks"`
	LeakDetails map[string][]string `json:"leak_details,omitempty"`
	Unchecked   map[string]string   `json:"unchecked,omitempty"`
	// Time per cycle: the first and the last soakWindow cycles, and all.
	First Stats `json:"first"`
	Last  Stats `json:"last"`
	All   Stats `json:"all"`
	// Phases of a cycle over all cycles: create, exec (both commands)
	// and delete.
	Phases map[string]Stats `json:"phases,omitempty"`
	// Elapsed is the soak's wall time, in seconds.
	Elapsed float64 `json:"elapsed_s"`
}

// Soak runs opts.Cycles cycles of create (a restore of the warm snapshot,
// the library's default) → exec (`true`, and `echo` whose output is
// checked) → delete, one after another, timing each; a failed cycle is
// counted and its VM removed, and the soak goes on. Then it checks that
// the cycles left nothing behind (leaks.Take before the first and after
// the last). The report is returned also with an error.
func Soak(ctx context.Context, opts SoakOptions) (*SoakReport, error) {
	if opts.Cycles < 1 {
		return nil, fmt.Errorf("%w: soak cycles must be at least 1, got %d", smolvm.ErrInvalid, opts.Cycles)
	}
	switch opts.Mode {
	case "":
		opts.Mode = SoakPersistent
	case SoakPersistent, SoakLibrary:
	default:
		return nil, fmt.Errorf("%w: soak mode %q: use %s", smolvm.ErrInvalid, opts.Mode, strings.Join(SoakModes(), " or "))
	}
	if opts.Home == "" {
		opts.Home = smolvm.Home()
	}
	if opts.Prefix == "" {
		opts.Prefix = fmt.Sprintf("soak-%d-", os.Getpid())
	}
	if opts.MaxFailuresInRow <= 0 {
		opts.MaxFailuresInRow = 10
	}
	if opts.LeakWait <= 0 {
		opts.LeakWait = 30 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	rep := &SoakReport{Command: opts.Command, Mode: opts.Mode, Started: time.Now(), Host: hostInfo(), Cycles: opts.Cycles}
	before, err := leaks.Take(ctx, opts.Home)
	if err != nil {
		return nil, fmt.Errorf("take stock before the soak: %w", err)
	}
	cfg := smolvm.Config{Home: opts.Home, Persistent: opts.Mode == SoakPersistent, SupervisorBinary: opts.SupervisorBinary,
		BootTimeout: opts.BootTimeout, Logger: log}
	var (
		cycles            []time.Duration
		create, exec, del []time.Duration
		ids               []string
		inRow             int
		errs              []error
		progress          = progressFunc(opts.Progress, "soak")
		lastCycle         time.Duration
		stoppedEarly      error
	)
	for i := 1; i <= opts.Cycles && ctx.Err() == nil; i++ {
		progress(fmt.Sprintf("cycle %d/%d, %d failed, last %s", i, opts.Cycles, rep.Failures, fmtMS(lastCycle, 0)))
		c := soakCycle(ctx, cfg, fmt.Sprintf("%s%d", opts.Prefix, i))
		if c.id != "" {
			ids = append(ids, c.id)
		}
		if ctx.Err() != nil && c.err != nil {
			break // interrupted, not failed
		}
		rep.Done++
		if c.restored {
			rep.Restored++
		}
		if c.err != nil {
			rep.Failures++
			inRow++
			if len(rep.Errors) < maxSoakErrors {
				rep.Errors = append(rep.Errors, fmt.Sprintf("cycle %d: %v", i, c.err))
			}
			log.Warn("soak cycle failed", "cycle", i, "err", c.err)
			if inRow >= opts.MaxFailuresInRow {
				stoppedEarly = fmt.Errorf("soak stopped after %d failed cycles in a row; the last: %w", inRow, c.err)
				break
			}
			continue
		}
		inRow = 0
		lastCycle = c.create + c.exec + c.delete
		cycles = append(cycles, lastCycle)
		create, exec, del = append(create, c.create), append(exec, c.exec), append(del, c.delete)
	}
	progress("")
	rep.Elapsed = time.Since(rep.Started).Round(time.Millisecond).Seconds()
	rep.All = Summarize(cycles)
	rep.First = Summarize(cycles[:min(soakWindow, len(cycles))])
	rep.Last = Summarize(cycles[max(0, len(cycles)-soakWindow):])
	if len(cycles) > 0 {
		rep.Phases = map[string]Stats{"create": Summarize(create), "exec": Summarize(exec), "delete": Summarize(del)}
	}
	// What the cycles left: a VM's processes take a moment to go after
	// its delete, so wait for them (a while) before counting a leak.
	wctx := context.WithoutCancel(ctx)
	left, after, err := leaks.Wait(wctx, before, leaks.Owned(ids), opts.LeakWait)
	if err != nil {
		errs = append(errs, fmt.Errorf("take stock after the soak: %w", err))
	} else {
		rep.Leaks, rep.Unchecked = left.Counts(), after.Unknown
		if left.Count() > 0 {
			rep.LeakDetails = left
			errs = append(errs, fmt.Errorf("the soak left %d things behind:\n%s", left.Count(), left))
		}
		if len(rep.Unchecked) == 0 {
			rep.Unchecked = nil
		}
	}
	rep.Host.LoadAfter = loadAvg()
	if rep.Failures > 0 {
		errs = append(errs, fmt.Errorf("%d of %d soak cycles failed; the first: %s", rep.Failures, rep.Done, rep.Errors[0]))
	}
	return rep, errors.Join(append(errs, stoppedEarly, ctx.Err())...)
}

// soakCycleResult is one cycle's phases, or why it failed.
type soakCycleResult struct {
	id                   string
	restored             bool
	create, exec, delete time.Duration
	err                  error
}

// soakCycle creates a VM named name, runs `true` and an `echo` in it and
// deletes it. A VM whose cycle failed is deleted too.
func soakCycle(ctx context.Context, cfg smolvm.Config, name string) (c soakCycleResult) {
	cfg.Name = name
	t0 := time.Now()
	vm, err := smolvm.New(ctx, cfg)
	if err != nil {
		c.err = fmt.Errorf("create VM %s: %w", name, err)
		return c
	}
	c.id = vm.ID()
	defer func() {
		if c.err != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			defer cancel()
			_ = vm.Delete(dctx)
			_ = vm.Close()
		}
	}()
	t1 := time.Now()
	c.create = t1.Sub(t0)
	if in, err := vm.Info(ctx); err == nil {
		c.restored = in.Snapshot != ""
	}
	if _, err := runTrue(ctx, vm, 1); err != nil {
		c.err = err
		return c
	}
	want := "soak " + name + "\n"
	res, err := vm.Run(ctx, "echo soak "+name)
	switch {
	case err != nil:
		c.err = fmt.Errorf("run echo in VM %s: %w", name, err)
		return c
	case res.ExitCode != 0 || string(res.Stdout) != want || len(res.Stderr) > 0:
		c.err = fmt.Errorf("run echo in VM %s: exit code %d, stdout %q, stderr %q; want 0, %q and nothing", name, res.ExitCode, res.Stdout, res.Stderr, want)
		return c
	}
	t2 := time.Now()
	c.exec = t2.Sub(t1)
	if err := vm.Delete(ctx); err != nil {
		c.err = fmt.Errorf("delete VM %s: %w", name, err)
		return c
	}
	if err := vm.Close(); err != nil {
		c.err = fmt.Errorf("close VM %s: %w", name, err)
		return c
	}
	c.delete = time.Since(t2)
	return c
}

// progressFunc returns a function that rewrites a progress line on w (a
// terminal), or does nothing without one; "" clears the line.
func progressFunc(w io.Writer, what string) func(string) {
	return func(msg string) {
		if w == nil {
			return
		}
		if msg == "" {
			fmt.Fprint(w, "\r\033[K")
			return
		}
		fmt.Fprintf(w, "\r\033[K%s: %s", what, msg)
	}
}

// WriteJSON writes the report as indented JSON.
func (r *SoakReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report for a person.
func (r *SoakReport) WriteTable(w io.Writer) error {
	var b strings.Builder
	h := r.Host
	how := "persistent VMs, a supervisor process each"
	if r.Mode == SoakLibrary {
		how = "VMs in this process"
	}
	fmt.Fprintf(&b, "smolvm soak: create → exec → delete, %s; %d CPUs", how, h.CPUs)
	if h.QEMU != "" {
		fmt.Fprintf(&b, ", %s", h.QEMU)
	}
	if h.LoadBefore != "" {
		fmt.Fprintf(&b, ", load %s → %s", h.LoadBefore, h.LoadAfter)
	}
	b.WriteString("\n\n")
	fmt.Fprintf(&b, "  %-10s %d of %d (%d restored from the warm snapshot), %.1f s\n", "cycles", r.Done, r.Cycles, r.Restored, r.Elapsed)
	fmt.Fprintf(&b, "  %-10s %d\n", "failures", r.Failures)
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "  %-10s %s\n", "", e)
	}
	var counts []string
	total := 0
	for _, k := range leaks.Kinds {
		if _, unchecked := r.Unchecked[k]; unchecked {
			counts = append(counts, k+" unchecked")
			continue
		}
		counts = append(counts, fmt.Sprintf("%s %d", k, r.Leaks[k]))
		total += r.Leaks[k]
	}
	fmt.Fprintf(&b, "  %-10s %d (%s)\n", "leaks", total, strings.Join(counts, ", "))
	if len(r.LeakDetails) > 0 {
		for _, line := range strings.Split(leaks.Leaks(r.LeakDetails).String(), "\n") {
			fmt.Fprintf(&b, "  %-10s %s\n", "", line)
		}
	}
	for k, why := range r.Unchecked {
		fmt.Fprintf(&b, "  %-10s %s not checked: %s\n", "", k, why)
	}
	if r.All.N > 0 {
		b.WriteString("\n")
		header(&b, "time per cycle")
		statsRow(&b, fmt.Sprintf("first %d cycles", r.First.N), r.First, 1)
		statsRow(&b, fmt.Sprintf("last %d cycles", r.Last.N), r.Last, 1)
		statsRow(&b, fmt.Sprintf("all %d cycles", r.All.N), r.All, 1)
		for _, p := range []string{"create", "exec", "delete"} {
			statsRow(&b, "  "+p, r.Phases[p], 1)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}
