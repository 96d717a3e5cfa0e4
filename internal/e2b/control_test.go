package e2b

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/smolvm/smolvm/internal/e2b/proto/process"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestControlBadInput: what a caller can get wrong ends in the status the
// SDK expects and a body whose code and message say what.
func TestControlBadInput(t *testing.T) {
	s := newAPIServer(t, time.Minute)
	for _, c := range []struct {
		name, key, method, path, body string
		status                        int
		says                          string
	}{
		{"wrong key", "nope", "GET", "/v2/sandboxes", "", 401, "invalid API key"},
		{"no key", "", "POST", "/v2/sandboxes", `{}`, 401, "invalid API key"},
		{"malformed JSON", testKey, "POST", "/v2/sandboxes", `{"templateID":`, 400, "malformed JSON"},
		{"unknown field", testKey, "POST", "/v2/sandboxes", `{"template":"base"}`, 400, "unknown field"},
		{"wrong type", testKey, "POST", "/v2/sandboxes", `{"timeout":"long"}`, 400, "malformed JSON"},
		{"two values", testKey, "POST", "/v2/sandboxes", `{} {}`, 400, "more than one value"},
		{"negative timeout", testKey, "POST", "/v2/sandboxes", `{"timeout":-5}`, 400, "timeout -5"},
		{"unsupported", testKey, "POST", "/v2/sandboxes", `{"mcp":{"x":1}}`, 400, "mcp is not supported"},
		{"bad env name", testKey, "POST", "/v2/sandboxes", `{"envVars":{"A=B":"c"}}`, 400, "envVars key"},
		{"big body", testKey, "POST", "/v2/sandboxes", `{"metadata":{"k":"` + strings.Repeat("x", maxBody) + `"}}`, 413, "larger than"},
		{"unknown template", testKey, "POST", "/v2/sandboxes", `{"templateID":"no-such-image"}`, 404, "no-such-image"},
		{"unknown sandbox", testKey, "GET", "/sandboxes/nosuchsandbox", "", 404, "nosuchsandbox"},
		{"kill unknown", testKey, "DELETE", "/sandboxes/nosuchsandbox", "", 404, "does not exist"},
		{"timeout unknown", testKey, "POST", "/sandboxes/nosuchsandbox/timeout", `{"timeout":10}`, 404, "does not exist"},
		{"timeout missing", testKey, "POST", "/sandboxes/nosuchsandbox/timeout", `{}`, 400, "timeout missing"},
		{"pause unknown", testKey, "POST", "/sandboxes/nosuchsandbox/pause", "", 404, "does not exist"},
		{"connect unknown", testKey, "POST", "/v2/sandboxes/nosuchsandbox/connect", `{"timeout":10}`, 404, "does not exist"},
		{"bad state", testKey, "GET", "/v2/sandboxes?state=sleeping", "", 400, "state \"sleeping\""},
		{"bad limit", testKey, "GET", "/v2/sandboxes?limit=0", "", 400, "limit"},
		{"bad token", testKey, "GET", "/v2/sandboxes?nextToken=!!", "", 400, "nextToken"},
		{"not offered", testKey, "POST", "/sandboxes/nosuchsandbox/snapshots", `{}`, 501, "not offered"},
	} {
		var e apiError
		st := s.callKey(c.key, c.method, c.path, c.body, &e)
		if st != c.status || e.Code != c.status || !strings.Contains(e.Message, c.says) {
			t.Errorf("%s: %d %+v; want %d with code %d saying %q", c.name, st, e, c.status, c.status, c.says)
		}
	}
	if list, _ := s.reg.List(t.Context(), nil); len(list) != 0 {
		t.Errorf("refused creates left sandboxes: %v", list)
	}
}

