package network

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/store"
)

func TestParseForward(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Forward
		err  string
	}{
		{"8080:80", Forward{"127.0.0.1", 8080, 80}, ""},
		{"0.0.0.0:8080:80", Forward{"0.0.0.0", 8080, 80}, ""},
		{"127.0.0.2:9000:9000/tcp", Forward{"127.0.0.2", 9000, 9000}, ""},
		{"80", Forward{"127.0.0.1", 0, 80}, ""},
		{"8080:80/udp", Forward{}, "only tcp"},
		{"x:80", Forward{}, "host port"},
		{"8080:0", Forward{}, "guest port"},
		{"8080:70000", Forward{}, "guest port"},
		{"::1:8080:80", Forward{}, "not an IPv4"},
	} {
		got, err := ParseForward(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("ParseForward(%q) = %v, %v; want error with %q", c.in, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseForward(%q) = %v, %v; want %v", c.in, got, err, c.want)
		}
	}
}

func TestNormalize(t *testing.T) {
	c := Config{}
	if err := c.Normalize(); err != nil || c.Mode != ModeUser || c.Egress.Mode != EgressOpen || c.GuestIP != GuestIP {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
	c = Config{Egress: Egress{AllowDomains: []string{"Example.COM."}}}
	if err := c.Normalize(); err != nil || c.Egress.Mode != EgressAllowlist || c.Egress.AllowDomains[0] != "example.com" {
		t.Fatalf("domains imply allowlist: %+v, %v", c, err)
	}
	for _, bad := range []Config{
		{Mode: "bridge"},
		{Egress: Egress{Mode: "sometimes"}},
		{Egress: Egress{Mode: EgressOpen, AllowCIDRs: []string{"10.0.0.0/8"}}},
		{Egress: Egress{AllowCIDRs: []string{"not-a-cidr"}}},
		{Mode: ModeNone, Forwards: []Forward{{"127.0.0.1", 1, 1}}},
		{Forwards: []Forward{{"127.0.0.1", 5000, 1}, {"127.0.0.1", 5000, 2}}},
		{Hosts: map[string][]string{"a.test": {"nope"}}},
	} {
		if err := bad.Normalize(); err == nil {
			t.Errorf("Normalize(%+v) succeeded; want an error", bad)
		}
	}
	// What would open the host, or silently do nothing, is refused with
	// the fix named.
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Egress: Egress{AllowCIDRs: []string{"127.0.0.1/32"}}}, "--add-host NAME:127.0.0.1"},
		{Config{Egress: Egress{AllowCIDRs: []string{"127.0.0.1"}}}, "--add-host NAME:127.0.0.1"},
		{Config{Egress: Egress{AllowCIDRs: []string{"127.0.0.0/8"}}}, "--add-host NAME:127.0.0.1"},
		{Config{Egress: Egress{AllowCIDRs: []string{HostAliasIP + "/32"}}}, "--add-host NAME:127.0.0.1"},
		{Config{Egress: Egress{AllowCIDRs: []string{"169.254.169.254/32"}}}, "never reachable"},
		{Config{Mode: ModeTAP, Egress: Egress{AllowCIDRs: []string{"127.0.0.1/32"}}}, "172.16.0.1"},
		{Config{Egress: Egress{Mode: EgressOff}, Hosts: map[string][]string{"svc": {"127.0.0.1"}}}, "--egress off"},
		{Config{Egress: Egress{AllowDomains: []string{"example.com"}}, Hosts: map[string][]string{"svc": {"127.0.0.1"}}}, "--allow-domain svc"},
		{Config{Hosts: map[string][]string{"svc": {"127.0.0.2"}}}, "--add-host svc:127.0.0.1"},
		{Config{Hosts: map[string][]string{"svc": {"0.0.0.0"}}}, "can connect to"},
		{Config{Hosts: map[string][]string{"svc": {"169.254.169.254"}}}, "never reachable"},
		{Config{Hosts: map[string][]string{"svc": {HostAliasIP}}}, "--add-host svc:127.0.0.1"},
	} {
		if err := c.cfg.Normalize(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Normalize(%+v) = %v; want an error naming %q", c.cfg, err, c.want)
		}
	}
	for _, good := range []Config{
		{Egress: Egress{AllowCIDRs: []string{"0.0.0.0/0"}}},
		{Egress: Egress{AllowCIDRs: []string{"192.168.0.0/16"}}},
		{Egress: Egress{AllowDomains: []string{"svc"}}, Hosts: map[string][]string{"SVC.": {"127.0.0.1"}}},
		{Hosts: map[string][]string{"svc": {"127.0.0.1"}, "db": {"203.0.113.5"}}},
	} {
		if err := good.Normalize(); err != nil {
			t.Errorf("Normalize(%+v): %v", good, err)
		}
	}
}

