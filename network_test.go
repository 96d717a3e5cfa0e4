package smolvm_test

// Real-VM tests of the user-mode network. All traffic stays on loopback:
// test names resolve through static entries (Config.Hosts), servers listen
// on 127.0.0.1, and the guest reaches them through the stack's NAT
// (192.168.127.254 → 127.0.0.1).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/testutil"
)

const bigBody = 50 << 20

// hostServer serves "/" (a short page) and "/big" (50 MiB) on 127.0.0.1.
func hostServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/big" {
			w.Header().Set("Content-Length", fmt.Sprint(bigBody))
			for range bigBody / len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
			return
		}
		fmt.Fprint(w, "hello from the host")
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// freePort returns a loopback port that was free a moment ago, below the
// kernel's ephemeral range (so no outgoing connection takes it meanwhile).
func freePort(t *testing.T) int {
	t.Helper()
	for range 100 {
		p := 10000 + rand.IntN(9000)
		if ln, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			ln.Close()
			return p
		}
	}
	t.Fatal("no free port in 10000-18999")
	return 0
}

func netVM(t *testing.T, cfg smolvm.Config) *smolvm.VM {
	t.Helper()
	cfg.BootTimeout = testutil.BootTimeout
	if cfg.Persistent {
		cfg.SupervisorBinary = testutil.Binary(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.BootTimeout+time.Minute)
	defer cancel()
	vm, err := smolvm.New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = vm.Close() })
	return vm
}

func guestRun(t *testing.T, vm *smolvm.VM, cmd string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := vm.Run(ctx, cmd)
	if err != nil {
		t.Fatalf("run %q: %v", cmd, err)
	}
	return string(res.Stdout) + string(res.Stderr), res.ExitCode
}

func hostPortLeases(t *testing.T, home, owner string) []int64 {
	t.Helper()
	st, err := store.Open(context.Background(), home)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ls, err := st.Leases(context.Background(), network.PortPool)
	if err != nil {
		t.Fatal(err)
	}
	var out []int64
	for _, l := range ls {
		if owner == "" || l.Owner == owner {
			out = append(out, l.Value)
		}
	}
	return out
}

