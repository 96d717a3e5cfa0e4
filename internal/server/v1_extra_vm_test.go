package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// noSandboxes fails the test when the server's registry or its home holds
// a sandbox or a VM (a refused creation leaves nothing).
func (ts *testServer) noSandboxes(home string) {
	ts.t.Helper()
	var list struct{ Sandboxes []sandboxJSON }
	ts.must(200, "GET", "/v1/sandboxes", nil, &list)
	if len(list.Sandboxes) != 0 {
		ts.t.Errorf("sandboxes left: %+v", list.Sandboxes)
	}
	vms, err := testutil.OpenHost(ts.t, home).List(context.Background())
	if err != nil {
		ts.t.Fatal(err)
	}
	for _, vm := range vms {
		ts.t.Errorf("VM left: %s", vm.Name)
	}
}

// TestV1MountsRefused: without --allow-mount every mount is refused with
// what to do; with it, a host path outside the allowed folder, a symbolic
// link inside it that points out, a relative or missing path are refused,
// and none of them leaves a sandbox or a VM. No guest boots: the refusals
// come first.
func TestV1MountsRefused(t *testing.T) {
	home := warmHome(t)
	allowed, outside := t.TempDir(), t.TempDir()
	if err := os.Symlink(outside, filepath.Join(allowed, "out")); err != nil {
		t.Fatal(err)
	}
	mount := func(host string) map[string]any {
		return map[string]any{"mounts": []map[string]any{{"host_path": host, "guest_path": "/mnt/project"}}}
	}

	ts := newTestServer(t, Options{Home: home})
	ts.wantError(400, "invalid", "POST", "/v1/sandboxes", mount(allowed), "--allow-mount")
	ts.noSandboxes(home)

	ts = newTestServer(t, Options{Home: home, AllowMounts: []string{allowed}})
	for name, host := range map[string]string{
		"outside":          outside,
		"symlink out":      filepath.Join(allowed, "out"),
		"dot-dot":          allowed + "/../" + filepath.Base(outside),
		"relative":         "project",
		"missing":          filepath.Join(allowed, "missing"),
		"allowed's parent": filepath.Dir(allowed),
	} {
		t.Run(name, func(t *testing.T) {
			ts.t = t
			ts.wantError(400, "invalid", "POST", "/v1/sandboxes", mount(host), "host_path")
			ts.noSandboxes(home)
		})
	}
	if _, err := New(Options{Home: home, AllowMounts: []string{filepath.Join(allowed, "missing")}}); err == nil {
		t.Error("a server allowing mounts under a missing folder started")
	}
}

// TestV1MountSwapped: a folder under the allowed one that is swapped for
// a link to a folder outside after the server checked it (by a hook
// here; by anyone who can write in the allowed folder, such as another
// sandbox with it mounted writable, in life) is refused, and nothing is
// left: the library checks it again within the allowed folder, and opens
// it from there without following links when it binds it (the root
// package's TestMountSwappedForLink swaps it after that check too).
func TestV1MountSwapped(t *testing.T) {
	home := warmHome(t)
	allowed, outside := t.TempDir(), t.TempDir()
	dir := filepath.Join(allowed, "project")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "in"), []byte("outside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	afterMountCheck = func([]smolvm.Mount) {
		if err := os.Rename(dir, dir+".old"); err != nil {
			t.Error(err)
		}
		if err := os.Symlink(outside, dir); err != nil {
			t.Error(err)
		}
	}
	t.Cleanup(func() { afterMountCheck = nil })
	ts := newTestServer(t, Options{Home: home, AllowMounts: []string{allowed}})
	status, body := ts.do("POST", "/v1/sandboxes", map[string]any{"timeout": 600,
		"mounts": []map[string]any{{"host_path": dir, "guest_path": "/mnt/project"}}})
	if status == 201 {
		var sb sandboxJSON
		if err := json.Unmarshal(body, &sb); err != nil {
			t.Fatal(err)
		}
		res := ts.run(sb.ID, map[string]any{"command": "cat /mnt/project/in"})
		ts.must(204, "DELETE", sbPath(sb.ID, ""), nil, nil)
		t.Fatalf("a folder swapped for a link after the check was mounted: the guest reads %q", res.Stdout)
	}
	if status != 400 || !strings.Contains(string(body), "not within") {
		t.Errorf("create: %d %s; want 400 naming the folder as not within the allowed one", status, body)
	}
	ts.noSandboxes(home)
}