// fakeResolver counts lookups; it never reaches real DNS.
type fakeResolver struct {
	mu    sync.Mutex
	names map[string][]string
	calls int
}

func (r *fakeResolver) LookupIPAddr(_ context.Context, host string) ([]net.IPAddr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	ips, ok := r.names[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	var out []net.IPAddr
	for _, ip := range ips {
		out = append(out, net.IPAddr{IP: net.ParseIP(ip)})
	}
	return out, nil
}

func TestPolicy(t *testing.T) {
	ctx := context.Background()
	r := &fakeResolver{names: map[string][]string{"api.allowed.test": {"203.0.113.5"}, "allowed.test": {"203.0.113.6"}}}
	c := Config{Egress: Egress{Mode: EgressAllowlist, AllowDomains: []string{"allowed.test"}, AllowCIDRs: []string{"198.51.100.0/24"}},
		Hosts: map[string][]string{"static.allowed.test": {"203.0.113.7"}}}
	if err := c.Normalize(); err != nil {
		t.Fatal(err)
	}
	p := newPolicy(&c, r)
	for name, want := range map[string]bool{"allowed.test": true, "API.allowed.test.": true, "notallowed.test": false, "allowed.test.evil": false} {
		if got := p.nameAllowed(name); got != want {
			t.Errorf("nameAllowed(%q) = %v, want %v", name, got, want)
		}
	}
	ok := func(ip string) error { return p.allow(ctx, netip.MustParseAddr(ip)) }
	if err := ok("198.51.100.9"); err != nil {
		t.Errorf("address in an allowed CIDR: %v", err)
	}
	// Resolved at connect time: a changed answer is followed.
	if err := ok("203.0.113.6"); err != nil {
		t.Errorf("address of an allowed name: %v", err)
	}
	r.mu.Lock()
	r.names["allowed.test"] = []string{"203.0.113.8"}
	r.mu.Unlock()
	if err := ok("203.0.113.6"); !errors.Is(err, ErrDenied) {
		t.Errorf("old address of an allowed name: %v, want denied", err)
	}
	if err := ok("203.0.113.8"); err != nil {
		t.Errorf("new address of an allowed name: %v", err)
	}
	// A subdomain's address is allowed once the DNS server gave it out.
	if err := ok("203.0.113.5"); !errors.Is(err, ErrDenied) {
		t.Errorf("subdomain address before DNS: %v, want denied", err)
	}
	ips, static, err := p.lookup(ctx, "api.allowed.test")
	if err != nil || static {
		t.Fatal(err, static)
	}
	p.remember(ips)
	if err := ok("203.0.113.5"); err != nil {
		t.Errorf("subdomain address after DNS: %v", err)
	}
	if ips, static, err := p.lookup(ctx, "static.allowed.test"); err != nil || !static || len(ips) != 1 || ips[0].String() != "203.0.113.7" {
		t.Errorf("static entry: %v, %v, %v", ips, static, err)
	}
	if !p.mapped[netip.MustParseAddr("203.0.113.7")] {
		t.Errorf("an allowed --add-host address is not mapped: %v", p.mapped)
	}
	if err := ok("169.254.169.254"); !errors.Is(err, ErrDenied) {
		t.Errorf("metadata: %v, want denied", err)
	}
	if err := ok("192.0.2.1"); !errors.Is(err, ErrDenied) {
		t.Errorf("other address: %v, want denied", err)
	}
	// What DNS gave out is remembered within bounds.
	for i := range 2 * maxAnswered {
		p.remember([]netip.Addr{netip.AddrFrom4([4]byte{10, 77, byte(i >> 8), byte(i)})})
	}
	if len(p.answered) > maxAnswered {
		t.Errorf("%d addresses remembered, want at most %d", len(p.answered), maxAnswered)
	}

	open := newPolicy(&Config{Egress: Egress{Mode: EgressOpen}}, r)
	if err := open.allow(ctx, netip.MustParseAddr("169.254.169.254")); !errors.Is(err, ErrDenied) {
		t.Errorf("open mode reaches metadata: %v", err)
	}
	if err := open.allow(ctx, netip.MustParseAddr("203.0.113.1")); err != nil {
		t.Errorf("open mode: %v", err)
	}
	off := newPolicy(&Config{Egress: Egress{Mode: EgressOff}}, r)
	if err := off.allow(ctx, netip.MustParseAddr("203.0.113.1")); !errors.Is(err, ErrDenied) || off.nameAllowed("allowed.test") {
		t.Errorf("off mode allows: %v", err)
	}
}

// fakeRoutes answers route lookups like a host whose loopback is
// 127.0.0.0/8, whose own address is 198.51.100.7, with a tap-mode guest at
// 172.16.0.5 (device smv…), no route to 10.9.0.0/16, a broadcast address
// 203.0.113.255, and everything else out of eth0.
func fakeRoutes(a netip.Addr) (hostRoute, error) {
	switch {
	case a.IsLoopback(), a == netip.MustParseAddr("198.51.100.7"):
		return hostRoute{Type: unix.RTN_LOCAL, Dev: "lo"}, nil
	case a == netip.MustParseAddr("172.16.0.5"):
		return hostRoute{Type: unix.RTN_UNICAST, Dev: TAPPrefix + "0123456789ab"}, nil
	case netip.MustParsePrefix("10.9.0.0/16").Contains(a):
		return hostRoute{}, errors.New("network is unreachable")
	case a == netip.MustParseAddr("203.0.113.255"):
		return hostRoute{Type: unix.RTN_BROADCAST, Dev: "eth0"}, nil
	}
	return hostRoute{Type: unix.RTN_UNICAST, Dev: "eth0"}, nil
}

// testDest is the destination check of a user-mode network with cfg,
// fake routes, and host port 20001 forwarded to VM "other".
func testDest(t testing.TB, cfg Config) *destCheck {
	t.Helper()
	if err := cfg.Normalize(); err != nil {
		t.Fatal(err)
	}
	d := &destCheck{subnet: netip.MustParsePrefix(Subnet), aliases: map[netip.Addr]netip.Addr{},
		policy: newPolicy(&cfg, &fakeResolver{}), route: fakeRoutes,
		forwardedElsewhere: func(_ context.Context, port int) (string, error) {
			if port == 20001 {
				return "other", nil
			}
			return "", nil
		}}
	for g, h := range cfg.Aliases {
		d.aliases[netip.MustParseAddr(g)] = netip.MustParseAddr(h)
	}
	return d
}

// TestDestination: the destination check keeps the guest from the host
// itself (loopback, its own addresses, however the guest names them)
// unless a name mapped with --add-host leads there, from other VMs (tap
// guests, forwarded ports) and from link-local, and applies the egress
// policy.
func TestDestination(t *testing.T) {
	ctx := context.Background()
	denied := []string{
		HostAliasIP,           // the host's loopback, no --add-host for it
		GatewayIP,             // the stack itself, any port but DNS
		"192.168.127.9",       // the rest of the virtual subnet
		"127.0.0.1",           // loopback the guest sends itself
		"127.1.2.3",           // all of 127.0.0.0/8
		"::ffff:127.0.0.1",    // IPv4-mapped loopback
		"::1",                 // IPv6
		"2001:db8::1",         // IPv6
		"0.0.0.0",             // "this host"
		"255.255.255.255",     // broadcast
		"203.0.113.255",       // a broadcast route
		"224.0.0.1",           // multicast
		"169.254.169.254",     // cloud metadata
		"198.51.100.7",        // the host's own address
		"::ffff:198.51.100.7", // the same, IPv4-mapped
		"172.16.0.5",          // a tap-mode guest
		"10.9.1.1",            // no route
	}
	open := testDest(t, Config{})
	for _, a := range denied {
		if got, err := open.check(ctx, netip.MustParseAddr(a), 80); !errors.Is(err, ErrDenied) {
			t.Errorf("open, no --add-host: %s = %v, %v; want denied", a, got, err)
		}
	}
	if _, err := open.check(ctx, netip.MustParseAddr(HostAliasIP), 80); err == nil || !strings.Contains(err.Error(), "--add-host NAME:127.0.0.1") {
		t.Errorf("loopback refusal does not name the fix: %v", err)
	}
	if got, err := open.check(ctx, netip.MustParseAddr("203.0.113.1"), 443); err != nil || got.String() != "203.0.113.1" {
		t.Errorf("open: 203.0.113.1 = %v, %v", got, err)
	}

	// --add-host maps a name to the loopback and one to the host's own
	// address: those two open, nothing else of the host, and never a port
	// forwarded to another VM.
	mapped := testDest(t, Config{Hosts: map[string][]string{"svc": {"127.0.0.1"}, "me": {"198.51.100.7"}}})
	for in, want := range map[string]string{HostAliasIP: "127.0.0.1", "198.51.100.7": "198.51.100.7", "203.0.113.1": "203.0.113.1"} {
		if got, err := mapped.check(ctx, netip.MustParseAddr(in), 8080); err != nil || got.String() != want {
			t.Errorf("mapped: %s = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, a := range []string{"127.0.0.1", "127.0.0.2", "::ffff:127.0.0.1", "192.168.127.253"} {
		if got, err := mapped.check(ctx, netip.MustParseAddr(a), 8080); !errors.Is(err, ErrDenied) {
			t.Errorf("mapped: %s = %v, %v; want denied", a, got, err)
		}
	}
	if _, err := mapped.check(ctx, netip.MustParseAddr(HostAliasIP), 20001); !errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), "VM other") {
		t.Errorf("mapped loopback, another VM's forward: %v; want denied naming it", err)
	}

	// An allowlist: a CIDR covering everything opens neither the host nor
	// the loopback; an allowed mapped name does.
	wide := testDest(t, Config{Egress: Egress{Mode: EgressAllowlist, AllowCIDRs: []string{"0.0.0.0/0"}}})
	for _, a := range []string{HostAliasIP, "198.51.100.7", "169.254.169.254", "172.16.0.5"} {
		if got, err := wide.check(ctx, netip.MustParseAddr(a), 80); !errors.Is(err, ErrDenied) {
			t.Errorf("allow-cidr 0.0.0.0/0: %s = %v, %v; want denied", a, got, err)
		}
	}
	if _, err := wide.check(ctx, netip.MustParseAddr("203.0.113.1"), 80); err != nil {
		t.Errorf("allow-cidr 0.0.0.0/0: 203.0.113.1: %v", err)
	}
	al := testDest(t, Config{Egress: Egress{AllowDomains: []string{"svc"}}, Hosts: map[string][]string{"svc": {"127.0.0.1"}}})
	if got, err := al.check(ctx, netip.MustParseAddr(HostAliasIP), 80); err != nil || got.String() != "127.0.0.1" {
		t.Errorf("allowlist with svc mapped: %v, %v", got, err)
	}
	if _, err := al.check(ctx, netip.MustParseAddr("203.0.113.1"), 80); !errors.Is(err, ErrDenied) {
		t.Errorf("allowlist: an address outside it: %v", err)
	}
}

// TestRouteOf asks the real kernel (a route lookup sends nothing): the
// loopback and this host's own addresses are the host itself.
func TestRouteOf(t *testing.T) {
	addrs := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.53")}
	ifs, _ := net.InterfaceAddrs()
	for _, a := range ifs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() {
			addrs = append(addrs, p.Addr())
		}
	}
	for _, a := range addrs {
		r, err := routeOf(a)
		if err != nil || r.Type != unix.RTN_LOCAL {
			t.Errorf("routeOf(%s) = %+v, %v; want a local route", a, r, err)
		}
	}
}

