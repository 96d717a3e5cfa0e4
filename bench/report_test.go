package bench

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func sampleReport() *Report {
	ms := time.Millisecond
	st := func(min, med, p95, max time.Duration) Stats {
		return Stats{N: 10, Min: min, Median: med, P95: p95, Max: max}
	}
	phasesOf := func(scale time.Duration) map[string]Stats {
		m := map[string]Stats{}
		for i, k := range PhaseKeys() {
			d := time.Duration(i+1) * scale
			m[k] = st(d, d+ms, d+2*ms, d+3*ms)
		}
		return m
	}
	return &Report{
		Command: "smolvm bench --vms 10", VMsPerMode: 10,
		Host: Host{CPUs: 2, Accel: "tcg", QEMU: "QEMU 7.2.22", LoadBefore: "0.10 0.20 0.30", LoadAfter: "1.00 0.50 0.40"},
		Modes: []*ModeResult{
			{Mode: ModeCold, Description: "stock kernel, cold boot", GuestKernel: "6.1.0-56-cloud-amd64", Phases: phasesOf(100 * ms), RSSMiB: 130,
				VMs: []VMResult{{Name: "bench-1-cold-1", Phases: map[string]time.Duration{"create": 1500 * time.Microsecond}, RSSMiB: 129.96}}},
			{Mode: ModeRestore, Description: "restore of the warm snapshot", Phases: phasesOf(10 * ms)},
			{Mode: ModeTuned, Description: "tuned kernel, cold boot", Skipped: "no tuned kernel (run 'smolvm kernel build')"},
		},
		Warm: &WarmResult{Runs: 50, Mode: ModeRestore,
			Ping: st(100*time.Microsecond, 250*time.Microsecond, 400*time.Microsecond, time.Millisecond),
			True: st(4*ms, 5123*time.Microsecond, 9*ms, 12*ms),
			SSH: &SSHResult{Transport: "dropbear via port forward, user-mode NIC", Path: "dbclient → host 127.0.0.1:40000 → guest eth0 :2222 → dropbear",
				Runs: 20, True: st(150*ms, 200*ms, 300*ms, 400*ms), Ratio: 39.04}},
		Concurrency: &ConcurrencyResult{Concurrency: 2, VMs: 4, Mode: ModeRestore, Busy: 3 * time.Second, VMsPerMinute: 80, RSSPerVMMiB: 512.25},
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"smolvm bench: 10 VMs per mode, 2 CPUs, tcg, QEMU 7.2.22, load 0.10 0.20 0.30 → 1.00 0.50 0.40",
		"cold (stock kernel, cold boot), 10 VMs, guest kernel 6.1.0-56-cloud-amd64, QEMU RSS 130 MiB",
		"  create                       100.0 ms     101.0 ms     102.0 ms     103.0 ms",
		"  create → first command       600.0 ms     601.0 ms     602.0 ms     603.0 ms",
		"  create → first command        60.0 ms      61.0 ms      62.0 ms      63.0 ms",
		"tuned (tuned kernel, cold boot): skipped: no tuned kernel (run 'smolvm kernel build')",
		"warm round trip on one VM (restore), 50 calls each",
		"  ping (no-op)                 0.100 ms     0.250 ms     0.400 ms     1.000 ms",
		"  run \"true\"                   4.000 ms     5.123 ms     9.000 ms    12.000 ms",
		"  ssh \"true\"                 150.000 ms   200.000 ms   300.000 ms   400.000 ms",
		"  ssh (dropbear via port forward, user-mode NIC): dbclient → host 127.0.0.1:40000 → guest eth0 :2222 → dropbear; 20 calls; median 39.0× the agent's",
		"concurrency 2 (restore): 4 VMs in 3000 ms: 80.0 VMs/minute, 512.2 MiB host RSS per idle VM",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	// Phase rows come in the seed's order, and the columns line up.
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "  ") && strings.HasSuffix(l, " ms") {
			lines = append(lines, l)
		}
	}
	for _, l := range lines {
		if n := len([]rune(l)); n != len([]rune(lines[0])) {
			t.Errorf("row %q is %d runes wide, the first %d", l, n, len([]rune(lines[0])))
		}
	}
	order := []string{"create ", "launch", "first command", "warm command", "stop + delete", "create → first command"}
	last := -1
	for _, p := range order {
		i := strings.Index(out, "  "+p)
		if i <= last {
			t.Errorf("phase %q out of order", p)
		}
		last = i
	}
}

func TestWriteTableSkippedSSHAndFailedMode(t *testing.T) {
	r := sampleReport()
	r.Warm.SSH = &SSHResult{Skipped: "dbclient not found on the host"}
	r.Modes[1] = &ModeResult{Mode: ModeRestore, Error: "boom"}
	var b bytes.Buffer
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ssh \"true\"               skipped: dbclient not found on the host", "restore: failed: boom"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

func TestWriteJSON(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Command string `json:"command"`
		Host    Host   `json:"host"`
		Modes   []struct {
			Mode    string                     `json:"mode"`
			Skipped string                     `json:"skipped"`
			RSS     float64                    `json:"rss_mib_median"`
			Phases  map[string]json.RawMessage `json:"phases"`
			VMs     []struct {
				Name     string             `json:"name"`
				PhasesMS map[string]float64 `json:"phases_ms"`
				RSSMiB   float64            `json:"rss_mib"`
			} `json:"vms"`
		} `json:"modes"`
		Warm struct {
			Ping Stats `json:"ping"`
			SSH  struct {
				Transport string  `json:"transport"`
				Path      string  `json:"path"`
				True      Stats   `json:"true"`
				Ratio     float64 `json:"ratio_to_run_true"`
			} `json:"ssh"`
		} `json:"warm"`
		Concurrency map[string]any `json:"concurrency"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatalf("%v:\n%s", err, b.String())
	}
	if got.Command != "smolvm bench --vms 10" || got.Host.Accel != "tcg" || got.Host.LoadAfter != "1.00 0.50 0.40" {
		t.Errorf("header = %q %+v", got.Command, got.Host)
	}
	if len(got.Modes) != 3 || got.Modes[2].Skipped == "" || got.Modes[2].Phases != nil {
		t.Fatalf("modes = %+v", got.Modes)
	}
	for _, k := range PhaseKeys() {
		raw, ok := got.Modes[0].Phases[k]
		if !ok {
			t.Errorf("cold lacks phase %q", k)
			continue
		}
		var s map[string]float64
		if err := json.Unmarshal(raw, &s); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"n", "min_ms", "median_ms", "p95_ms", "max_ms"} {
			if _, ok := s[f]; !ok {
				t.Errorf("phase %q lacks %q: %s", k, f, raw)
			}
		}
	}
	if v := got.Modes[0].VMs[0]; v.Name != "bench-1-cold-1" || v.PhasesMS["create"] != 1.5 || v.RSSMiB != 130 {
		t.Errorf("vm = %+v", v)
	}
	if got.Warm.Ping.Median != 250*time.Microsecond || got.Warm.SSH.True.Median != 200*time.Millisecond || got.Warm.SSH.Ratio != 39.04 ||
		got.Warm.SSH.Transport != "dropbear via port forward, user-mode NIC" || !strings.HasPrefix(got.Warm.SSH.Path, "dbclient → host 127.0.0.1:40000") {
		t.Errorf("warm = %+v", got.Warm)
	}
	if got.Concurrency["vms_per_minute"] != 80.0 || got.Concurrency["busy_ms"] != 3000.0 || got.Concurrency["mode"] != "restore" {
		t.Errorf("concurrency = %v", got.Concurrency)
	}
}
