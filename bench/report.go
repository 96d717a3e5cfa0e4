package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
	"time"
)

// The phases of one VM, in table order, as the seed's benchmark names them.
var phases = []struct{ Key, Label string }{
	{"create", "create"},
	{"launch", "launch"},
	{"first_command", "first command"},
	{"warm_command", "warm command"},
	{"stop_delete", "stop + delete"},
	{"create_to_first_command", "create → first command"},
	// The phases above end when the agent answers (as the seed's "first
	// command" does). A command's first run after that still translates
	// the guest's exec paths anew under emulation, so the first command's
	// output is also measured: the first `true`, and the whole wait.
	{"first_exec", "first exec (true)"},
	{"create_to_first_output", "create → first output"},
}

// PhaseKeys are the JSON names of the phases, in table order.
func PhaseKeys() []string {
	keys := make([]string, len(phases))
	for i, p := range phases {
		keys[i] = p.Key
	}
	return keys
}

// Report is the outcome of a benchmark run.
type Report struct {
	Command     string             `json:"command,omitempty"`
	Started     time.Time          `json:"started"`
	Host        Host               `json:"host"`
	VMsPerMode  int                `json:"vms_per_mode"`
	Modes       []*ModeResult      `json:"modes"`
	Warm        *WarmResult        `json:"warm,omitempty"`
	Concurrency *ConcurrencyResult `json:"concurrency,omitempty"`
}

// Host describes the machine the figures were taken on.
type Host struct {
	CPUs       int    `json:"cpus"`
	Accel      string `json:"accel,omitempty"`
	QEMU       string `json:"qemu,omitempty"`
	HostKernel string `json:"host_kernel,omitempty"`
	// LoadBefore and LoadAfter are the 1, 5 and 15 minute load averages.
	LoadBefore string `json:"load_before,omitempty"`
	LoadAfter  string `json:"load_after,omitempty"`
}

// ModeResult is one mode's VMs and their phase statistics.
type ModeResult struct {
	Mode        string           `json:"mode"`
	Description string           `json:"description,omitempty"`
	GuestKernel string           `json:"guest_kernel,omitempty"`
	Skipped     string           `json:"skipped,omitempty"`
	Error       string           `json:"error,omitempty"`
	Phases      map[string]Stats `json:"phases,omitempty"`
	// RSSMiB is the median resident memory of a VM's QEMU process after
	// its warm commands.
	RSSMiB float64    `json:"rss_mib_median,omitempty"`
	VMs    []VMResult `json:"vms,omitempty"`
}

// VMResult holds one VM's phases.
type VMResult struct {
	Name   string
	Phases map[string]time.Duration
	RSSMiB float64
}

// MarshalJSON writes the phases in milliseconds.
func (v VMResult) MarshalJSON() ([]byte, error) {
	m := make(map[string]float64, len(v.Phases))
	for k, d := range v.Phases {
		m[k] = ms(d)
	}
	return json.Marshal(struct {
		Name     string             `json:"name"`
		PhasesMS map[string]float64 `json:"phases_ms"`
		RSSMiB   float64            `json:"rss_mib,omitempty"`
	}{v.Name, m, math.Round(v.RSSMiB*10) / 10})
}

// WarmResult is the round trip of calls on one running VM.
type WarmResult struct {
	Runs int `json:"runs"`
	// Mode says how the VM was started (restore or cold).
	Mode  string     `json:"mode,omitempty"`
	Ping  Stats      `json:"ping"`
	True  Stats      `json:"run_true"`
	SSH   *SSHResult `json:"ssh,omitempty"`
	Error string     `json:"error,omitempty"`
}

// SSHResult is the same command's latency over SSH, or why it was not
// measured.
type SSHResult struct {
	Skipped string `json:"skipped,omitempty"`
	// Transport is how dbclient reached the guest's dropbear: "dropbear via
	// port forward, user-mode NIC" (the VM's NIC, as SmolVM's SSH) or
	// "dropbear via agent exec bridge" (a VM without a NIC).
	Transport string `json:"transport,omitempty"`
	// Path lists the hops of a connection.
	Path string `json:"path,omitempty"`
	Runs int    `json:"runs,omitempty"`
	True Stats  `json:"true"`
	// Ratio is the SSH median over the agent's median for `true`.
	Ratio float64 `json:"ratio_to_run_true,omitempty"`
}

// ConcurrencyResult is what N VMs created in parallel achieved.
type ConcurrencyResult struct {
	Concurrency int    `json:"concurrency"`
	VMs         int    `json:"vms"`
	Mode        string `json:"mode,omitempty"`
	// Busy is the wall time of the batches (create, a command, stop and
	// delete), without the pauses in which memory was measured.
	Busy         time.Duration    `json:"-"`
	VMsPerMinute float64          `json:"vms_per_minute"`
	RSSPerVMMiB  float64          `json:"rss_per_idle_vm_mib"`
	Phases       map[string]Stats `json:"phases,omitempty"`
	Error        string           `json:"error,omitempty"`
}