// TestDNSNeverAnswersTheHost: names the host's resolver maps to the host
// itself (localhost, the host's name, a rebinding name) or to another VM
// get no address; an --add-host name for 127.0.0.1 gets the loopback's
// alias.
func TestDNSNeverAnswersTheHost(t *testing.T) {
	r := &fakeResolver{names: map[string][]string{
		"localhost":     {"127.0.0.1", "::1"},
		"myhost":        {"127.0.1.1"},
		"rebind.test":   {"198.51.100.7"}, // the host's own address (fakeRoutes)
		"tap.test":      {"172.16.0.5"},
		"mixed.test":    {"127.0.0.1", "203.0.113.4"},
		"example.test":  {"203.0.113.9"},
		"metadata.test": {"169.254.169.254"},
	}}
	cfg := Config{Hosts: map[string][]string{"svc": {"127.0.0.1"}}}
	if err := cfg.Normalize(); err != nil {
		t.Fatal(err)
	}
	d := testDest(t, cfg)
	d.policy.resolver = r
	n := &Stack{cfg: cfg, log: slog.New(slog.DiscardHandler), policy: d.policy, dest: d, aliases: d.aliases, ctx: context.Background()}
	ask := func(name string) string {
		q := new(dns.Msg)
		q.SetQuestion(dns.Fqdn(name), dns.TypeA)
		w := &dnsWriter{remote: &net.UDPAddr{IP: net.ParseIP(GuestIP), Port: 5353}}
		n.serveDNS(w, q)
		var out []string
		for _, rr := range w.reply.Answer {
			out = append(out, rr.(*dns.A).A.String())
		}
		return strings.Join(out, ",")
	}
	for name, want := range map[string]string{"localhost": "", "myhost": "", "rebind.test": "", "tap.test": "", "metadata.test": "",
		"mixed.test": "203.0.113.4", "example.test": "203.0.113.9", "svc": HostAliasIP} {
		if got := ask(name); got != want {
			t.Errorf("DNS %s = %q, want %q", name, got, want)
		}
	}
}