// TestNetworkUser boots one VM with an allowlist and a forward, and checks
// what the guest can reach, the forward both ways, and measures them.
func TestNetworkUser(t *testing.T) {
	home := testutil.Home(t)
	port := hostServer(t)
	fwd := freePort(t)
	vm := netVM(t, smolvm.Config{Home: home,
		Hosts:  map[string][]string{"allowed.test": {"127.0.0.1"}, "denied.test": {"127.0.0.1"}},
		Egress: smolvm.Egress{Mode: smolvm.EgressAllowlist, AllowDomains: []string{"allowed.test"}},
		Ports:  []string{fmt.Sprintf("127.0.0.1:%d:8080", fwd)},
	})

	t.Run("allowed name", func(t *testing.T) {
		out, code := guestRun(t, vm, fmt.Sprintf("wget -qO- http://allowed.test:%d/", port))
		if code != 0 || !strings.Contains(out, "hello from the host") {
			t.Fatalf("wget allowed.test: exit %d: %s", code, out)
		}
	})
	t.Run("denied name", func(t *testing.T) {
		out, code := guestRun(t, vm, fmt.Sprintf("wget -qO- http://denied.test:%d/", port))
		if code == 0 || !strings.Contains(out, "bad address 'denied.test") {
			t.Fatalf("wget denied.test: exit %d: %s", code, out)
		}
	})
	t.Run("metadata blocked", func(t *testing.T) {
		// (busybox wget -T crashes on a refused connection: no -T here)
		out, code := guestRun(t, vm, "wget -qO- http://169.254.169.254/latest/meta-data/")
		if code == 0 || !strings.Contains(out, "Connection refused") {
			t.Fatalf("wget 169.254.169.254: exit %d: %s", code, out)
		}
	})
	t.Run("no eth0 address outside the stack", func(t *testing.T) {
		out, _ := guestRun(t, vm, "ip -4 addr show eth0; cat /etc/resolv.conf")
		if !strings.Contains(out, network.GuestIP+"/24") || !strings.Contains(out, "nameserver "+network.GatewayIP) {
			t.Fatalf("eth0/resolv.conf: %s", out)
		}
	})
	t.Run("throughput guest<-host", func(t *testing.T) {
		start := time.Now()
		out, code := guestRun(t, vm, fmt.Sprintf("wget -qO- http://allowed.test:%d/big | wc -c", port))
		d := time.Since(start)
		if code != 0 || strings.TrimSpace(out) != fmt.Sprint(bigBody) {
			t.Fatalf("download: exit %d: %s", code, out)
		}
		t.Logf("guest downloaded %d MiB from the host in %s: %.1f MiB/s", bigBody>>20, d.Round(time.Millisecond), float64(bigBody>>20)/d.Seconds())
	})
	t.Run("forward host->guest", func(t *testing.T) {
		if out, code := guestRun(t, vm, "mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"); code != 0 {
			t.Fatalf("httpd: %s", out)
		}
		url := fmt.Sprintf("http://127.0.0.1:%d/", fwd)
		get := func() string {
			c := http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			resp, err := c.Get(url)
			if err != nil {
				t.Fatalf("GET %s: %v", url, err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return string(b)
		}
		if got := get(); !strings.Contains(got, "hello from the guest") {
			t.Fatalf("GET through the forward: %q", got)
		}
		const n = 20
		start := time.Now()
		for range n {
			get()
		}
		t.Logf("forward round trip (new TCP connection + HTTP GET to busybox httpd): %s on average over %d", (time.Since(start) / n).Round(time.Microsecond), n)
	})
	t.Run("ports at run time", func(t *testing.T) {
		ctx := testutil.Context(t, time.Minute)
		f, err := vm.ExposePort(ctx, "8080")
		if err != nil {
			t.Fatal(err)
		}
		if f.HostPort < network.EphemeralLo || f.HostIP != "127.0.0.1" {
			t.Fatalf("exposed %+v", f)
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", f.HostPort))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		ports, err := vm.Ports(ctx)
		if err != nil || len(ports) != 2 {
			t.Fatalf("Ports: %v, %v", ports, err)
		}
		in, err := vm.Network(ctx)
		if err != nil || len(in.Forwards) != 2 || in.Egress.Mode != smolvm.EgressAllowlist {
			t.Fatalf("Network: %+v, %v", in, err)
		}
		if _, err := vm.ExposePort(ctx, fmt.Sprintf("%d:80", fwd)); err == nil {
			t.Fatal("exposing a forwarded host port again succeeded")
		}
		if err := vm.ClosePort(ctx, f.HostPort); err != nil {
			t.Fatal(err)
		}
		if _, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", f.HostPort), time.Second); err == nil {
			t.Fatal("closed forward still accepts")
		}
		if ls := hostPortLeases(t, home, vm.ID()); len(ls) != 1 || ls[0] != int64(fwd) {
			t.Fatalf("leases after close: %v, want [%d]", ls, fwd)
		}
	})
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if ls := hostPortLeases(t, home, ""); len(ls) != 0 {
		t.Fatalf("leases left after delete: %v", ls)
	}
}

// TestNetworkDeniedCIDRAndSupervisorKill: a persistent VM allowed only
// 127.0.0.2 cannot reach the host's 127.0.0.1; after kill -9 of its
// supervisor, cleanup releases its forwarded port.
func TestNetworkDeniedCIDRAndSupervisorKill(t *testing.T) {
	home := testutil.Home(t)
	port := hostServer(t)
	fwd := freePort(t)
	vm := netVM(t, smolvm.Config{Home: home, Persistent: true,
		Egress: smolvm.Egress{Mode: smolvm.EgressAllowlist, AllowCIDRs: []string{"127.0.0.2/32"}},
		Ports:  []string{fmt.Sprintf("%d:8080", fwd)},
	})
	out, code := guestRun(t, vm, fmt.Sprintf("wget -qO- http://%s:%d/", network.HostAliasIP, port))
	if code == 0 || !strings.Contains(out, "Connection refused") {
		t.Fatalf("wget to a denied address: exit %d: %s", code, out)
	}
	ctx := testutil.Context(t, 2*time.Minute)
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ls := hostPortLeases(t, home, vm.ID()); len(ls) != 1 {
		t.Fatalf("leases: %v", ls)
	}
	if err := syscall.Kill(in.SupervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Poll(30*time.Second, func() bool { return !testutil.PidAlive(in.SupervisorPID) }); err != nil {
		t.Fatal(err)
	}
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home}); err != nil {
		t.Fatal(err)
	}
	if ls := hostPortLeases(t, home, ""); len(ls) != 0 {
		t.Fatalf("leases left after cleanup: %v", ls)
	}
	// The port is free again.
	var lerr error
	if err := testutil.Poll(10*time.Second, func() bool {
		ln, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", fwd))
		if lerr = err; err == nil {
			ln.Close()
		}
		return err == nil
	}); err != nil {
		t.Fatalf("forwarded port not freed: %v", lerr)
	}
}

// TestNetworkPortTaken: a forward of a host port another program holds
// fails before boot with a clear error, leaving no VM and no lease.
func TestNetworkPortTaken(t *testing.T) {
	home := testutil.Home(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	ctx := testutil.Context(t, 2*time.Minute)
	_, err = smolvm.New(ctx, smolvm.Config{Home: home, Ports: []string{fmt.Sprintf("%d:80", port)}, BootTimeout: testutil.BootTimeout})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("host port %d", port)) || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("New with a taken port: %v", err)
	}
	vms, err := smolvm.ListIn(ctx, home)
	if err != nil || len(vms) != 0 {
		t.Fatalf("VMs left: %v, %v", vms, err)
	}
	if ls := hostPortLeases(t, home, ""); len(ls) != 0 {
		t.Fatalf("leases left: %v", ls)
	}
	if ents, _ := os.ReadDir(home + "/vms"); len(ents) != 0 {
		t.Fatalf("state folders left: %d", len(ents))
	}
	_, err = smolvm.New(ctx, smolvm.Config{Home: home, Network: "tap"})
	if !errors.Is(err, smolvm.ErrUnsupported) {
		t.Fatalf("tap: %v", err)
	}
}

// TestNetworkNone: --net none gives the guest no eth0.
func TestNetworkNone(t *testing.T) {
	home := testutil.Home(t)
	vm := netVM(t, smolvm.Config{Home: home, Network: smolvm.NetworkNone})
	out, _ := guestRun(t, vm, "ls /sys/class/net")
	if strings.Contains(out, "eth0") || !strings.Contains(out, "lo") {
		t.Fatalf("interfaces: %q", out)
	}
	ctx := testutil.Context(t, time.Minute)
	if _, err := vm.ExposePort(ctx, "80"); err == nil || !strings.Contains(err.Error(), "user-mode network") {
		t.Fatalf("expose without a network: %v", err)
	}
}
