package server

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestV1ConcurrentCreates: 20 clients create a sandbox each at once and
// run a command in it; every one succeeds. The wall time is logged (the
// figure, not a threshold).
func TestV1ConcurrentCreates(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home})
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan string, n)
	ids := make(chan string, n)
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, b := ts.do("POST", "/v1/sandboxes", map[string]any{"metadata": map[string]string{"n": string(rune('a' + i))}, "timeout": -1})
			if status != 201 {
				errs <- string(b)
				return
			}
			var sb sandboxJSON
			if err := json.Unmarshal(b, &sb); err != nil {
				errs <- fmt.Sprintf("%v: %s", err, b)
				return
			}
			ids <- sb.ID
			status, b = ts.do("POST", sbPath(sb.ID, "/exec"), map[string]any{"command": "echo ok"})
			var res execResult
			if err := json.Unmarshal(b, &res); err != nil || status != 200 || res.Stdout != "ok\n" {
				errs <- fmt.Sprintf("%d %v: %s", status, err, b)
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	close(errs)
	close(ids)
	var created []string
	for id := range ids {
		created = append(created, id)
	}
	defer func() {
		var wg sync.WaitGroup
		for _, id := range created {
			wg.Go(func() { cleanUp(t, "delete sandbox "+id, ts.srv.Registry().Delete(context.Background(), id)) })
		}
		wg.Wait()
	}()
	failures := 0
	for e := range errs {
		failures++
		t.Errorf("a create or its command failed: %s", e)
	}
	t.Logf("%d concurrent creates + first command through /v1: wall %s, %d failures", n, wall.Round(time.Millisecond), failures)
	if len(created) != n {
		t.Errorf("%d sandboxes made, want %d", len(created), n)
	}
	var list struct{ Sandboxes []sandboxJSON }
	ts.must(200, "GET", "/v1/sandboxes", nil, &list)
	if len(list.Sandboxes) != n {
		t.Errorf("list: %d sandboxes", len(list.Sandboxes))
	}
}

// TestV1Capacity: past --max-sandboxes a create is 503 naming the limit;
// past the host's capacity (the library's ErrCapacity) too; neither
// leaves a VM or record behind.
func TestV1Capacity(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home, MaxSandboxes: 1})
	sb := ts.createSandbox(map[string]any{"timeout": -1})
	ts.wantError(503, "capacity", "POST", "/v1/sandboxes", map[string]any{}, "limit of 1 sandboxes", "--max-sandboxes")
	ts.must(204, "DELETE", sbPath(sb.ID), nil, nil)

	// The host's capacity: one VM in this process's limit.
	t.Setenv(smolvm.MaxVMsEnv, "1")
	ts2 := newTestServer(t, Options{Home: home})
	ts2.createSandbox(map[string]any{"timeout": -1})
	ts2.wantError(503, "capacity", "POST", "/v1/sandboxes", map[string]any{}, "capacity")
	vms, err := testutil.OpenHost(t, home).List(testutil.Context(t, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, in := range vms {
		names = append(names, in.Name)
	}
	sort.Strings(names)
	if len(names) != 1 {
		t.Errorf("VMs after the refused creates: %v", names)
	}
}
