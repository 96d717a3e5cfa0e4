package smolvm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image/png"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/remote"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// browserImage builds (or takes from the shared cache: the Debian tree
// and the disk) the browser recipe into home. The first build takes
// minutes; set SMOLVM_TEST_CACHE to a state folder's cache to keep it
// between runs.
func browserImage(t *testing.T, home string) *smolvm.ImageInfo {
	t.Helper()
	needRoot(t)
	if _, err := os.Stat("/usr/bin/mmdebstrap"); err != nil {
		t.Skip("mmdebstrap not installed (apt-get install mmdebstrap)")
	}
	t0 := time.Now()
	var prog bytes.Buffer
	info, err := smolvm.BuildImage(testutil.Context(t, 45*time.Minute), smolvm.BuildOptions{Home: home, Name: smolvm.BrowserImage, Progress: &prog})
	if err != nil {
		t.Fatalf("build the browser image: %v\n%s", err, prog.String())
	}
	t.Logf("browser image: %d MiB (%d MiB on disk), built or taken from the cache in %s", info.Size>>20, info.DiskUsage>>20, time.Since(t0).Round(time.Millisecond))
	return info
}

// pageServer serves a page with a title on the host's loopback.
func pageServer(t *testing.T, title string) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "<!doctype html><html><head><title>%s</title></head><body style='background:#08c'><h1>Hello, browser</h1></body></html>", title)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

func pngSize(t *testing.T, b []byte) (int, int) {
	t.Helper()
	cfg, err := png.DecodeConfig(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("screenshot is not a PNG: %v (%d bytes)", err, len(b))
	}
	return cfg.Width, cfg.Height
}

