package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image/png"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testutil"
)

// TestCLIBrowser builds the browser image (a cache hit after the first
// build: set SMOLVM_TEST_CACHE to keep it), starts a browser sandbox that
// reaches the host's loopback as web.test, saves a screenshot of a page
// served there and deletes the sandbox with 'browser stop --rm'.
func TestCLIBrowser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("building disk images needs root")
	}
	if _, err := os.Stat("/usr/bin/mmdebstrap"); err != nil {
		t.Skip("mmdebstrap not installed (apt-get install mmdebstrap)")
	}
	home := testutil.Home(t)
	if r := smolvmRunWithin(t, 45*time.Minute, home, "", "image", "build", "browser"); r.code != 0 {
		t.Fatalf("image build browser: exit %d: %s", r.code, r.stderr)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "<!doctype html><title>cli</title><body style='background:#c40'><p>from the host</p>")
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()

	r := mustOK(t, home, "", "browser", "start", "--name", "web", "--cpus", "2", "--add-host", "web.test:127.0.0.1", "--json")
	var b struct {
		ID       string `json:"id"`
		Name     string `json:"name"`
		WSURL    string `json:"ws_url"`
		HTTPURL  string `json:"http_url"`
		HostPort int    `json:"host_port"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &b); err != nil {
		t.Fatalf("browser start --json: %v\n%s", err, r.stdout)
	}
	if b.Name != "web" || b.ID == "" || !strings.HasPrefix(b.WSURL, fmt.Sprintf("ws://127.0.0.1:%d/devtools/browser/", b.HostPort)) {
		t.Errorf("browser start --json = %+v", b)
	}
	// DevTools answer on the printed HTTP endpoint.
	resp, err := http.Get(b.HTTPURL + "/json/version")
	if err != nil {
		t.Fatalf("GET %s/json/version: %v", b.HTTPURL, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /json/version: %s", resp.Status)
	}

	out := filepath.Join(t.TempDir(), "page.png")
	page := fmt.Sprintf("http://web.test:%d/", ln.Addr().(*net.TCPAddr).Port)
	mustOK(t, home, "", "browser", "screenshot", "web", page, "-o", out, "--width", "320", "--height", "240")
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := png.DecodeConfig(bytes.NewReader(data))
	if err != nil || cfg.Width != 320 || cfg.Height != 240 {
		t.Errorf("screenshot: %dx%d, %v; want a 320x240 PNG", cfg.Width, cfg.Height, err)
	}
	if r := smolvmRun(t, home, "", "browser", "screenshot", "web", page); r.code != 3 || !strings.Contains(r.stderr, "-o FILE") {
		t.Errorf("screenshot without -o: exit %d, %q; want exit 3 naming -o FILE", r.code, r.stderr)
	}
	if r := smolvmRun(t, home, "", "browser", "start", "web", "--cpus", "2"); r.code != 3 || !strings.Contains(r.stderr, "--cpus") {
		t.Errorf("browser start VM --cpus: exit %d, %q; want exit 3 naming --cpus", r.code, r.stderr)
	}

	mustOK(t, home, "", "browser", "stop", "web")
	if r := smolvmRun(t, home, "", "browser", "screenshot", "web", page, "-o", out); r.code == 0 || !strings.Contains(r.stderr, "smolvm browser start web") {
		t.Errorf("screenshot after stop: exit %d, %q; want a failure naming smolvm browser start", r.code, r.stderr)
	}
	mustOK(t, home, "", "browser", "stop", "web", "--rm")
	if vms := listVMs(t, home); len(vms) != 0 {
		t.Errorf("VMs left after browser stop --rm: %+v", vms)
	}
}

// TestCLIBrowserMissingImage: without the browser image, 'browser start'
// fails before it creates anything and says how to build the image.
func TestCLIBrowserMissingImage(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	r := smolvmRun(t, home, "", "browser", "start", "--json")
	if r.code != 2 || !strings.Contains(r.stderr, "smolvm image build browser") || r.stdout != "" {
		t.Errorf("browser start without the image: exit %d, stdout %q, stderr %q; want exit 2 naming 'smolvm image build browser'", r.code, r.stdout, r.stderr)
	}
	if vms := listVMs(t, home); len(vms) != 0 {
		t.Errorf("VMs left: %+v", vms)
	}
	if p := testutil.Processes(home); len(p) != 0 {
		t.Errorf("processes left: %v", p)
	}
}
