package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/leaks"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestSoakValidates(t *testing.T) {
	ctx := context.Background()
	for _, o := range []SoakOptions{{Cycles: 0}, {Cycles: 1, Mode: "forever"}} {
		if _, err := Soak(ctx, o); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("Soak(%+v) = %v, want ErrInvalid", o, err)
		}
	}
}

// TestSoak is the soak as CI runs it, short: create (a restore of the warm
// snapshot) → exec → delete, 20 times with VMs in this process and 5 times
// with persistent ones (a supervisor process each), with no failure and
// nothing left behind (`smolvm bench --soak 1000` runs it whole).
func TestSoak(t *testing.T) {
	home := testutil.Home(t)
	testutil.Binary(t) // persistent VMs' supervisors
	ctx := testutil.Context(t, 15*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("setup with the warm snapshot: %v", err)
	}
	for _, tc := range []struct {
		mode   string
		cycles int
	}{{SoakLibrary, 20}, {SoakPersistent, 5}} {
		t.Run(tc.mode, func(t *testing.T) {
			rep, err := Soak(ctx, SoakOptions{Home: home, Cycles: tc.cycles, Mode: tc.mode, BootTimeout: testutil.BootTimeout})
			if rep == nil {
				t.Fatal(err)
			}
			var b bytes.Buffer
			if werr := rep.WriteTable(&b); werr != nil {
				t.Fatal(werr)
			}
			t.Logf("\n%s", b.String())
			if err != nil {
				t.Fatal(err)
			}
			if rep.Done != tc.cycles || rep.Failures != 0 || rep.Restored != tc.cycles {
				t.Errorf("cycles %d, failures %d, restored %d; want %d, 0, %d", rep.Done, rep.Failures, rep.Restored, tc.cycles, tc.cycles)
			}
			if rep.All.N != tc.cycles || rep.First.N != tc.cycles || rep.Last.N != tc.cycles || rep.First.Median <= 0 {
				t.Errorf("time per cycle: first %+v, last %+v, all %+v", rep.First, rep.Last, rep.All)
			}
			for _, k := range leaks.Kinds {
				if n, ok := rep.Leaks[k]; !ok || n != 0 {
					t.Errorf("leaks of %s: %d (reported %v), want 0", k, n, ok)
				}
			}
			b.Reset()
			if err := rep.WriteJSON(&b); err != nil {
				t.Fatal(err)
			}
			var got struct {
				Cycles int            `json:"cycles"`
				Leaks  map[string]int `json:"leaks"`
				Last   struct {
					MedianMS float64 `json:"median_ms"`
				} `json:"last"`
			}
			if err := json.Unmarshal(b.Bytes(), &got); err != nil || got.Cycles != tc.cycles || len(got.Leaks) != len(leaks.Kinds) || got.Last.MedianMS <= 0 {
				t.Errorf("JSON report (%v): %s", err, b.String())
			}
		})
	}
}