// TestV1Mounts: a folder under the allowed one, mounted read-only by
// default, is read from a real guest through exec and cannot be written
// there, not even by root; a writable one shows the guest's write on the
// host.
func TestV1Mounts(t *testing.T) {
	home := warmHome(t)
	allowed := t.TempDir()
	ro, rw := filepath.Join(allowed, "ro"), filepath.Join(allowed, "rw")
	for _, d := range []string{ro, rw} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(ro, "hello.txt"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ts := newTestServer(t, Options{Home: home, AllowMounts: []string{allowed}})
	sb := ts.createSandbox(map[string]any{"timeout": 600, "mounts": []map[string]any{
		{"host_path": ro, "guest_path": "/mnt/ro"},
		{"host_path": rw, "guest_path": "/mnt/rw", "read_only": false},
	}})
	res := ts.run(sb.ID, map[string]any{"command": "cat /mnt/ro/hello.txt"})
	if res.ExitCode != 0 || res.Stdout != "from the host\n" {
		t.Errorf("read through the mount: %+v", res)
	}
	res = ts.run(sb.ID, map[string]any{"command": "id -u; echo x > /mnt/ro/new.txt"})
	if res.ExitCode == 0 || res.Stdout != "0\n" {
		t.Errorf("root wrote to the read-only mount: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(ro, "new.txt")); err == nil {
		t.Error("the guest's write reached the read-only folder")
	}
	res = ts.run(sb.ID, map[string]any{"command": "echo back > /mnt/rw/out.txt"})
	if b, err := os.ReadFile(filepath.Join(rw, "out.txt")); res.ExitCode != 0 || err != nil || string(b) != "back\n" {
		t.Errorf("write through the writable mount: %+v; on the host: %q, %v", res, b, err)
	}
}

// TestV1BrowserRefused: the browser calls on a sandbox without chromium
// and on a server without the browser image answer with what to do, and
// leave nothing behind.
func TestV1BrowserRefused(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home})
	ts.wantError(404, "not_found", "POST", sbPath("nosuchsandbox", "/browser"), nil)
	ts.wantError(404, "not_found", "GET", sbPath("nosuchsandbox", "/browser"), nil)
	ts.wantError(404, "not_found", "DELETE", sbPath("nosuchsandbox", "/browser"), nil)
	if _, err := testutil.OpenHost(t, home).InspectImage(context.Background(), smolvm.BrowserImage); err != nil {
		ts.wantError(404, "not_found", "POST", "/v1/sandboxes", map[string]any{"image": smolvm.BrowserImage}, "smolvm image build browser")
		ts.noSandboxes(home)
	}

	sb := ts.createSandbox(map[string]any{"timeout": 600})
	ts.wantError(400, "invalid", "POST", sbPath(sb.ID, "/browser"), nil, "no chromium", "smolvm image build browser", `"image": "browser"`)
	ts.wantError(409, "not_running", "GET", sbPath(sb.ID, "/browser"), nil, "POST /v1/sandboxes/"+sb.ID+"/browser")
	ts.wantError(409, "not_running", "POST", sbPath(sb.ID, "/browser/screenshot"), map[string]any{"url": "about:blank"}, "POST /v1/sandboxes/"+sb.ID+"/browser")
	ts.wantError(400, "invalid", "POST", sbPath(sb.ID, "/browser/screenshot"), map[string]any{"url": "about:blank", "width": 9000})
	ts.must(204, "DELETE", sbPath(sb.ID, "/browser"), nil, nil)
	var ports struct{ Ports []smolvm.PortForward }
	ts.must(200, "GET", sbPath(sb.ID, "/ports"), nil, &ports)
	if len(ports.Ports) != 0 {
		t.Errorf("forwards left by the refused start: %+v", ports.Ports)
	}
}