// MarshalJSON adds the busy time in milliseconds.
func (c ConcurrencyResult) MarshalJSON() ([]byte, error) {
	type plain ConcurrencyResult
	return json.Marshal(struct {
		plain
		BusyMS float64 `json:"busy_ms"`
	}{plain(c), ms(c.Busy)})
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// fmtMS formats a duration in milliseconds with the given decimals.
func fmtMS(d time.Duration, decimals int) string {
	return fmt.Sprintf("%.*f ms", decimals, float64(d)/1e6)
}

func statsRow(w io.Writer, label string, s Stats, decimals int) {
	fmt.Fprintf(w, "  %-24s %12s %12s %12s %12s\n", label,
		fmtMS(s.Min, decimals), fmtMS(s.Median, decimals), fmtMS(s.P95, decimals), fmtMS(s.Max, decimals))
}

func header(w io.Writer, first string) {
	fmt.Fprintf(w, "  %-24s %12s %12s %12s %12s\n", first, "min", "median", "p95", "max")
}

// WriteTable writes the report as aligned tables for a person.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	h := r.Host
	fmt.Fprintf(&b, "smolvm bench: %s per mode, %d CPUs", plural(r.VMsPerMode, "VM"), h.CPUs)
	if h.Accel != "" {
		fmt.Fprintf(&b, ", %s", h.Accel)
	}
	if h.QEMU != "" {
		fmt.Fprintf(&b, ", %s", h.QEMU)
	}
	if h.LoadBefore != "" {
		fmt.Fprintf(&b, ", load %s → %s", h.LoadBefore, h.LoadAfter)
	}
	b.WriteString("\n")
	for _, m := range r.Modes {
		b.WriteString("\n")
		title := m.Mode
		if m.Description != "" {
			title += " (" + m.Description + ")"
		}
		switch {
		case m.Skipped != "":
			fmt.Fprintf(&b, "%s: skipped: %s\n", title, m.Skipped)
			continue
		case len(m.Phases) == 0:
			fmt.Fprintf(&b, "%s: failed: %s\n", title, m.Error)
			continue
		}
		n := 0
		if s, ok := m.Phases["create"]; ok {
			n = s.N
		}
		fmt.Fprintf(&b, "%s, %s", title, plural(n, "VM"))
		if m.GuestKernel != "" {
			fmt.Fprintf(&b, ", guest kernel %s", m.GuestKernel)
		}
		if m.RSSMiB > 0 {
			fmt.Fprintf(&b, ", QEMU RSS %.0f MiB", m.RSSMiB)
		}
		b.WriteString("\n")
		header(&b, "phase")
		for _, p := range phases {
			if s, ok := m.Phases[p.Key]; ok {
				statsRow(&b, p.Label, s, 1)
			}
		}
		if m.Error != "" {
			fmt.Fprintf(&b, "  error: %s\n", m.Error)
		}
	}
	if wr := r.Warm; wr != nil {
		b.WriteString("\n")
		fmt.Fprintf(&b, "warm round trip on one VM")
		if wr.Mode != "" {
			fmt.Fprintf(&b, " (%s)", wr.Mode)
		}
		fmt.Fprintf(&b, ", %s each\n", plural(wr.Runs, "call"))
		if wr.Error != "" && wr.True.N == 0 {
			fmt.Fprintf(&b, "  failed: %s\n", wr.Error)
		} else {
			header(&b, "call")
			statsRow(&b, "ping (no-op)", wr.Ping, 3)
			statsRow(&b, "run \"true\"", wr.True, 3)
			if s := wr.SSH; s != nil {
				if s.Skipped != "" {
					fmt.Fprintf(&b, "  %-24s skipped: %s\n", "ssh \"true\"", s.Skipped)
				} else {
					statsRow(&b, "ssh \"true\"", s.True, 3)
					fmt.Fprintf(&b, "  ssh (%s): %s; %s; median %.1f× the agent's\n", s.Transport, s.Path, plural(s.Runs, "call"), s.Ratio)
				}
			}
			if wr.Error != "" {
				fmt.Fprintf(&b, "  error: %s\n", wr.Error)
			}
		}
	}
	if c := r.Concurrency; c != nil {
		b.WriteString("\n")
		fmt.Fprintf(&b, "concurrency %d", c.Concurrency)
		if c.Mode != "" {
			fmt.Fprintf(&b, " (%s)", c.Mode)
		}
		fmt.Fprintf(&b, ": %s in %s: %.1f VMs/minute, %.1f MiB host RSS per idle VM\n",
			plural(c.VMs, "VM"), fmtMS(c.Busy, 0), c.VMsPerMinute, c.RSSPerVMMiB)
		if len(c.Phases) > 0 {
			header(&b, "phase")
			for _, p := range phases {
				if s, ok := c.Phases[p.Key]; ok {
					statsRow(&b, p.Label, s, 1)
				}
			}
		}
		if c.Error != "" {
			fmt.Fprintf(&b, "  error: %s\n", c.Error)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
