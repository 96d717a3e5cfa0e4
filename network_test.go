package smolvm_test

// Real-VM tests of the networks. User mode: all traffic stays on
// loopback: test names resolve through static entries (Config.Hosts),
// servers listen on 127.0.0.1, and the guest reaches them through the
// stack's NAT (192.168.127.254 → 127.0.0.1). Tap mode: everything happens
// inside a network namespace each test creates (see newTapNS).

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
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"

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
func freePort(t testing.TB) int {
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

func netVM(t testing.TB, cfg smolvm.Config) *smolvm.VM {
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

func guestRun(t testing.TB, vm *smolvm.VM, cmd string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := vm.Run(ctx, cmd)
	if err != nil {
		t.Fatalf("run %q: %v", cmd, err)
	}
	return string(res.Stdout) + string(res.Stderr), res.ExitCode
}

// TestNetworkUser boots one VM with an allowlist and a forward, and checks
// what the guest can reach and the forward both ways.
func TestNetworkUser(t *testing.T) {
	home := testutil.Home(t)
	port := hostServer(t)
	fwd := freePort(t)
	vm := netVM(t, smolvm.Config{Home: home,
		Hosts:  map[string][]string{"allowed.test": {"127.0.0.1"}},
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
	t.Run("download guest<-host", func(t *testing.T) {
		// Its speed is BenchmarkNetworkThroughput's.
		out, code := guestRun(t, vm, fmt.Sprintf("wget -qO- http://allowed.test:%d/big | wc -c", port))
		if code != 0 || strings.TrimSpace(out) != fmt.Sprint(bigBody) {
			t.Fatalf("download: exit %d: %s", code, out)
		}
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
		// Its round trip is BenchmarkNetworkForward's.
		for range 3 { // new connections each time
			if got := get(); !strings.Contains(got, "hello from the guest") {
				t.Fatalf("GET through the forward: %q", got)
			}
		}
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
		if ls := leases(t, home, network.PortPool, vm.ID()); len(ls) != 1 || ls[0] != int64(fwd) {
			t.Fatalf("leases after close: %v, want [%d]", ls, fwd)
		}
	})
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if ls := leases(t, home, network.PortPool, ""); len(ls) != 0 {
		t.Fatalf("leases left after delete: %v", ls)
	}
}

// TestNetworkDeniedCIDRAndSupervisorKill: a persistent VM allowed only
// 203.0.113.7 cannot reach the host's 127.0.0.1; after kill -9 of its
// supervisor, cleanup releases its forwarded port.
func TestNetworkDeniedCIDRAndSupervisorKill(t *testing.T) {
	home := testutil.Home(t)
	port := hostServer(t)
	fwd := freePort(t)
	vm := netVM(t, smolvm.Config{Home: home, Persistent: true,
		Egress: smolvm.Egress{Mode: smolvm.EgressAllowlist, AllowCIDRs: []string{"203.0.113.7/32"}},
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
	if ls := leases(t, home, network.PortPool, vm.ID()); len(ls) != 1 {
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
	if ls := leases(t, home, network.PortPool, ""); len(ls) != 0 {
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

// TestNetworkHostLoopback: a default VM (egress open, no --add-host) does
// not reach a service on the host's 127.0.0.1: not at 192.168.127.254, not
// after its DNS was asked for localhost or the host's name (which the host
// resolves to 127.0.0.1). A VM with --add-host svc:127.0.0.1 reaches it,
// but not the first VM's port forward on the host's loopback. --allow-cidr 127.0.0.1/32 and --add-host with
// egress off are refused before anything is made.
func TestNetworkHostLoopback(t *testing.T) {
	home := testutil.Home(t)
	port := hostServer(t)
	fwd := freePort(t)
	open := netVM(t, smolvm.Config{Home: home, Ports: []string{fmt.Sprintf("127.0.0.1:%d:8080", fwd)}})
	if out, code := guestRun(t, open, "mkdir -p /tmp/www && echo hello from the other VM > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"); code != 0 {
		t.Fatalf("httpd: %s", out)
	}
	alias := fmt.Sprintf("%s %d", network.HostAliasIP, port)
	reach := func(vm *smolvm.VM, cmd string) (string, bool) {
		t.Helper()
		// nc prints the page when it connects; a refused connection
		// prints an error instead.
		out, _ := guestRun(t, vm, cmd)
		return out, strings.Contains(out, "hello from the host") || strings.Contains(out, "hello from the other VM")
	}
	get := "printf 'GET / HTTP/1.0\r\n\r\n' | nc "
	t.Run("alias", func(t *testing.T) {
		if out, ok := reach(open, get+alias); ok {
			t.Fatalf("reached the host's loopback at %s: %s", network.HostAliasIP, out)
		}
	})
	names := []string{"localhost"}
	if h, err := os.Hostname(); err == nil {
		if addrs, err := net.LookupHost(h); err == nil && len(addrs) > 0 {
			names = append(names, h)
		}
	}
	for _, name := range names {
		t.Run("after DNS of "+name, func(t *testing.T) {
			// The path of issue 14: ask the VM's DNS for the name, then
			// connect to the address the host's loopback had.
			out, ok := reach(open, fmt.Sprintf("nslookup %s %s; %s%s", name, network.GatewayIP, get, alias))
			if ok {
				t.Fatalf("reached the host's loopback after resolving %s: %s", name, out)
			}
			if strings.Contains(out, "Address: "+network.HostAliasIP) || strings.Contains(out, "Address: 127.") {
				t.Fatalf("the VM's DNS answered %s with the host's loopback: %s", name, out)
			}
			if out, ok := reach(open, fmt.Sprintf("%s%s %d", get, name, port)); ok {
				t.Fatalf("reached the host's loopback by the name %s: %s", name, out)
			}
		})
	}
	t.Run("config refused", func(t *testing.T) {
		ctx := testutil.Context(t, time.Minute)
		_, err := smolvm.New(ctx, smolvm.Config{Home: home, Egress: smolvm.Egress{Mode: smolvm.EgressAllowlist, AllowCIDRs: []string{"127.0.0.1/32"}}})
		if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), "--add-host NAME:127.0.0.1") {
			t.Fatalf("--allow-cidr 127.0.0.1/32: %v", err)
		}
		_, err = smolvm.New(ctx, smolvm.Config{Home: home, Egress: smolvm.Egress{Mode: smolvm.EgressOff}, Hosts: map[string][]string{"svc": {"127.0.0.1"}}})
		if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), "--egress off") {
			t.Fatalf("--add-host with --egress off: %v", err)
		}
		if vms, err := testutil.OpenHost(t, home).List(ctx); err != nil || len(vms) != 1 {
			t.Fatalf("VMs after refused configs: %v, %v", vms, err)
		}
	})
	mapped := netVM(t, smolvm.Config{Home: home, Hosts: map[string][]string{"svc": {"127.0.0.1"}}})
	t.Run("mapped name", func(t *testing.T) {
		out, code := guestRun(t, mapped, fmt.Sprintf("wget -qO- http://svc:%d/", port))
		if code != 0 || !strings.Contains(out, "hello from the host") {
			t.Fatalf("wget svc (--add-host svc:127.0.0.1): exit %d: %s", code, out)
		}
	})
	t.Run("udp", func(t *testing.T) {
		// DNS queries (busybox nslookup NAME SERVER:PORT) to a UDP socket
		// on the host's 127.0.0.1 that records the names asked: the
		// default VM's (sent first, after resolving localhost) never
		// arrives, the mapped VM's does.
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		got := make(chan string, 64)
		go func() {
			buf := make([]byte, 2048)
			for {
				n, _, err := pc.ReadFrom(buf)
				if err != nil {
					close(got)
					return
				}
				got <- string(buf[:n])
			}
		}()
		uport := pc.LocalAddr().(*net.UDPAddr).Port
		guestRun(t, open, fmt.Sprintf("nslookup localhost %s; nslookup -timeout=1 -retry=1 fromopen.test %s:%d", network.GatewayIP, network.HostAliasIP, uport))
		guestRun(t, mapped, fmt.Sprintf("nslookup -timeout=1 -retry=1 frommapped.test svc:%d", uport))
		for {
			select {
			case q, ok := <-got:
				if !ok {
					t.Fatal("UDP socket closed")
				}
				if strings.Contains(q, "fromopen") {
					t.Fatal("the default VM's datagram reached the host's loopback")
				}
				if strings.Contains(q, "frommapped") {
					return
				}
			case <-time.After(time.Minute):
				t.Fatal("the mapped VM's datagram did not arrive")
			}
		}
	})
	t.Run("another VM's forward", func(t *testing.T) {
		// The host reaches the other VM's forward; the mapped VM does not.
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", fwd))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), "hello from the other VM") {
			t.Fatalf("the forward from the host: %q", b)
		}
		if out, ok := reach(mapped, fmt.Sprintf("%ssvc %d", get, fwd)); ok {
			t.Fatalf("reached another VM's forward on the host's loopback: %s", out)
		}
	})
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
	if !errors.Is(err, smolvm.ErrInUse) || !strings.Contains(err.Error(), fmt.Sprintf("host port %d", port)) || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("New with a taken port: %v; want ErrInUse naming the port", err)
	}
	vms, err := testutil.OpenHost(t, home).List(ctx)
	if err != nil || len(vms) != 0 {
		t.Fatalf("VMs left: %v, %v", vms, err)
	}
	if ls := leases(t, home, network.PortPool, ""); len(ls) != 0 {
		t.Fatalf("leases left: %v", ls)
	}
	if ents, _ := os.ReadDir(home + "/vms"); len(ents) != 0 {
		t.Fatalf("state folders left: %d", len(ents))
	}
	// Tap mode refuses what it cannot enforce before it touches the host.
	_, err = smolvm.New(ctx, smolvm.Config{Home: home, Network: smolvm.NetworkTAP, Egress: smolvm.Egress{AllowDomains: []string{"example.com"}}})
	if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), "--net user") {
		t.Fatalf("tap with a domain allowlist: %v", err)
	}
	_, err = smolvm.New(ctx, smolvm.Config{Home: home, TAPSubnet: "10.0.0.0/24"})
	if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), "--net tap") {
		t.Fatalf("a TAP pool without tap mode: %v", err)
	}
	if vms, err := testutil.OpenHost(t, home).List(ctx); err != nil || len(vms) != 0 {
		t.Fatalf("VMs left: %v, %v", vms, err)
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
	if _, err := vm.ExposePort(ctx, "80"); err == nil || !strings.Contains(err.Error(), "port forwards need a network") {
		t.Fatalf("expose without a network: %v", err)
	}
}

