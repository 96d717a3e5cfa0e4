package image

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
)

// GuestKernelArgs returns kernel command line arguments a guest needs on this
// host besides console and reboot settings.
//
// Under TCG the guest's TSC ticks at the host's TSC rate, and QEMU's microvm
// has no HPET or ACPI PM timer. The kernel's PIT based TSC calibration is
// timing sensitive; when the host is busy it fails ("tsc: Unable to calibrate
// against PIT", "Marking TSC unstable") and the boot hangs for good right
// after "APIC: Switch to symmetric I/O mode setup". Passing the frequency
// with tsc_early_khz skips that calibration. It returns nil when the host
// frequency is unknown.
func GuestKernelArgs() []string {
	if khz := hostTSCkHz(); khz > 0 {
		return []string{"tsc_early_khz=" + strconv.Itoa(khz)}
	}
	return nil
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
