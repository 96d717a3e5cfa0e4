package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestMain(m *testing.M) { testutil.Main(m) }

func TestRunValidates(t *testing.T) {
	ctx := context.Background()
	for _, o := range []Options{{VMs: 0}, {VMs: 1, Modes: []string{"warp"}}, {VMs: 1, WarmRuns: -1}, {VMs: 1, WarmNetwork: "slirp"}} {
		if _, err := Run(ctx, o); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("Run(%+v) = %v, want ErrInvalid", o, err)
		}
	}
}

// TestRunRestore runs the benchmark for real: two VMs restored from the
// warm snapshot, then the warm round trip. It checks the shape of the
// report, never the figures.
func TestRunRestore(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("setup with the warm snapshot: %v", err)
	}
	rep, err := Run(ctx, Options{Home: home, VMs: 2, Modes: []string{ModeRestore, ModePrelaunch}, WarmRuns: 5, NoSSH: true,
		BootTimeout: testutil.BootTimeout})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := rep.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Modes []struct {
			Mode   string `json:"mode"`
			Phases map[string]struct {
				N        int     `json:"n"`
				MedianMS float64 `json:"median_ms"`
			} `json:"phases"`
		} `json:"modes"`
		Warm struct {
			Ping struct {
				MedianMS float64 `json:"median_ms"`
			} `json:"ping"`
			True struct {
				MedianMS float64 `json:"median_ms"`
			} `json:"run_true"`
		} `json:"warm"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	// The prelaunch mode fails unless each VM was restored into a
	// prelaunched QEMU (see runner.create), so phases there prove it.
	if len(got.Modes) != 2 || got.Modes[0].Mode != ModeRestore || got.Modes[1].Mode != ModePrelaunch {
		t.Fatalf("modes: %s", b.String())
	}
	for _, m := range got.Modes {
		for _, k := range PhaseKeys() {
			p, ok := m.Phases[k]
			if !ok || p.N != 2 || p.MedianMS <= 0 {
				t.Errorf("%s: phase %s = %+v (present %v), want 2 samples with a positive median", m.Mode, k, p, ok)
			}
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(home, "spares")); len(ents) != 0 {
		t.Errorf("prelaunched QEMUs left after the bench: %v", ents)
	}
	if got.Warm.Ping.MedianMS <= 0 || got.Warm.True.MedianMS <= 0 {
		t.Errorf("warm round trip: %s", b.String())
	}
	infos, err := testutil.OpenHost(t, home).List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range infos {
		t.Errorf("VM left behind: %s (%s)", in.Name, in.State)
	}
}