func openStore(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// vmRows creates n VM rows (lease owners) and returns their ids.
func vmRows(t *testing.T, st *store.Store, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		vm := &store.VM{State: store.StateCreating}
		if err := st.CreateVM(context.Background(), vm); err != nil {
			t.Fatal(err)
		}
		ids[i] = vm.ID
	}
	return ids
}

// TestLeasePortsParallel leases 50 free host ports at once for 50 VMs:
// all distinct and bindable, all released when the VMs are deleted.
func TestLeasePortsParallel(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	const n = 50
	ids := vmRows(t, st, n)
	ports := make([]int, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			f := Forward{HostIP: "127.0.0.1", GuestPort: 80}
			_, errs[i] = LeasePort(ctx, st, ids[i], &f)
			ports[i] = f.HostPort
		})
	}
	wg.Wait()
	seen := map[int]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("lease %d: %v", i, errs[i])
		}
		if seen[ports[i]] || ports[i] < EphemeralLo || ports[i] > EphemeralHi {
			t.Fatalf("lease %d: port %d repeated or out of range", i, ports[i])
		}
		seen[ports[i]] = true
	}
	leases, _ := st.Leases(ctx, PortPool)
	if len(leases) != n {
		t.Fatalf("%d leases, want %d", len(leases), n)
	}
	// A port leased to one VM is refused to another, naming the holder;
	// asking again for the holder is fine.
	f := Forward{HostIP: "127.0.0.1", HostPort: ports[0], GuestPort: 80}
	if _, err := LeasePort(ctx, st, ids[1], &f); !errors.Is(err, store.ErrExists) || !strings.Contains(err.Error(), ids[0]) {
		t.Errorf("lease of a taken port: %v", err)
	}
	if fresh, err := LeasePort(ctx, st, ids[0], &f); err != nil || fresh {
		t.Errorf("lease again by its holder: %v, %v", fresh, err)
	}
	for _, id := range ids {
		if err := st.DeleteVM(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if leases, _ := st.Leases(ctx, PortPool); len(leases) != 0 {
		t.Fatalf("%d leases left after delete", len(leases))
	}
}

func TestListenForwardTaken(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	err = CheckBindable(Forward{HostIP: "127.0.0.1", HostPort: port, GuestPort: 80})
	if err == nil || !strings.Contains(err.Error(), "already in use") || !strings.Contains(err.Error(), "pick another host port") {
		t.Fatalf("taken port: %v", err)
	}
}

// BenchmarkRouteOf is the cost the destination check adds to every
// connection a guest opens: one route lookup in the kernel.
func BenchmarkRouteOf(b *testing.B) {
	a := netip.MustParseAddr("127.0.0.1")
	for b.Loop() {
		if _, err := routeOf(a); err != nil {
			b.Fatal(err)
		}
	}
}

// A guest sending to one address again and again costs one route lookup
// per routeTTL, whatever the check's answer.
func TestDestinationRouteCache(t *testing.T) {
	d := testDest(t, Config{})
	calls := 0
	d.route = func(a netip.Addr) (hostRoute, error) { calls++; return fakeRoutes(a) }
	for _, dst := range []string{"198.51.100.7", "203.0.113.9"} { // the host's own (denied), another machine's
		for range 100 {
			_, _ = d.check(context.Background(), netip.MustParseAddr(dst), 80)
		}
	}
	if calls != 2 {
		t.Errorf("%d route lookups for 200 checks of 2 addresses, want 2", calls)
	}
}
