package smolvm_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// The network's speed, as benchmarks (the tests check only that it works):
//
//	go test -run '^$' -bench 'Network' -benchtime 5x .
//
// The VMs are made once per benchmark, outside the timed loops (a
// sub-benchmark's function runs more than once, its clean-ups after each).

// throughputSize is one download: 100 MiB.
const throughputSize = 100 << 20

// BenchmarkNetworkThroughput measures guest <- host HTTP downloads of
// 100 MiB (busybox wget -O /dev/null, timed from the host around the exec)
// in user mode (a Go server on the host's loopback, through the
// user-mode stack) and in tap mode (busybox httpd in a network namespace
// the benchmark makes; needs root). It reports MB/s.
func BenchmarkNetworkThroughput(b *testing.B) {
	download := func(vm *smolvm.VM, url string) func(*testing.B) {
		return func(b *testing.B) {
			b.SetBytes(throughputSize)
			for b.Loop() {
				// To /dev/null: under TCG a pipe to wc costs the guest more
				// than the network does. wget fails on a short body.
				if out, code := guestRun(b, vm, "wget -q -O /dev/null "+url); code != 0 {
					b.Fatalf("download %s: exit %d: %s", url, code, out)
				}
			}
		}
	}

	home := testutil.Home(b)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(throughputSize))
		for range throughputSize / len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})}
	go func() { _ = srv.Serve(ln) }()
	b.Cleanup(func() { srv.Close() })
	vm := netVM(b, smolvm.Config{Home: home, Cold: true, MemoryMiB: 256, Hosts: map[string][]string{"host.test": {"127.0.0.1"}}})
	b.Run("user", download(vm, fmt.Sprintf("http://host.test:%d/big", ln.Addr().(*net.TCPAddr).Port)))

	if reason := tapUnusable(); reason != "" {
		b.Run("tap", func(b *testing.B) { b.Skip(reason) })
		return
	}
	n := newTapNS(b)
	tvm := n.create(b, "--egress", "allowlist", "--allow-cidr", "172.16.0.1/32")
	n.httpd(b, wwwDir(b, "hello", throughputSize))
	b.Run("tap", download(tvm, "http://172.16.0.1:8080/big"))
}

// BenchmarkNetworkForward measures a host -> guest port forward's round
// trip: a new TCP connection and an HTTP GET of a small page from busybox
// httpd in the guest, through the user-mode stack.
func BenchmarkNetworkForward(b *testing.B) {
	home := testutil.Home(b)
	fwd := freePort(b)
	vm := netVM(b, smolvm.Config{Home: home, Ports: []string{fmt.Sprintf("127.0.0.1:%d:8080", fwd)}})
	if out, code := guestRun(b, vm, "mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"); code != 0 {
		b.Fatalf("httpd: %s", out)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", fwd)
	c := http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func() error {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if !strings.Contains(string(body), "hello from the guest") {
			return fmt.Errorf("GET %s: %q", url, body)
		}
		return nil
	}
	if err := testutil.Poll(time.Minute, func() bool { return get() == nil }); err != nil {
		b.Fatal("the forward never answered:", err)
	}
	b.Run("round-trip", func(b *testing.B) {
		for b.Loop() {
			if err := get(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