// TestBrowser starts a browser sandbox that may reach only web.test (the
// host's loopback), drives it with chromedp through the forwarded ws://
// URL, takes screenshots of asked sizes, checks that a name egress denies
// does not load, and that stop ends Chromium and its forward.
func TestBrowser(t *testing.T) {
	home := testutil.Home(t)
	browserImage(t, home)
	port := pageServer(t, "smolvm browser test")
	ctx := testutil.Context(t, 10*time.Minute)

	t0 := time.Now()
	vm, b, err := smolvm.NewBrowser(ctx, smolvm.Config{Home: home, VCPUs: 2, BootTimeout: testutil.BootTimeout,
		Hosts:  map[string][]string{"web.test": {"127.0.0.1"}},
		Egress: smolvm.Egress{Mode: smolvm.EgressAllowlist, AllowDomains: []string{"web.test"}},
	}, smolvm.BrowserOptions{})
	if err != nil {
		t.Fatalf("NewBrowser: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	t.Logf("create → DevTools answering: %s (Chromium start → DevTools: %s), %s at %s", time.Since(t0).Round(time.Millisecond), b.Ready.Round(time.Millisecond), b.Version, b.WebSocketURL)
	if !strings.HasPrefix(b.WebSocketURL, fmt.Sprintf("ws://127.0.0.1:%d/devtools/browser/", b.HostPort)) || b.HTTPURL != fmt.Sprintf("http://127.0.0.1:%d", b.HostPort) {
		t.Errorf("endpoint %q / %q, want ws:// and http:// on 127.0.0.1:%d", b.WebSocketURL, b.HTTPURL, b.HostPort)
	}
	page := fmt.Sprintf("http://web.test:%d/", port)

	t.Run("chromedp", func(t *testing.T) {
		actx, cancel := remote.NewAllocator(context.Background(), b.WebSocketURL)
		defer cancel()
		cctx, cancel := chromedp.NewContext(actx)
		defer cancel()
		if err := chromedp.Do(cctx, chromedp.EmulateViewport(800, 600), chromedp.Navigate(page)); err != nil {
			t.Fatalf("navigate %s: %v", page, err)
		}
		title, err := chromedp.Run(cctx, chromedp.Title())
		if err != nil || title != "smolvm browser test" {
			t.Fatalf("title = %q, %v; want %q", title, err, "smolvm browser test")
		}
		shot, err := chromedp.Run(cctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		if w, h := pngSize(t, shot); w != 800 || h != 600 {
			t.Errorf("screenshot is %dx%d, want 800x600", w, h)
		}
	})

	t.Run("screenshot", func(t *testing.T) {
		t1 := time.Now()
		shot, err := b.Screenshot(ctx, page, smolvm.ScreenshotOptions{Width: 640, Height: 360})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot in a new tab: %s", time.Since(t1).Round(time.Millisecond))
		if w, h := pngSize(t, shot); w != 640 || h != 360 {
			t.Errorf("screenshot is %dx%d, want 640x360", w, h)
		}
	})

	t.Run("egress denies", func(t *testing.T) {
		// A name egress does not allow: the sandbox's DNS refuses it, so
		// nothing leaves the guest.
		_, err := b.Screenshot(ctx, "http://example.com/", smolvm.ScreenshotOptions{Width: 320, Height: 200})
		if err == nil || !strings.Contains(err.Error(), "net::ERR_NAME_NOT_RESOLVED") {
			t.Errorf("page on a denied name: %v, want net::ERR_NAME_NOT_RESOLVED", err)
		}
	})

	t.Run("second start", func(t *testing.T) {
		_, err := smolvm.StartBrowser(ctx, vm, smolvm.BrowserOptions{})
		if !errors.Is(err, smolvm.ErrExists) || !strings.Contains(err.Error(), b.WebSocketURL) {
			t.Errorf("StartBrowser on a running browser: %v, want ErrExists naming %s", err, b.WebSocketURL)
		}
		ob, err := smolvm.OpenBrowser(ctx, vm)
		if err != nil || ob.WebSocketURL != b.WebSocketURL {
			t.Errorf("OpenBrowser = %+v, %v; want %s", ob, err, b.WebSocketURL)
		}
	})

	t.Run("stop", func(t *testing.T) {
		if err := smolvm.StopBrowser(ctx, vm); err != nil {
			t.Fatal(err)
		}
		if out := sh(t, vm, "ls /run/smolvm-browser /tmp 2>&1; for p in /proc/[0-9]*; do cat $p/comm; echo; done | grep -c chrom || true"); !strings.HasSuffix(out, "0") || strings.Contains(out, "smolvm-browser-profile") {
			t.Errorf("after stop: %s; want no chromium process, no profile, no /run/smolvm-browser", out)
		}
		fwds, err := vm.Ports(ctx)
		if err != nil || len(fwds) != 0 {
			t.Errorf("forwards after stop: %v, %v; want none", fwds, err)
		}
		if _, err := smolvm.OpenBrowser(ctx, vm); !errors.Is(err, smolvm.ErrNotRunning) || !strings.Contains(err.Error(), "smolvm browser start") {
			t.Errorf("OpenBrowser after stop: %v, want ErrNotRunning naming smolvm browser start", err)
		}
		// It starts again, on the port asked for.
		want := freePort(t)
		b2, err := smolvm.StartBrowser(ctx, vm, smolvm.BrowserOptions{HostPort: want})
		if err != nil {
			t.Fatal(err)
		}
		if b2.HostPort != want {
			t.Errorf("restarted browser on port %d, want %d", b2.HostPort, want)
		}
	})
}

// TestBrowserMissingImage: no browser image is ErrNotFound naming the
// build command, and nothing is created.
func TestBrowserMissingImage(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 2*time.Minute)
	_, _, err := smolvm.NewBrowser(ctx, smolvm.Config{Home: home}, smolvm.BrowserOptions{})
	if !errors.Is(err, smolvm.ErrNotFound) || !strings.Contains(err.Error(), "smolvm image build browser") {
		t.Fatalf("NewBrowser without the image: %v, want ErrNotFound naming 'smolvm image build browser'", err)
	}
	if vms, err := testutil.OpenHost(t, home).List(ctx); err != nil || len(vms) != 0 {
		t.Errorf("VMs left: %v, %v", vms, err)
	}
	if p := testutil.Processes(home); len(p) != 0 {
		t.Errorf("processes left: %v", p)
	}
}

// TestBrowserNoChromium: a running VM without chromium is refused with
// what to do, and its port forward is not left behind.
func TestBrowserNoChromium(t *testing.T) {
	home := testutil.Home(t)
	vm := netVM(t, smolvm.Config{Home: home})
	ctx := testutil.Context(t, 3*time.Minute)
	_, err := smolvm.StartBrowser(ctx, vm, smolvm.BrowserOptions{})
	if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), "has no chromium") {
		t.Fatalf("StartBrowser in a VM without chromium: %v, want ErrInvalid saying it has no chromium", err)
	}
	if fwds, err := vm.Ports(ctx); err != nil || len(fwds) != 0 {
		t.Errorf("forwards left: %v, %v", fwds, err)
	}
}
