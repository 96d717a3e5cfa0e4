package server

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
)

// BenchmarkCreateFirstOutput: create → the first command's output, through
// /v1 (POST /v1/sandboxes, POST …/exec) next to the library doing the same
// (smolvm.New of a persistent VM, as the registry makes them, and
// vm.Run), then the per-command cost of each path on a running sandbox.
// Medians are reported as ms-median (deletes are not timed).
//
//	go test -run XXX -bench CreateFirstOutput -benchtime 10x ./internal/server/
func BenchmarkCreateFirstOutput(b *testing.B) {
	home := warmHome(b)
	srv, err := New(Options{Home: home})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Shutdown()
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	ctx := context.Background()
	post := func(path, body string) []byte {
		resp, err := hs.Client().Post(hs.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		var out json.RawMessage
		json.NewDecoder(resp.Body).Decode(&out)
		if resp.StatusCode >= 300 {
			b.Fatalf("POST %s: %d %s", path, resp.StatusCode, out)
		}
		return out
	}
	median := func(b *testing.B, ds []time.Duration) {
		slices.Sort(ds)
		b.ReportMetric(float64(ds[len(ds)/2].Microseconds())/1000, "ms-median")
	}

	b.Run("api", func(b *testing.B) {
		var ds []time.Duration
		for b.Loop() {
			t0 := time.Now()
			var sb sandboxJSON
			json.Unmarshal(post("/v1/sandboxes", `{"timeout": -1}`), &sb)
			var res execResult
			json.Unmarshal(post("/v1/sandboxes/"+sb.ID+"/exec", `{"command": "echo hi"}`), &res)
			ds = append(ds, time.Since(t0))
			if res.Stdout != "hi\n" {
				b.Fatalf("exec: %+v", res)
			}
			b.StopTimer()
			srv.Registry().Delete(ctx, sb.ID)
			b.StartTimer()
		}
		median(b, ds)
	})
	b.Run("library", func(b *testing.B) {
		var ds []time.Duration
		for b.Loop() {
			t0 := time.Now()
			vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Persistent: true})
			if err != nil {
				b.Fatal(err)
			}
			res, err := vm.Run(ctx, "echo hi")
			ds = append(ds, time.Since(t0))
			if err != nil || string(res.Stdout) != "hi\n" {
				b.Fatalf("run: %v %+v", err, res)
			}
			b.StopTimer()
			vm.Delete(ctx)
			vm.Close()
			b.StartTimer()
		}
		median(b, ds)
	})

	sb, err := srv.Registry().Create(ctx, CreateRequest{Timeout: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Registry().Delete(ctx, sb.ID)
	vm, _ := srv.Registry().VM(ctx, sb.ID)
	b.Run("command-api", func(b *testing.B) {
		var ds []time.Duration
		for b.Loop() {
			t0 := time.Now()
			post("/v1/sandboxes/"+sb.ID+"/exec", `{"command": "true"}`)
			ds = append(ds, time.Since(t0))
		}
		median(b, ds)
	})
	b.Run("command-library", func(b *testing.B) {
		var ds []time.Duration
		for b.Loop() {
			t0 := time.Now()
			if _, err := vm.Run(ctx, "true"); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t0))
		}
		median(b, ds)
	})
}