// TestControlPlane: create, get, list (metadata and state filters,
// paging), timeout, pause (envd refuses a paused sandbox), connect
// (resumes), kill, and a sandbox whose timeout passes.
func TestControlPlane(t *testing.T) {
	s := newAPIServer(t, 10*time.Minute)
	ctx := testutil.Context(t, 5*time.Minute)
	a := s.create(map[string]any{"templateID": "base", "timeout": 600, "metadata": map[string]string{"team": "a b&c", "n": "1"}})
	b := s.create(map[string]any{"timeout": 600, "metadata": map[string]string{"team": "other", "n": "2"}})
	if a.EnvdVersion != EnvdVersion || a.EnvdAccessToken == "" || a.TemplateID != "base" {
		t.Errorf("create: %+v", a)
	}

	var d detailJSON
	if st := s.call("GET", "/sandboxes/"+a.SandboxID, nil, &d); st != 200 || d.State != "running" || d.Metadata["team"] != "a b&c" ||
		d.CPUCount < 1 || d.MemoryMB < 64 || d.EndAt.Sub(d.StartedAt) < 9*time.Minute {
		t.Errorf("get: %d %+v", st, d)
	}

	var page []detailJSON
	// The SDK's encoding: URLSearchParams of encodeURIComponent'd pairs.
	if st := s.call("GET", "/v2/sandboxes?metadata=team%3Da%2520b%2526c", nil, &page); st != 200 || len(page) != 1 || page[0].SandboxID != a.SandboxID {
		t.Errorf("list by metadata: %d %+v", st, page)
	}
	req, _ := http.NewRequest("GET", s.url+"/v2/sandboxes?limit=1", nil)
	req.Header.Set("X-API-Key", testKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	next := resp.Header.Get("X-Next-Token")
	if next == "" {
		t.Fatal("a page of 1 of 2 sandboxes has no X-Next-Token")
	}
	if st := s.call("GET", "/v2/sandboxes?limit=1&nextToken="+next, nil, &page); st != 200 || len(page) != 1 || page[0].SandboxID != b.SandboxID {
		t.Errorf("second page: %d %+v", st, page)
	}

	if st := s.call("POST", "/sandboxes/"+a.SandboxID+"/timeout", map[string]any{"timeout": 1200}, nil); st != 204 {
		t.Errorf("set timeout: %d", st)
	}
	s.call("GET", "/sandboxes/"+a.SandboxID, nil, &d)
	if left := time.Until(d.EndAt); left < 19*time.Minute || left > 21*time.Minute {
		t.Errorf("after setTimeout(1200 s) the sandbox ends in %s", left)
	}

	if st := s.call("POST", "/sandboxes/"+a.SandboxID+"/pause", nil, nil); st != 204 {
		t.Fatalf("pause: %d", st)
	}
	var e apiError
	if st := s.call("POST", "/sandboxes/"+a.SandboxID+"/pause", nil, &e); st != 409 || e.Code != 409 {
		t.Errorf("second pause: %d %+v, want 409 with code", st, e)
	}
	if st := s.call("GET", "/v2/sandboxes?state=paused", nil, &page); st != 200 || len(page) != 1 || page[0].SandboxID != a.SandboxID {
		t.Errorf("list paused: %d %+v", st, page)
	}
	c := s.envd(a)
	if _, err := c.proc.List(ctx, connect.NewRequest(&pb.ListRequest{})); connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "paused") {
		t.Errorf("envd of a paused sandbox: %v, want Unavailable saying paused", err)
	}
	var sb sandboxJSON
	if st := s.call("POST", "/v2/sandboxes/"+a.SandboxID+"/connect", map[string]any{"timeout": 600}, &sb); st != 201 || sb.EnvdAccessToken != a.EnvdAccessToken {
		t.Errorf("connect to a paused sandbox: %d %+v, want 201 and its token", st, sb)
	}
	st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: bash("echo resumed")}))
	if err != nil {
		t.Fatal(err)
	}
	if r, err := collect(t, st); err != nil || r.stdout != "resumed\n" {
		t.Errorf("after connect: %q %v", r.stdout, err)
	}
	if st := s.call("POST", "/sandboxes/"+a.SandboxID+"/connect", map[string]any{"timeout": 600}, &sb); st != 200 {
		t.Errorf("connect to a running sandbox: %d, want 200", st)
	}

	if st := s.call("DELETE", "/sandboxes/"+a.SandboxID, nil, nil); st != 204 {
		t.Errorf("kill: %d", st)
	}
	if st := s.call("GET", "/sandboxes/"+a.SandboxID, nil, &e); st != 404 || e.Code != 404 {
		t.Errorf("get after kill: %d %+v", st, e)
	}

	// A sandbox whose timeout passes is deleted.
	short := s.create(map[string]any{"timeout": 1})
	if err := testutil.Poll(2*time.Minute, func() bool {
		return s.call("GET", "/sandboxes/"+short.SandboxID, nil, nil) == 404
	}); err != nil {
		t.Errorf("sandbox with a 1 s timeout still there: %v", err)
	}
	if _, err := s.envd(short).proc.List(ctx, connect.NewRequest(&pb.ListRequest{})); connect.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("envd of an expired sandbox: %v, want Unavailable", err)
	}

	// With autoPause (the SDK's lifecycle onTimeout 'pause') it is paused
	// instead, and connect resumes it.
	ap := s.create(map[string]any{"timeout": 1, "autoPause": true})
	if err := testutil.Poll(2*time.Minute, func() bool {
		return s.call("GET", "/sandboxes/"+ap.SandboxID, nil, &d) == 200 && d.State == "paused"
	}); err != nil {
		t.Errorf("autoPause sandbox after its timeout: %+v, want paused", d)
	}
	if st := s.call("POST", "/v2/sandboxes/"+ap.SandboxID+"/connect", map[string]any{"timeout": 600}, &sb); st != 201 {
		t.Errorf("connect to an auto-paused sandbox: %d, want 201", st)
	}
	st, err = s.envd(ap).proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: bash("echo back")}))
	if err != nil {
		t.Fatal(err)
	}
	if r, err := collect(t, st); err != nil || r.stdout != "back\n" {
		t.Errorf("after resuming an auto-paused sandbox: %q %v", r.stdout, err)
	}
}