// Tap mode. Every tap test runs its VMs' supervisors (`smolvm create`
// through `ip netns exec`) inside a network namespace the test creates, so
// the TAP devices, the 172.16.x addresses, the routes and the nftables
// table exist only there, and the host-side HTTP server (busybox httpd)
// listens only there. Nothing is sent outside that namespace.

// tapNS is a test's network namespace and state folder.
type tapNS struct {
	name string
	home string
}

func newTapNS(t testing.TB) *tapNS {
	t.Helper()
	testutil.NeedQEMU(t)
	if reason := tapUnusable(); reason != "" {
		t.Skip(reason)
	}
	n := &tapNS{name: fmt.Sprintf("smvtest-%08x", rand.Uint32())}
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", n.name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", n.name, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", n.name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("bring lo up in %s: %v: %s", n.name, err, out)
	}
	// Registered after the namespace, so its cleanup (every VM of the
	// home removed) runs while the namespace still exists.
	n.home = testutil.Home(t)
	return n
}

// tapUnusable says why the tap tests cannot run here, or "".
func tapUnusable() string {
	if os.Geteuid() != 0 {
		return "network mode tap needs root (TAP devices, routes, nftables): run the tests as root"
	}
	for _, bin := range []string{"ip", "busybox"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Sprintf("tap tests need %s (iproute2, busybox-static)", bin)
		}
	}
	return ""
}

