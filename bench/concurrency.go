package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/smolvm/smolvm"
)

// settle is how long a batch of VMs stays idle before their memory is read.
const settle = time.Second

// concurrency creates VMs Concurrency at a time until VMs were made, each
// batch in parallel: create, one command, then stop + delete of all. It
// reads the QEMU processes' resident memory while a batch is up and idle.
func (r *runner) concurrency(ctx context.Context) *ConcurrencyResult {
	n, total := r.opts.Concurrency, r.opts.VMs
	cr := &ConcurrencyResult{Concurrency: n}
	cfg := smolvm.Config{Home: r.opts.Home, BootTimeout: r.opts.BootTimeout, Logger: r.log}
	samples := map[string][]time.Duration{}
	var rssPerVM []float64 // MiB, one per full batch (or per batch when none is full)
	var partial []float64
	for cr.VMs < total && ctx.Err() == nil {
		size := min(n, total-cr.VMs)
		r.progress(fmt.Sprintf("concurrency %d: VMs %d-%d of %d", n, cr.VMs+1, cr.VMs+size, total))
		t0 := time.Now()
		vms := make([]*smolvm.VM, size)
		errs := make([]error, size)
		var wg sync.WaitGroup
		for i := range vms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				vms[i], errs[i] = r.create(ctx, "conc", "", cfg)
			}()
		}
		wg.Wait()
		up := time.Since(t0)
		if err := errors.Join(errs...); err != nil {
			cr.Error = err.Error()
			break
		}
		if cr.Mode == "" {
			if in, err := vms[0].Info(ctx); err == nil && in.Snapshot != "" {
				cr.Mode = ModeRestore
			} else {
				cr.Mode = ModeCold
			}
		}
		// Idle: nothing runs in the guests while their memory is read.
		select {
		case <-ctx.Done():
		case <-time.After(settle):
		}
		rss, err := hypervisorRSS(ctx, vms)
		if err != nil {
			cr.Error = err.Error()
			break
		}
		perVM := float64(rss) / float64(size) / (1 << 20)
		if size == n {
			rssPerVM = append(rssPerVM, perVM)
		} else {
			partial = append(partial, perVM)
		}
		t1 := time.Now()
		res := make([]VMResult, size)
		for i, vm := range vms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				res[i], errs[i] = r.finish(ctx, vm)
			}()
		}
		wg.Wait()
		cr.Busy += up + time.Since(t1)
		if err := errors.Join(errs...); err != nil {
			cr.Error = err.Error()
			break
		}
		for _, v := range res {
			for k, d := range v.Phases {
				samples[k] = append(samples[k], d)
			}
			r.verbose(fmt.Sprintf("conc-%d", n), v)
		}
		cr.VMs += size
	}
	if len(rssPerVM) == 0 {
		rssPerVM = partial
	}
	if len(rssPerVM) > 0 {
		sum := 0.0
		for _, v := range rssPerVM {
			sum += v
		}
		cr.RSSPerVMMiB = sum / float64(len(rssPerVM))
	}
	if cr.Busy > 0 {
		cr.VMsPerMinute = float64(cr.VMs) / cr.Busy.Minutes()
	}
	if len(samples) > 0 {
		cr.Phases = map[string]Stats{}
		for k, ds := range samples {
			cr.Phases[k] = Summarize(ds)
		}
	}
	if cr.Error == "" && ctx.Err() != nil {
		cr.Error = ctx.Err().Error()
	}
	return cr
}

// finish runs one command in a VM of a batch and deletes it.
func (r *runner) finish(ctx context.Context, vm *smolvm.VM) (VMResult, error) {
	defer r.discard(vm)
	res := VMResult{Name: vm.Name(), Phases: map[string]time.Duration{}}
	runs, err := runTrue(ctx, vm, 2)
	if err != nil {
		return res, err
	}
	startPhases(res, vm, runs[0])
	res.Phases["warm_command"] = runs[1]
	if err := vm.Delete(ctx); err != nil {
		return res, fmt.Errorf("stop + delete VM %s: %w", vm.Name(), err)
	}
	res.Phases["stop_delete"] = vm.Timings().StopDelete
	r.release(vm)
	return res, nil
}

// hypervisorRSS sums the resident memory of the VMs' QEMU processes.
func hypervisorRSS(ctx context.Context, vms []*smolvm.VM) (int64, error) {
	var sum int64
	for _, vm := range vms {
		in, err := vm.Info(ctx)
		if err != nil {
			return 0, err
		}
		if in.HypervisorPID <= 0 {
			return 0, fmt.Errorf("VM %s: no hypervisor process recorded", vm.Name())
		}
		rss, err := processRSS(in.HypervisorPID)
		if err != nil {
			return 0, fmt.Errorf("VM %s: %w", vm.Name(), err)
		}
		sum += rss
	}
	return sum, nil
}

// processRSS reads VmRSS of a process, in bytes.
func processRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read memory of process %d: %w", pid, err)
	}
	return parseVmRSS(string(b))
}

// parseVmRSS finds the VmRSS line of /proc/PID/status, in bytes.
func parseVmRSS(status string) (int64, error) {
	for _, line := range strings.Split(status, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || k != "VmRSS" {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("unexpected VmRSS line %q", line)
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("unexpected VmRSS line %q: %w", line, err)
		}
		return kb << 10, nil
	}
	return 0, errors.New("no VmRSS line (process exited?)")
}