// TestV1Browser drives the browser of a sandbox of the browser image
// through /v1: start (ws_url and DevTools answering on the host), state,
// a screenshot of a page the test serves on the host's loopback (as
// web.test, mapped with "hosts") decoded as a PNG of the asked size,
// stop (DevTools gone). The image is built (or taken from
// the test cache) as the root package's browser tests do.
func TestV1Browser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("building the browser image needs root")
	}
	if _, err := os.Stat("/usr/bin/mmdebstrap"); err != nil {
		t.Skip("mmdebstrap not installed (apt-get install mmdebstrap)")
	}
	home := testutil.Home(t)
	var prog bytes.Buffer
	if _, err := smolvm.BuildImage(testutil.Context(t, 45*time.Minute), smolvm.BuildOptions{Home: home, Name: smolvm.BrowserImage, Progress: &prog}); err != nil {
		t.Fatalf("build the browser image: %v\n%s", err, prog.String())
	}
	ts := newTestServer(t, Options{Home: home, AllowHostLoopback: true})
	// A page on the host's loopback, which the sandbox reaches as
	// web.test through "hosts"; the browser may reach nothing else, so no
	// traffic leaves the host.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var served atomic.Int32
	page := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		fmt.Fprint(w, "<!doctype html><title>v1</title><body style='background:#08c'><h1>Hello from the host</h1>")
	})}
	go func() { _ = page.Serve(ln) }()
	t.Cleanup(func() { page.Close() })
	sb := ts.createSandbox(map[string]any{"image": smolvm.BrowserImage, "cpus": 2, "memory_mib": 1024, "timeout": 1200,
		"hosts":  map[string][]string{"web.test": {"127.0.0.1"}},
		"egress": map[string]any{"mode": "allowlist", "allow_domains": []string{"web.test"}}})

	var b smolvm.Browser
	ts.must(201, "POST", sbPath(sb.ID, "/browser"), nil, &b)
	if b.VMID != sb.ID || b.HostPort == 0 || b.Version == "" || b.WebSocketURL == "" {
		t.Errorf("started: %+v", b)
	}
	t.Logf("browser %s: DevTools answered %s after Chromium's start", b.Version, b.Ready.Round(time.Millisecond))
	resp, err := http.Get(b.HTTPURL + "/json/version")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("DevTools on the host: %v %v", resp, err)
	}
	resp.Body.Close()
	var got smolvm.Browser
	ts.must(200, "GET", sbPath(sb.ID, "/browser"), nil, &got)
	if got.WebSocketURL != b.WebSocketURL {
		t.Errorf("state: %+v, started %+v", got, b)
	}
	ts.wantError(409, "exists", "POST", sbPath(sb.ID, "/browser"), nil, "already")

	url := fmt.Sprintf("http://web.test:%d/", ln.Addr().(*net.TCPAddr).Port)
	status, png := ts.do("POST", sbPath(sb.ID, "/browser/screenshot"), map[string]any{"url": url, "width": 640, "height": 400})
	if status != 200 {
		t.Fatalf("screenshot of %s: %d %s", url, status, png)
	}
	if w, h := pngSize(t, png); w != 640 || h != 400 {
		t.Errorf("screenshot is %dx%d, want 640x400", w, h)
	}
	if served.Load() == 0 {
		t.Errorf("the page on the host's loopback was never asked for")
	}
	ts.wantError(400, "invalid", "POST", sbPath(sb.ID, "/browser/screenshot"), map[string]any{"url": "http://denied.test/"}, "did not load", "net::ERR_")
	ts.must(204, "DELETE", sbPath(sb.ID, "/browser"), nil, nil)
	ts.wantError(409, "not_running", "GET", sbPath(sb.ID, "/browser"), nil)
}

func pngSize(t *testing.T, b []byte) (int, int) {
	t.Helper()
	cfg, err := png.DecodeConfig(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("screenshot is not a PNG: %v (%d bytes)", err, len(b))
	}
	return cfg.Width, cfg.Height
}