// exec runs a command inside the namespace.
func (n *tapNS) exec(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+n.home)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), err
}

// cli runs the smolvm CLI inside the namespace on the test's home.
func (n *tapNS) cli(t testing.TB, args ...string) (string, error) {
	t.Helper()
	return n.exec(t, append([]string{testutil.Binary(t)}, args...)...)
}

// create makes a persistent tap-mode VM whose supervisor lives in the
// namespace, and opens it.
func (n *tapNS) create(t testing.TB, args ...string) *smolvm.VM {
	t.Helper()
	args = append([]string{"create", "--net", "tap", "--cold", "-m", "256", "--boot-timeout", testutil.BootTimeout.String()}, args...)
	out, err := n.cli(t, args...)
	if err != nil {
		t.Fatalf("smolvm %s: %v", strings.Join(args, " "), err)
	}
	vm, err := testutil.OpenHost(t, n.home).Open(testutil.Context(t, time.Minute), strings.TrimSpace(out))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = vm.Close() })
	return vm
}

// httpd serves dir on 172.16.0.1:8080 in the namespace (the address
// exists once a TAP does) and waits until it answers.
func (n *tapNS) httpd(t testing.TB, dir string) { n.httpdOn(t, "172.16.0.1", dir) }

// httpdOn serves dir on ip:8080 in the namespace.
func (n *tapNS) httpdOn(t testing.TB, ip, dir string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", n.name, "busybox", "httpd", "-f", "-p", ip+":8080", "-h", dir)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var last error
	if err := testutil.Poll(30*time.Second, func() bool {
		_, last = n.exec(t, "busybox", "wget", "-q", "-O", "/dev/null", "http://"+ip+":8080/index.html")
		return last == nil
	}); err != nil {
		t.Fatalf("httpd in %s did not answer: %v", n.name, last)
	}
}

