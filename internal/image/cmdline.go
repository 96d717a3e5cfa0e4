package image

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
)

// LAPICTimerHz is the rate of the local APIC timer QEMU emulates under TCG
// (its APIC bus runs at 1 GHz, as KVM's does). The tuned kernel reads it
// from its smolvm.lapic_hz boot option (see kernelSourceEdits) instead of
// measuring it against the tick for 100 ms; other kernels ignore the
// option (a dotted option no built-in code claims is dropped, not passed to
// init).
const LAPICTimerHz = 1_000_000_000

// TCGKernelArgs returns the kernel command line arguments of a guest that
// runs under TCG (software emulation) on this host, besides console and
// reboot settings. Each takes work off every cold boot:
//
//   - tsc_early_khz and tsc=reliable: under TCG the guest's TSC ticks at the
//     host's TSC rate, and QEMU's microvm has no HPET or ACPI PM timer. The
//     kernel's PIT based TSC calibration is timing sensitive; when the host
//     is busy it fails ("tsc: Unable to calibrate against PIT", "Marking TSC
//     unstable") and the boot hangs for good right after "APIC: Switch to
//     symmetric I/O mode setup". Passing the frequency skips it. They are
//     left out when the host frequency is unknown.
//   - noreplace-smp: a kernel that finds one CPU rewrites every lock prefix
//     of its text for a uniprocessor, one page poke (a page-table switch
//     and, under TCG, a flush of the whole software TLB) each: 45 ms of the
//     boot here, to save a lock prefix that costs nothing under emulation.
//   - smolvm.lapic_hz: the APIC timer's rate, for the tuned kernel (100 ms).
func TCGKernelArgs() []string {
	var args []string
	if khz := hostTSCkHz(); khz > 0 {
		args = append(args, "tsc_early_khz="+strconv.Itoa(khz), "tsc=reliable")
	}
	return append(args, "noreplace-smp", "smolvm.lapic_hz="+strconv.Itoa(LAPICTimerHz))
}

// hostTSCkHz reads the first "cpu MHz" of /proc/cpuinfo, in kHz.
func hostTSCkHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return parseCPUMHz(b)
}

func parseCPUMHz(cpuinfo []byte) int {
	sc := bufio.NewScanner(bytes.NewReader(cpuinfo))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 {
			return 0
		}
		return int(mhz*1000 + 0.5)
	}
	return 0
}
