package smolvm_test

import (
	"context"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// BenchmarkCreateToFirstCommand is a VM's whole life: New, Run("true"),
// Close (stop + delete), with each phase reported in milliseconds.
func BenchmarkCreateToFirstCommand(b *testing.B) {
	home := testutil.Home(b)
	ctx := context.Background()
	var create, launch, first, total, stopDelete time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		vm, err := smolvm.New(ctx, smolvm.Config{Home: home, BootTimeout: testutil.BootTimeout})
		if err != nil {
			b.Fatal(err)
		}
		if res, err := vm.Run(ctx, "true"); err != nil || res.ExitCode != 0 {
			vm.Close()
			b.Fatalf("Run(true) = %+v, %v", res, err)
		}
		tm := vm.Timings()
		if err := vm.Close(); err != nil {
			b.Fatal(err)
		}
		create += tm.Create
		launch += tm.Launch
		first += tm.FirstCommand
		total += tm.CreateToFirstCommand
		stopDelete += vm.Timings().StopDelete
	}
	b.StopTimer()
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / float64(b.N) }
	b.ReportMetric(ms(create), "create-ms")
	b.ReportMetric(ms(launch), "launch-ms")
	b.ReportMetric(ms(first), "first-command-ms")
	b.ReportMetric(ms(total), "create-to-first-command-ms")
	b.ReportMetric(ms(stopDelete), "stop-delete-ms")
}

// BenchmarkWarmTrue is one warm command round trip on a booted VM.
func BenchmarkWarmTrue(b *testing.B) {
	vm := testutil.SharedVM(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if res, err := vm.Run(ctx, "true"); err != nil || res.ExitCode != 0 {
			b.Fatalf("Run(true) = %+v, %v", res, err)
		}
	}
}

// BenchmarkPing is the cheapest round trip to the guest agent.
func BenchmarkPing(b *testing.B) {
	vm := testutil.SharedVM(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := vm.Ping(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