// external makes a second namespace joined to the test's by a veth pair
// (10.1.2.1/24 in the test's, 10.1.2.3/24 in it) with busybox httpd on
// 10.1.2.3:8080, and routes 169.254.0.0/16 to it. It has no route to the
// guests' pool.
func (n *tapNS) external(t *testing.T) string {
	t.Helper()
	ext := n.name + "x"
	if out, err := exec.Command("ip", "netns", "add", ext).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ext, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ext).Run() })
	for _, args := range [][]string{
		{"-n", n.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", ext},
		{"-n", n.name, "addr", "add", "10.1.2.1/24", "dev", "veth0"},
		{"-n", n.name, "link", "set", "veth0", "up"},
		{"-n", n.name, "route", "add", "169.254.0.0/16", "via", "10.1.2.3"},
		{"-n", ext, "addr", "add", "10.1.2.3/24", "dev", "veth1"},
		{"-n", ext, "link", "set", "veth1", "up"},
		{"-n", ext, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	cmd := exec.Command("ip", "netns", "exec", ext, "busybox", "httpd", "-f", "-p", "10.1.2.3:8080", "-h", wwwDir(t, "hello from beyond", 0))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var last error
	if err := testutil.Poll(30*time.Second, func() bool {
		_, last = n.exec(t, "busybox", "wget", "-q", "-O", "/dev/null", "http://10.1.2.3:8080/index.html")
		return last == nil
	}); err != nil {
		t.Fatalf("httpd in %s did not answer: %v", ext, last)
	}
	return ext
}

// taps lists the namespace's TAP devices of smolvm ("smv…").
func (n *tapNS) taps(t *testing.T) []string {
	t.Helper()
	out, err := n.exec(t, "ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	var taps []string
	for _, line := range strings.Split(out, "\n") {
		// "7: smv0123456789ab: <BROADCAST,…"
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], network.TAPPrefix) {
			taps = append(taps, strings.TrimSuffix(f[1], ":"))
		}
	}
	return taps
}

// nftRules counts the rules of the smolvm table by the VM they belong to;
// ok is false when the table does not exist.
func (n *tapNS) nftRules(t *testing.T) (owners map[string]int, ok bool) {
	t.Helper()
	f, err := os.Open("/run/netns/" + n.name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		ok = ok || tb.Name == network.NFTTable
	}
	owners = map[string]int{}
	for _, ch := range chains {
		if ch.Table.Name != network.NFTTable {
			continue
		}
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			owners[network.RuleOwner(r)]++
		}
	}
	return owners, ok
}

func leases(t *testing.T, home, pool, owner string) []int64 {
	t.Helper()
	st, err := store.Open(context.Background(), home)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ls, err := st.Leases(context.Background(), pool)
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

// wwwDir is a folder for busybox httpd with index.html and a sparse file
// "big" of bigSize bytes.
func wwwDir(t testing.TB, text string, bigSize int64) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/index.html", []byte(text+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if bigSize > 0 {
		f, err := os.Create(dir + "/big")
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(bigSize); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	return dir
}

