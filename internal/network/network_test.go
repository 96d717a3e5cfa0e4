package network

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

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
	r := &fakeResolver{names: map[string][]string{"api.allowed.test": {"127.0.0.5"}, "allowed.test": {"127.0.0.6"}}}
	c := Config{Egress: Egress{Mode: EgressAllowlist, AllowDomains: []string{"allowed.test"}, AllowCIDRs: []string{"127.0.1.0/24"}},
		Hosts: map[string][]string{"static.allowed.test": {"127.0.0.7"}}}
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
	if err := ok("127.0.1.9"); err != nil {
		t.Errorf("address in an allowed CIDR: %v", err)
	}
	// Resolved at connect time: a changed answer is followed.
	if err := ok("127.0.0.6"); err != nil {
		t.Errorf("address of an allowed name: %v", err)
	}
	r.mu.Lock()
	r.names["allowed.test"] = []string{"127.0.0.8"}
	r.mu.Unlock()
	if err := ok("127.0.0.6"); !errors.Is(err, ErrDenied) {
		t.Errorf("old address of an allowed name: %v, want denied", err)
	}
	if err := ok("127.0.0.8"); err != nil {
		t.Errorf("new address of an allowed name: %v", err)
	}
	// A subdomain's address is allowed once the DNS server gave it out.
	if err := ok("127.0.0.5"); !errors.Is(err, ErrDenied) {
		t.Errorf("subdomain address before DNS: %v, want denied", err)
	}
	ips, err := p.lookup(ctx, "api.allowed.test")
	if err != nil {
		t.Fatal(err)
	}
	p.remember(ips)
	if err := ok("127.0.0.5"); err != nil {
		t.Errorf("subdomain address after DNS: %v", err)
	}
	if ips, err := p.lookup(ctx, "static.allowed.test"); err != nil || len(ips) != 1 || ips[0].String() != "127.0.0.7" {
		t.Errorf("static entry: %v, %v", ips, err)
	}
	if err := ok("169.254.169.254"); !errors.Is(err, ErrDenied) {
		t.Errorf("metadata: %v, want denied", err)
	}
	if err := ok("127.0.2.1"); !errors.Is(err, ErrDenied) {
		t.Errorf("other address: %v, want denied", err)
	}

	open := newPolicy(&Config{Egress: Egress{Mode: EgressOpen}}, r)
	if err := open.allow(ctx, netip.MustParseAddr("169.254.169.254")); !errors.Is(err, ErrDenied) {
		t.Errorf("open mode reaches metadata: %v", err)
	}
	if err := open.allow(ctx, netip.MustParseAddr("127.0.0.1")); !errors.Is(err, ErrDenied) {
		t.Errorf("open mode reaches host loopback without a name for it: %v", err)
	}
	open.remember([]netip.Addr{netip.MustParseAddr("127.0.0.1")})
	if err := open.allow(ctx, netip.MustParseAddr("127.0.0.1")); err != nil {
		t.Errorf("open mode, loopback resolved through --add-host: %v", err)
	}
	if err := open.allow(ctx, netip.MustParseAddr("203.0.113.1")); err != nil {
		t.Errorf("open mode: %v", err)
	}
	off := newPolicy(&Config{Egress: Egress{Mode: EgressOff}}, r)
	if err := off.allow(ctx, netip.MustParseAddr("127.0.0.1")); !errors.Is(err, ErrDenied) || off.nameAllowed("allowed.test") {
		t.Errorf("off mode allows: %v", err)
	}
}

func TestTranslate(t *testing.T) {
	n := &Stack{subnet: netip.MustParsePrefix(Subnet), aliases: map[netip.Addr]netip.Addr{
		netip.MustParseAddr(HostAliasIP): netip.MustParseAddr("127.0.0.1")}}
	for in, want := range map[string]string{HostAliasIP: "127.0.0.1", "192.168.127.1": "", "192.168.127.9": "", "127.0.0.1": "", "255.255.255.255": "", "203.0.113.1": "203.0.113.1"} {
		got, err := n.translate(netip.MustParseAddr(in))
		if want == "" {
			if !errors.Is(err, ErrDenied) {
				t.Errorf("translate(%s) = %v, %v; want denied", in, got, err)
			}
		} else if err != nil || got.String() != want {
			t.Errorf("translate(%s) = %v, %v; want %s", in, got, err, want)
		}
	}
	if g, ok := n.toGuest(netip.MustParseAddr("127.0.0.1")); !ok || g.String() != HostAliasIP {
		t.Errorf("toGuest(127.0.0.1) = %v, %v", g, ok)
	}
	if _, ok := n.toGuest(netip.MustParseAddr("127.0.0.2")); ok {
		t.Error("toGuest(127.0.0.2) maps an address without alias")
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
