package smolvm_test

import (
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// BenchmarkPhasesRestore creates a VM from the warm snapshot (made here by
// Setup; testutil.Home has none), runs `true` and deletes it, per
// iteration, and reports the seed's phases as metrics. `smolvm bench` gives
// the full table; BenchmarkCreateToFirstCommand is the same life without a
// warm snapshot.
func BenchmarkPhasesRestore(b *testing.B) { benchPhases(b, false) }

// BenchmarkPhasesCold is BenchmarkPhasesRestore with a cold boot forced.
func BenchmarkPhasesCold(b *testing.B) { benchPhases(b, true) }

func benchPhases(b *testing.B, cold bool) {
	home := testutil.Home(b)
	ctx := testutil.Context(b, 30*time.Minute)
	if !cold {
		if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
			b.Fatalf("setup with the warm snapshot: %v", err)
		}
	}
	var create, firstCmd, stopDelete time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Cold: cold, BootTimeout: testutil.BootTimeout})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := vm.Run(ctx, "true"); err != nil {
			b.Fatal(err)
		}
		if err := vm.Delete(ctx); err != nil {
			b.Fatal(err)
		}
		t := vm.Timings()
		create += t.Create
		firstCmd += t.CreateToFirstCommand
		stopDelete += t.StopDelete
		if err := vm.Close(); err != nil {
			b.Fatal(err)
		}
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / n }
	b.ReportMetric(ms(create), "create-ms")
	b.ReportMetric(ms(firstCmd), "create-to-first-command-ms")
	b.ReportMetric(ms(stopDelete), "stop-delete-ms")
}
