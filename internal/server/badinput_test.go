package server

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestV1BadInput: what a client can get wrong ends in the right status, a
// message that names the cause, and nothing made (no sandbox, no record).
func TestV1BadInput(t *testing.T) {
	home := t.TempDir()
	ts := newTestServer(t, Options{Home: home})
	for _, c := range []struct {
		name, method, path string
		body               any
		status             int
		code               string
		msgs               []string
	}{
		{"malformed JSON", "POST", "/v1/sandboxes", `{"cpus": 1,`, 400, "invalid", []string{"JSON"}},
		{"not JSON", "POST", "/v1/sandboxes", `cpus=1`, 400, "invalid", []string{"malformed JSON"}},
		{"unknown field", "POST", "/v1/sandboxes", `{"cpu": 1}`, 400, "invalid", []string{`unknown field "cpu"`}},
		{"wrong type", "POST", "/v1/sandboxes", `{"cpus": "two"}`, 400, "invalid", []string{`"cpus"`, "number"}},
		{"wrong type nested", "POST", "/v1/sandboxes", `{"metadata": {"a": 1}}`, 400, "invalid", []string{"metadata", "string"}},
		{"two values", "POST", "/v1/sandboxes", `{} {}`, 400, "invalid", []string{"more data"}},
		{"empty body", "POST", "/v1/sandboxes", "", 400, "invalid", []string{"JSON body"}},
		{"bad network", "POST", "/v1/sandboxes", `{"network": "bridge"}`, 400, "invalid", []string{"user, none or tap"}},
		{"bad timeout", "POST", "/v1/sandboxes", `{"timeout": -5}`, 400, "invalid", []string{"timeout"}},
		{"hosts without address", "POST", "/v1/sandboxes", `{"hosts": {"app": []}}`, 400, "invalid", []string{`"app"`, "1 to 8"}},
		{"hosts wrong type", "POST", "/v1/sandboxes", `{"hosts": {"app": "127.0.0.1"}}`, 400, "invalid", []string{"hosts"}},
		{"hosts to the loopback, not allowed", "POST", "/v1/sandboxes", `{"hosts": {"app": ["127.0.0.1"]}}`, 400, "invalid", []string{"app", "--allow-host-loopback"}},
		{"oversized body", "POST", "/v1/sandboxes", `{"metadata": {"a": "` + strings.Repeat("x", maxJSONBody) + `"}}`, 413, "too_large", []string{"larger than"}},
		{"bad label", "GET", "/v1/sandboxes?label=novalue", nil, 400, "invalid", []string{"KEY=VALUE"}},
		{"unknown id", "GET", "/v1/sandboxes/nosuch", nil, 404, "not_found", []string{`"nosuch"`}},
		{"unknown id delete", "DELETE", "/v1/sandboxes/nosuch", nil, 404, "not_found", nil},
		{"unknown id exec", "POST", "/v1/sandboxes/nosuch/exec", `{"command": "true"}`, 404, "not_found", nil},
		{"unknown id pause", "POST", "/v1/sandboxes/nosuch/pause", nil, 404, "not_found", nil},
		{"exec without command", "POST", "/v1/sandboxes/nosuch/exec", `{}`, 400, "invalid", []string{"command", "argv"}},
		{"exec tty buffered", "POST", "/v1/sandboxes/nosuch/exec", `{"command": "true", "tty": true}`, 400, "invalid", []string{"stream"}},
		{"relative path", "GET", "/v1/sandboxes/nosuch/files?path=etc/passwd", nil, 400, "invalid", []string{"absolute"}},
		{"no path", "GET", "/v1/sandboxes/nosuch/files/stat", nil, 400, "invalid", []string{"?path="}},
		{"bad mode", "PUT", "/v1/sandboxes/nosuch/files?path=/x&mode=rw", []byte("x"), 400, "invalid", []string{"octal"}},
		{"bad port", "DELETE", "/v1/sandboxes/nosuch/ports/http", nil, 400, "invalid", []string{"1 to 65535"}},
		{"unknown route", "GET", "/v1/nothing", nil, 404, "not_found", []string{"openapi.json"}},
		{"unknown snapshot", "DELETE", "/v1/snapshots/nosuch", nil, 404, "not_found", nil},
		{"restore unknown snapshot", "POST", "/v1/snapshots/nosuch/restore", nil, 404, "not_found", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			ts.t = t
			ts.wantError(c.status, c.code, c.method, c.path, c.body, c.msgs...)
		})
	}
	ts.t = t
	if list, _ := ts.srv.Registry().List(t.Context(), nil); len(list) != 0 {
		t.Errorf("sandboxes made: %v", list)
	}
	if ents, _ := os.ReadDir(filepath.Join(home, "server", "sandboxes")); len(ents) != 0 {
		t.Errorf("records left: %v", ents)
	}
}

// TestV1Key: a missing or wrong key is 401 on every /v1 call but the
// document; the right one passes.
func TestV1Key(t *testing.T) {
	ts := newTestServer(t, Options{Home: t.TempDir()})
	for _, key := range []string{"", "wrong", testKey + "x", strings.ToUpper(testKey)} {
		for _, p := range []string{"/v1/sandboxes", "/v1/images", "/v1/sandboxes/x/files?path=/etc/passwd"} {
			resp := ts.send("GET", p, nil, key)
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("GET %s with key %q: %d, want 401", p, key, resp.StatusCode)
			}
		}
	}
	ts.must(200, "GET", "/v1/sandboxes", nil, nil)
	resp := ts.send("GET", "/v1/openapi.json", nil, "")
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("the document without a key: %d", resp.StatusCode)
	}
	ts.key = "wrong"
	ts.wantError(401, "unauthorized", "GET", "/v1/sandboxes", nil, "Authorization: Bearer")
}
