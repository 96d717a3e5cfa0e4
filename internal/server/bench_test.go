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
// The paths alternate; medians are reported as api-ms-median and
// library-ms-median (deletes are not timed).
//
//	go test -run XXX -bench CreateFirstOutput -benchtime 10x ./internal/server/
func BenchmarkCreateFirstOutput(b *testing.B) {
	home := warmHome(b)
	srv, err := New(Options{Home: home})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { cleanUp(b, "shut the server down", srv.Shutdown()) }()
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
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode >= 300 {
			b.Fatalf("POST %s: %d %s %v", path, resp.StatusCode, out, err)
		}
		return out
	}

	median := func(ds []time.Duration) float64 {
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Microseconds()) / 1000
	}
	// The two paths alternate, so that both see the same host load.
	b.Run("create-first-output", func(b *testing.B) {
		var api, lib []time.Duration
		for b.Loop() {
			t0 := time.Now()
			var sb sandboxJSON
			if err := json.Unmarshal(post("/v1/sandboxes", `{"timeout": -1}`), &sb); err != nil {
				b.Fatal(err)
			}
			var res execResult
			err := json.Unmarshal(post("/v1/sandboxes/"+sb.ID+"/exec", `{"command": "echo hi"}`), &res)
			api = append(api, time.Since(t0))
			if err != nil || res.Stdout != "hi\n" {
				b.Fatalf("exec: %v %+v", err, res)
			}
			b.StopTimer()
			if err := srv.Registry().Delete(ctx, sb.ID); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()

			t0 = time.Now()
			vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Persistent: true})
			if err != nil {
				b.Fatal(err)
			}
			out, err := vm.Run(ctx, "echo hi")
			lib = append(lib, time.Since(t0))
			if err != nil || string(out.Stdout) != "hi\n" {
				b.Fatalf("run: %v %+v", err, out)
			}
			b.StopTimer()
			if err := vm.Delete(ctx); err != nil {
				b.Fatal(err)
			}
			vm.Close()
			b.StartTimer()
		}
		b.ReportMetric(median(api), "api-ms-median")
		b.ReportMetric(median(lib), "library-ms-median")
	})

	sb, err := srv.Registry().Create(ctx, CreateRequest{Timeout: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { cleanUp(b, "delete the sandbox", srv.Registry().Delete(ctx, sb.ID)) }()
	vm, _ := srv.Registry().VM(ctx, sb.ID)
	b.Run("command", func(b *testing.B) {
		var api, lib []time.Duration
		for b.Loop() {
			t0 := time.Now()
			post("/v1/sandboxes/"+sb.ID+"/exec", `{"command": "true"}`)
			api = append(api, time.Since(t0))
			t0 = time.Now()
			if _, err := vm.Run(ctx, "true"); err != nil {
				b.Fatal(err)
			}
			lib = append(lib, time.Since(t0))
		}
		b.ReportMetric(median(api), "api-ms-median")
		b.ReportMetric(median(lib), "library-ms-median")
	})
}