// TestNetworkTAP: a tap-mode VM gets a leased address, reaches the host's
// HTTP server, is reached through a port forward, shows its network in
// info, and leaves no TAP, rule or lease after delete.
func TestNetworkTAP(t *testing.T) {
	n := newTapNS(t)
	ctx := testutil.Context(t, 10*time.Minute)
	fwd := 10000 + rand.IntN(9000) // in the namespace: its loopback is all free
	// The host itself is reached only through an allowed CIDR.
	vm := n.create(t, "-p", fmt.Sprintf("%d:8080", fwd), "--egress", "allowlist", "--allow-cidr", "172.16.0.1/32")
	tap := network.TAPName(vm.ID())

	in, err := vm.Network(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if in.Mode != smolvm.NetworkTAP || in.GuestIP != "172.16.0.2" || in.Gateway != "172.16.0.1" || in.PrefixLen != 32 ||
		in.TAP != tap || in.Subnet != smolvm.DefaultTAPSubnet || len(in.Forwards) != 1 {
		t.Fatalf("network info: %+v", in)
	}
	if out, err := n.cli(t, "info", vm.ID()); err != nil || !strings.Contains(out, "tap: 172.16.0.2/32 on "+tap) {
		t.Fatalf("smolvm info: %v\n%s", err, out)
	}
	if taps := n.taps(t); !slices.Equal(taps, []string{tap}) {
		t.Fatalf("TAPs in the namespace: %v, want [%s]", taps, tap)
	}
	if owners, ok := n.nftRules(t); !ok || owners[vm.ID()] == 0 {
		t.Fatalf("nftables rules: %v (table %v)", owners, ok)
	}
	if ls := leases(t, n.home, network.TAPPool, vm.ID()); len(ls) != 1 {
		t.Fatalf("address leases: %v", ls)
	}
	if out, err := n.exec(t, "cat", "/proc/sys/net/ipv6/conf/"+tap+"/disable_ipv6"); err != nil || strings.TrimSpace(out) != "1" {
		t.Fatalf("IPv6 on %s: disable_ipv6 %q, %v", tap, out, err)
	}

	n.httpd(t, wwwDir(t, "hello from the netns", 0))
	t.Run("guest address and route", func(t *testing.T) {
		out, _ := guestRun(t, vm, "ip -4 addr show eth0; ip route")
		if !strings.Contains(out, "172.16.0.2/32") || !strings.Contains(out, "default via 172.16.0.1") {
			t.Fatalf("eth0: %s", out)
		}
	})
	t.Run("guest fetches from the host", func(t *testing.T) {
		out, code := guestRun(t, vm, "wget -qO- http://172.16.0.1:8080/index.html")
		if code != 0 || !strings.Contains(out, "hello from the netns") {
			t.Fatalf("wget: exit %d: %s", code, out)
		}
	})
	t.Run("forward host->guest", func(t *testing.T) {
		if out, code := guestRun(t, vm, "mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"); code != 0 {
			t.Fatalf("httpd: %s", out)
		}
		out, err := n.exec(t, "busybox", "wget", "-qO-", fmt.Sprintf("http://127.0.0.1:%d/", fwd))
		if err != nil || !strings.Contains(out, "hello from the guest") {
			t.Fatalf("through the forward: %v: %q", err, out)
		}
	})

	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	n.assertNothingLeft(t, "after delete")
}

// TestNetworkTAPIsolation: two tap-mode guests do not reach each other;
// with egress open a guest reaches the network beyond the host but not the
// host itself (none of its addresses), with an allowlist of the host's
// address it does; a user-mode guest in the same namespace reaches neither
// the host nor the tap guests. After kill -9 of one's supervisor, cleanup
// run outside the namespace removes exactly that VM's rules and lease.
func TestNetworkTAPIsolation(t *testing.T) {
	n := newTapNS(t)
	ctx := testutil.Context(t, 10*time.Minute)
	a := n.create(t)
	// b may reach only the host: its allowlist holds the host's address.
	b := n.create(t, "--egress", "allowlist", "--allow-cidr", "172.16.0.1/32")
	ia, err := a.Network(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ib, err := b.Network(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ia.GuestIP == ib.GuestIP {
		t.Fatalf("both guests have %s", ia.GuestIP)
	}
	n.httpd(t, wwwDir(t, "hello from the netns", 0))
	for _, g := range []struct {
		vm   *smolvm.VM
		ip   string
		peer string
	}{{a, ia.GuestIP, ib.GuestIP}, {b, ib.GuestIP, ia.GuestIP}} {
		if out, code := guestRun(t, g.vm, "mkdir -p /tmp/www && echo hello from "+g.ip+" > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"); code != 0 {
			t.Fatalf("httpd: %s", out)
		}
	}
	for _, g := range []struct {
		vm   *smolvm.VM
		ip   string
		peer string
	}{{a, ia.GuestIP, ib.GuestIP}, {b, ib.GuestIP, ia.GuestIP}} {
		// The peer's server is up: the host reaches it.
		if out, err := n.exec(t, "busybox", "wget", "-qO-", "http://"+g.peer+":8080/"); err != nil || !strings.Contains(out, "hello from "+g.peer) {
			t.Fatalf("host to guest %s: %v: %q", g.peer, err, out)
		}
		out, code := guestRun(t, g.vm, "wget -qO- http://"+g.peer+":8080/")
		if code == 0 || strings.Contains(out, "hello from") || !strings.Contains(out, "No route to host") {
			t.Fatalf("guest %s reached guest %s: exit %d: %s", g.ip, g.peer, code, out)
		}
		out, code = guestRun(t, g.vm, "ping -c 1 -W 2 "+g.peer)
		if code == 0 {
			t.Fatalf("guest %s pinged guest %s: %s", g.ip, g.peer, out)
		}
	}
	// The network beyond the host: a second namespace of the test's,
	// joined by a veth pair (10.1.2.1 here, 10.1.2.3 there, where an HTTP
	// server listens), with no route back to the guests, so only
	// masqueraded traffic is answered. The namespace also routes
	// 169.254.0.0/16 there. a (egress open) reaches the server through
	// the NAT; b (allowlist: the host) and a's metadata request are
	// rejected at once.
	ext := n.external(t)
	if out, code := guestRun(t, a, "wget -qO- http://10.1.2.3:8080/index.html"); code != 0 || !strings.Contains(out, "hello from beyond") {
		t.Fatalf("a through the NAT: exit %d: %s", code, out)
	}
	// Forged sources and IPv6 do not leave a tap guest. The server's
	// namespace counts the echo requests it receives (it cannot answer a
	// forged source: it has no route back): a's own pings arrive; pings
	// from an address a adds to itself (another guest's, and one of its
	// pool that nobody has) do not.
	echos := func() int {
		out, err := exec.Command("ip", "netns", "exec", ext, "cat", "/proc/net/snmp").Output()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "Icmp:" {
				continue
			}
			if names == nil {
				names = f
				continue
			}
			for i, name := range names {
				if name == "InEchos" && i < len(f) {
					n, _ := strconv.Atoi(f[i])
					return n
				}
			}
		}
		t.Fatalf("no Icmp InEchos in %s's /proc/net/snmp:\n%s", ext, out)
		return 0
	}
	before := echos()
	if out, code := guestRun(t, a, "ping -c 2 -W 5 10.1.2.3"); code != 0 {
		t.Fatalf("a pings 10.1.2.3 from its own address: exit %d: %s", code, out)
	}
	if got := echos() - before; got != 2 {
		t.Fatalf("a's own pings: %s counted %d echo requests, want 2 (nothing tested)", ext, got)
	}
	for _, src := range []string{ib.GuestIP, "172.16.0.200"} {
		if out, code := guestRun(t, a, "ip addr add "+src+"/32 dev eth0"); code != 0 {
			t.Fatalf("a adds %s: exit %d: %s", src, code, out)
		}
		before := echos()
		out, _ := guestRun(t, a, "ping -c 2 -W 2 -I "+src+" 10.1.2.3; ping -c 2 -W 2 -I "+src+" 172.16.0.1")
		if got := echos() - before; got != 0 || strings.Contains(out, "bytes from") {
			t.Errorf("a's pings from the forged source %s: %d reached %s: %s", src, got, ext, out)
		}
		if out, code := guestRun(t, a, "ip addr del "+src+"/32 dev eth0"); code != 0 {
			t.Fatalf("a removes %s: exit %d: %s", src, code, out)
		}
	}
	// IPv6: the host's TAP has it disabled and the rules drop it.
	// (The guest answers its own all-nodes ping: only other senders count.)
	out6, _ := guestRun(t, a, "ip -6 addr add fd00::2/64 dev eth0 2>&1; ping6 -c 2 -W 3 -I eth0 ff02::1 2>&1; ping6 -c 2 -W 3 fd00::1 2>&1")
	own, _ := guestRun(t, a, "ip -6 addr show dev eth0")
	for _, line := range strings.Split(out6, "\n") {
		from, ok := strings.CutPrefix(strings.TrimSpace(line), "64 bytes from ")
		if !ok {
			continue
		}
		if addr, _, _ := strings.Cut(from, ": "); !strings.Contains(own, addr+"/") {
			t.Errorf("a got an IPv6 answer from %s over its TAP:\n%s\n(a's own addresses:\n%s)", addr, out6, own)
		}
	}
	if !strings.Contains(out6, "bytes from") {
		t.Errorf("a's IPv6 ping never answered even from a itself (nothing tested): %s", out6)
	}
	// The host itself: its TAP address and its other address (10.1.2.1,
	// where a second server listens) are reached only through the
	// allowlist that names one of them.
	n.httpdOn(t, "10.1.2.1", wwwDir(t, "hello from the host's other address", 0))
	for _, c := range []struct {
		vm    *smolvm.VM
		url   string
		reach bool
	}{
		{a, "http://172.16.0.1:8080/index.html", false},
		{a, "http://10.1.2.1:8080/index.html", false},
		{b, "http://172.16.0.1:8080/index.html", true},
		{b, "http://10.1.2.1:8080/index.html", false},
	} {
		out, code := guestRun(t, c.vm, "wget -qO- "+c.url)
		if got := code == 0 && strings.Contains(out, "hello from"); got != c.reach {
			t.Errorf("%s to %s: exit %d: %s (want reached %v)", c.vm.ID(), c.url, code, out, c.reach)
		}
		if !c.reach && !strings.Contains(out, "No route to host") {
			t.Errorf("%s to %s: not refused at once: %s", c.vm.ID(), c.url, out)
		}
	}
	// A user-mode guest in the namespace (egress open): the network
	// beyond, but neither the host's addresses nor a tap guest.
	out, err := n.cli(t, "create", "-m", "256", "--boot-timeout", testutil.BootTimeout.String())
	if err != nil {
		t.Fatalf("create a user-mode VM: %v", err)
	}
	u, err := testutil.OpenHost(t, n.home).Open(ctx, strings.TrimSpace(out))
	if err != nil {
		t.Fatal(err)
	}
	for url, reach := range map[string]bool{
		"http://10.1.2.3:8080/index.html":   true,
		"http://10.1.2.1:8080/index.html":   false,
		"http://172.16.0.1:8080/index.html": false,
		"http://" + ia.GuestIP + ":8080/":   false,
		"http://" + ib.GuestIP + ":8080/":   false,
	} {
		out, code := guestRun(t, u, "wget -qO- "+url)
		if got := code == 0 && strings.Contains(out, "hello from"); got != reach {
			t.Errorf("user-mode guest to %s: exit %d: %s (want reached %v)", url, code, out, reach)
		}
	}
	if out, err := n.cli(t, "rm", "-f", u.ID()); err != nil {
		t.Fatalf("rm the user-mode VM: %v: %s", err, out)
	}
	_ = u.Close()
	if out, code := guestRun(t, b, "wget -qO- http://10.1.2.3:8080/index.html"); code == 0 || !strings.Contains(out, "No route to host") {
		t.Fatalf("b to an address outside its allowlist: exit %d: %s", code, out)
	}
	if out, code := guestRun(t, a, "wget -qO- http://169.254.169.254/latest/meta-data/"); code == 0 || !strings.Contains(out, "No route to host") {
		t.Fatalf("a to the metadata address: exit %d: %s", code, out)
	}

	// kill -9 of b's supervisor; cleanup from outside the namespace.
	bi, err := b.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(bi.SupervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Poll(30*time.Second, func() bool {
		return !testutil.PidAlive(bi.SupervisorPID) && !testutil.PidAlive(bi.HypervisorPID)
	}); err != nil {
		t.Fatal("supervisor or QEMU of b still alive:", err)
	}
	if owners, _ := n.nftRules(t); owners[b.ID()] == 0 {
		t.Fatalf("b's rules gone before cleanup (nothing to test): %v", owners)
	}
	removed, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: n.home})
	if err != nil || len(removed) != 1 || removed[0] != b.ID() {
		t.Fatalf("cleanup: %v, %v", removed, err)
	}
	owners, ok := n.nftRules(t)
	if !ok || owners[b.ID()] != 0 || owners[a.ID()] == 0 || len(owners) != 1 {
		t.Fatalf("rules after cleanup of b: %v (table %v)", owners, ok)
	}
	if taps := n.taps(t); !slices.Equal(taps, []string{network.TAPName(a.ID())}) {
		t.Fatalf("TAPs after cleanup of b: %v, want a's only", taps)
	}
	if ls := leases(t, n.home, network.TAPPool, ""); len(ls) != 1 {
		t.Fatalf("address leases after cleanup of b: %v", ls)
	}
	// a still works.
	if out, code := guestRun(t, a, "wget -qO- http://10.1.2.3:8080/index.html"); code != 0 {
		t.Fatalf("a after cleanup of b: exit %d: %s", code, out)
	}
	if out, err := n.cli(t, "rm", "-f", a.ID()); err != nil {
		t.Fatalf("rm: %v: %s", err, out)
	}
	n.assertNothingLeft(t, "after deleting the last VM")
}

// TestNetworkTAPSupervisorKill: a tap VM of a pool of its own (--tap-cidr)
// with egress off cannot reach the host but answers a forward; after
// kill -9 of its supervisor, `smolvm cleanup` (in the namespace) leaves no
// TAP, no rule and no lease.
func TestNetworkTAPSupervisorKill(t *testing.T) {
	n := newTapNS(t)
	ctx := testutil.Context(t, 10*time.Minute)
	fwd := 10000 + rand.IntN(9000)
	vm := n.create(t, "--tap-cidr", "10.99.7.0/24", "--egress", "off", "-p", fmt.Sprintf("%d:8080", fwd))
	if in, err := vm.Network(ctx); err != nil || in.GuestIP != "10.99.7.2" || in.Gateway != "10.99.7.1" || in.Subnet != "10.99.7.0/24" {
		t.Fatalf("network of a /24 pool: %+v, %v", in, err)
	}
	n.httpdOn(t, "10.99.7.1", wwwDir(t, "hello from the netns", 0))
	if out, code := guestRun(t, vm, "wget -qO- http://10.99.7.1:8080/index.html"); code == 0 || !strings.Contains(out, "No route to host") {
		t.Fatalf("egress off reached the host: exit %d: %s", code, out)
	}
	// Forwards still work: the guest answers connections the host opened.
	if out, code := guestRun(t, vm, "mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"); code != 0 {
		t.Fatalf("httpd: %s", out)
	}
	if out, err := n.exec(t, "busybox", "wget", "-qO-", fmt.Sprintf("http://127.0.0.1:%d/", fwd)); err != nil || !strings.Contains(out, "hello from the guest") {
		t.Fatalf("through the forward with egress off: %v: %q", err, out)
	}
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases(t, n.home, network.TAPPool, vm.ID())) != 1 || len(leases(t, n.home, network.PortPool, vm.ID())) != 1 {
		t.Fatalf("leases: %v", leases(t, n.home, "", ""))
	}
	if err := syscall.Kill(in.SupervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Poll(30*time.Second, func() bool {
		return !testutil.PidAlive(in.SupervisorPID) && !testutil.PidAlive(in.HypervisorPID)
	}); err != nil {
		t.Fatal("supervisor or QEMU still alive:", err)
	}
	if owners, _ := n.nftRules(t); owners[vm.ID()] == 0 {
		t.Fatalf("rules gone before cleanup (nothing to test): %v", owners)
	}
	out, err := n.cli(t, "cleanup")
	if err != nil || !strings.Contains(out, vm.ID()) {
		t.Fatalf("smolvm cleanup: %v: %s", err, out)
	}
	n.assertNothingLeft(t, "after cleanup")
}

// TestNetworkTAPPortTaken: in tap mode too, a forward of a host port
// another program holds fails before boot with a clear error, leaving no
// VM, lease, TAP or rule.
func TestNetworkTAPPortTaken(t *testing.T) {
	n := newTapNS(t)
	port := 10000 + rand.IntN(9000)
	cmd := exec.Command("ip", "netns", "exec", n.name, "busybox", "httpd", "-f", "-p", fmt.Sprintf("127.0.0.1:%d", port), "-h", wwwDir(t, "taken", 0))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if err := testutil.Poll(30*time.Second, func() bool {
		_, err := n.exec(t, "busybox", "wget", "-q", "-O", "/dev/null", fmt.Sprintf("http://127.0.0.1:%d/index.html", port))
		return err == nil
	}); err != nil {
		t.Fatal("httpd did not answer:", err)
	}
	_, err := n.cli(t, "create", "--net", "tap", "-p", fmt.Sprintf("%d:80", port))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("host port %d", port)) || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("create with a taken port: %v", err)
	}
	ctx := testutil.Context(t, time.Minute)
	if vms, err := testutil.OpenHost(t, n.home).List(ctx); err != nil || len(vms) != 0 {
		t.Fatalf("VMs left: %v, %v", vms, err)
	}
	n.assertNothingLeft(t, "at the end")
}

// assertNothingLeft fails the test if the namespace still has a TAP, the
// smolvm nftables table, or the home a lease.
func (n *tapNS) assertNothingLeft(t *testing.T, when string) {
	t.Helper()
	if taps := n.taps(t); len(taps) != 0 {
		t.Fatalf("TAPs left %s: %v", when, taps)
	}
	if owners, ok := n.nftRules(t); ok {
		t.Fatalf("table inet smolvm left %s: %v", when, owners)
	}
	if ls := leases(t, n.home, "", ""); len(ls) != 0 {
		t.Fatalf("leases left %s: %v", when, ls)
	}
}
