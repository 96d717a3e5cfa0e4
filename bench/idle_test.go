package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestRunIdleValidates(t *testing.T) {
	for _, c := range [][]int{nil, {0}, {5, 2}} {
		if _, err := RunIdle(context.Background(), IdleOptions{Counts: c}); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("RunIdle(counts %v) = %v, want ErrInvalid", c, err)
		}
	}
}

// A bench the host's limits would stop halfway is refused before it
// makes any VM, naming the limits and how to lift them.
func TestRunIdleNeedsRoom(t *testing.T) {
	home := t.TempDir()
	t.Setenv(smolvm.MaxVMsEnv, "3")
	t.Setenv(smolvm.MaxMemoryMiBEnv, "-1")
	_, err := RunIdle(context.Background(), IdleOptions{Counts: []int{2, 4}, Home: home, Binary: "/nonexistent"})
	if !errors.Is(err, smolvm.ErrCapacity) || !strings.Contains(err.Error(), smolvm.MaxVMsEnv+"=-1") {
		t.Errorf("RunIdle(4 VMs, room for 3) = %v; want ErrCapacity naming %s=-1", err, smolvm.MaxVMsEnv)
	}
	t.Setenv(smolvm.MaxVMsEnv, "-1")
	t.Setenv(smolvm.MaxMemoryMiBEnv, "1024")
	if _, err := RunIdle(context.Background(), IdleOptions{Counts: []int{3}, Home: home, Binary: "/nonexistent"}); !errors.Is(err, smolvm.ErrCapacity) {
		t.Errorf("RunIdle(3 VMs, room for 1024 MiB) = %v; want ErrCapacity", err)
	}
}

func TestParseSchedstat(t *testing.T) {
	if d, err := parseSchedstat("123456789 42 7\n"); err != nil || d != 123456789 {
		t.Errorf("parseSchedstat = %v, %v", d, err)
	}
	for _, bad := range []string{"", "1 2", "x 2 3"} {
		if _, err := parseSchedstat(bad); err == nil {
			t.Errorf("parseSchedstat(%q) took it", bad)
		}
	}
	// This process's own threads: time on CPU is positive.
	if d, err := processCPU(os.Getpid()); err != nil || d <= 0 {
		t.Errorf("processCPU(self) = %v, %v", d, err)
	}
}

func TestReadMemory(t *testing.T) {
	kb := parseKBFields("Rss:     2048 kB\nPss:    1024 kB\nPss_Anon:  9 kB\nbad line\n", "Pss", "Rss")
	if kb["Pss"] != 1024 || kb["Rss"] != 2048 || len(kb) != 2 {
		t.Errorf("parseKBFields = %v", kb)
	}
	m, err := readMemory(os.Getpid())
	if err != nil || m.pss <= 0 || m.rss < m.pss {
		t.Errorf("readMemory(self) = %+v, %v", m, err)
	}
}

func TestSummarizePct(t *testing.T) {
	s := summarizePct([]float64{0.5, 0.1, 0.3, 0.2})
	if s.N != 4 || s.Min != 0.1 || s.Max != 0.5 || s.Median != 0.25 || s.P95 != 0.5 {
		t.Errorf("summarizePct = %+v", s)
	}
}

// TestRunIdle holds one, then two idle persistent VMs made by the smolvm
// binary, and checks the report's shape (never its figures) and that no VM
// is left behind.
func TestRunIdle(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("setup with the warm snapshot: %v", err)
	}
	rep, err := RunIdle(ctx, IdleOptions{Home: home, Binary: testutil.Binary(t), Counts: []int{1, 2},
		Window: time.Second, Settle: time.Second, ExecRuns: 2})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := rep.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Steps []struct {
			VMs       int             `json:"vms"`
			CPU       struct{ N int } `json:"cpu_pct"`
			PSS       float64         `json:"pss_mib_median"`
			Exec      struct{ N int } `json:"exec_true"`
			ExecAgain struct{ N int } `json:"exec_true_again"`
		} `json:"steps"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Steps) != 2 {
		t.Fatalf("steps: %s", b.String())
	}
	for i, s := range got.Steps {
		if s.VMs != i+1 || s.CPU.N != i+1 || s.PSS <= 0 || s.Exec.N != 2 || s.ExecAgain.N != 2 {
			t.Errorf("step %d: %+v", i, s)
		}
	}
	if err := rep.WriteTable(&bytes.Buffer{}); err != nil {
		t.Error(err)
	}
	vms, err := testutil.OpenHost(t, home).List(ctx)
	if err != nil || len(vms) != 0 {
		t.Errorf("left behind: %v, %v", vms, err)
	}
}
