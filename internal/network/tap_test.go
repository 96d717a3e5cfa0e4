package network

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/google/nftables"

	"github.com/smolvm/smolvm/internal/store"
)

func TestParseTAPSubnet(t *testing.T) {
	for _, c := range []struct{ in, want, err string }{
		{"172.16.0.0/16", "172.16.0.0/16", ""},
		{"10.9.8.7/24", "10.9.8.0/24", ""},
		{"192.168.50.0/30", "192.168.50.0/30", ""},
		{"192.168.50.0/31", "", "/8 to /30"},
		{"10.0.0.0/7", "", "/8 to /30"},
		{"fd00::/64", "", "not an IPv4 network"},
		{"nope", "", "not an IPv4 network"},
	} {
		p, err := ParseTAPSubnet(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("ParseTAPSubnet(%q) = %v, %v; want error with %q", c.in, p, err, c.err)
			}
			continue
		}
		if err != nil || p.String() != c.want {
			t.Errorf("ParseTAPSubnet(%q) = %v, %v; want %s", c.in, p, err, c.want)
		}
	}
	p := netip.MustParsePrefix(DefaultTAPSubnet)
	lo, hi := tapGuestRange(p)
	if TAPGateway(p).String() != "172.16.0.1" || intToAddr(lo).String() != "172.16.0.2" || intToAddr(hi).String() != "172.16.255.254" {
		t.Errorf("default pool: gateway %s, guests %s-%s", TAPGateway(p), intToAddr(lo), intToAddr(hi))
	}
	if n := TAPName("0123456789ab"); n != "smv0123456789ab" || len(n) > 15 {
		t.Errorf("TAPName = %q", n)
	}
}

func TestNormalizeTAP(t *testing.T) {
	c := Config{Mode: ModeTAP}
	if err := c.Normalize(); err != nil || c.Subnet != DefaultTAPSubnet || c.GuestIP != "" || c.Aliases != nil {
		t.Fatalf("tap defaults: %+v, %v", c, err)
	}
	c = Config{Mode: ModeTAP, Egress: Egress{AllowDomains: []string{"example.com"}}}
	if err := c.Normalize(); err == nil || !strings.Contains(err.Error(), "--net user") {
		t.Fatalf("domain allowlist in tap mode: %v", err)
	}
	c = Config{Mode: ModeTAP, Hosts: map[string][]string{"a.test": {"10.0.0.1"}}}
	if err := c.Normalize(); err == nil || !strings.Contains(err.Error(), "--net user") {
		t.Fatalf("host entries in tap mode: %v", err)
	}
	c = Config{Mode: ModeTAP, Subnet: "10.0.0.0/31"}
	if err := c.Normalize(); err == nil {
		t.Fatal("a /31 pool was accepted")
	}
	c = Config{Mode: ModeTAP, GuestIP: "172.16.0.9", Gateway: "172.16.0.1", DNS: ""}
	if got := c.GuestCmdline(); got != "smolvm.net=172.16.0.9/32,172.16.0.1," {
		t.Fatalf("GuestCmdline = %q", got)
	}
}

func TestFirstNameserver(t *testing.T) {
	f := t.TempDir() + "/resolv.conf"
	if err := os.WriteFile(f, []byte("# x\nnameserver 127.0.0.53\nnameserver fd00::1\nsearch x\nnameserver 10.1.2.3\nnameserver 10.1.2.4\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := firstNameserver(f); got != "10.1.2.3" {
		t.Fatalf("firstNameserver = %q", got)
	}
}

// TestTAPLeasesParallel leases guest addresses for 50 VMs at once: all
// distinct and in the pool, all released when the VMs are deleted; a full
// pool is a clear error.
func TestTAPLeasesParallel(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	const n = 50
	ids := vmRows(t, st, n)
	pool := netip.MustParsePrefix(DefaultTAPSubnet)
	addrs := make([]netip.Addr, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { addrs[i], errs[i] = LeaseTAPAddress(ctx, st, ids[i], pool) })
	}
	wg.Wait()
	seen := map[netip.Addr]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("lease %d: %v", i, errs[i])
		}
		a := addrs[i]
		if seen[a] || !pool.Contains(a) || a == TAPGateway(pool) || a == pool.Addr() {
			t.Fatalf("lease %d: %s repeated or not a guest address of %s", i, a, pool)
		}
		seen[a] = true
	}
	// The lowest free addresses: 172.16.0.2 … 172.16.0.51.
	for i := 2; i < 2+n; i++ {
		if a := netip.AddrFrom4([4]byte{172, 16, 0, byte(i)}); !seen[a] {
			t.Errorf("%s not leased", a)
		}
	}
	if ls, _ := st.Leases(ctx, TAPPool); len(ls) != n {
		t.Fatalf("%d leases, want %d", len(ls), n)
	}
	for _, id := range ids {
		if err := st.DeleteVM(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if ls, _ := st.Leases(ctx, TAPPool); len(ls) != 0 {
		t.Fatalf("%d leases left after delete", len(ls))
	}

	// A /30 has one guest address.
	small := netip.MustParsePrefix("10.77.0.0/30")
	if a, err := LeaseTAPAddress(ctx, st, "vm-a", small); err != nil || a.String() != "10.77.0.2" {
		t.Fatalf("lease from a /30: %v, %v", a, err)
	}
	if _, err := LeaseTAPAddress(ctx, st, "vm-b", small); !errors.Is(err, store.ErrExhausted) || !strings.Contains(err.Error(), "--tap-cidr") {
		t.Fatalf("lease from a full pool: %v", err)
	}
}

// testNetNS makes a network namespace for this test (deleted after it) and
// returns a file of it. Nothing is sent anywhere: the rules are only
// installed and listed.
func testNetNS(t *testing.T) *os.File {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("nftables rules need root: run the tests as root")
	}
	name := fmt.Sprintf("smvunit-%08x", rand.Uint32())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("cannot create a network namespace (ip netns add): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	f, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func ruleOwners(t *testing.T, c *nftables.Conn) (map[string]int, bool) {
	t.Helper()
	ok, err := tableExists(c)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		return nil, false
	}
	out := map[string]int{}
	tb := nftTable()
	for _, ch := range newNFTChains(tb).all() {
		rules, err := c.GetRules(tb, ch)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			out[RuleOwner(r)]++
		}
	}
	return out, true
}

// TestNFTRules installs the rules of three VMs (open, allowlist, off) in a
// fresh network namespace, replaces one VM's, and removes them VM by VM:
// each removal takes exactly that VM's rules, the last takes the table.
func TestNFTRules(t *testing.T) {
	ns := testNetNS(t)
	c, err := nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	vms := []struct {
		id    string
		guest string
		dns   string
		eg    Egress
		rules int
	}{
		// forward: guards (ipv6, spoofed source, loopback, link-local), guest-to-guest, CIDRs, reject;
		// input: guards, established, DNS (open: udp, tcp), CIDRs, reject; postrouting: masquerade.
		{"aaaaaaaaaaaa", "172.16.0.2", "192.0.2.53", Egress{Mode: EgressOpen}, (4 + 1) + (4 + 1 + 2 + 1) + 1},
		{"bbbbbbbbbbbb", "172.16.0.3", "", Egress{Mode: EgressAllowlist, AllowCIDRs: []string{"10.0.0.0/8", "192.0.2.7/32"}}, (4 + 1 + 2 + 1) + (4 + 1 + 2 + 1) + 1},
		{"cccccccccccc", "172.16.0.4", "192.0.2.53", Egress{Mode: EgressOff}, (4 + 1 + 1) + (4 + 1 + 1) + 1},
	}
	add := func(i int) error {
		v := vms[i]
		dns, _ := netip.ParseAddr(v.dns)
		return addVMRules(c, v.id, TAPName(v.id), netip.MustParseAddr(v.guest), dns, v.eg)
	}
	for i, v := range vms {
		if err := add(i); err != nil {
			t.Fatalf("add rules of %s: %v", v.id, err)
		}
	}
	// Adding again replaces, not duplicates.
	if err := add(0); err != nil {
		t.Fatal(err)
	}
	owners, ok := ruleOwners(t, c)
	if !ok {
		t.Fatal("no table inet smolvm")
	}
	for _, v := range vms {
		if owners[v.id] != v.rules {
			t.Errorf("VM %s has %d rules, want %d (all: %v)", v.id, owners[v.id], v.rules, owners)
		}
	}
	if len(owners) != len(vms) {
		t.Errorf("rule owners: %v", owners)
	}
	for i, v := range vms {
		n, err := deleteVMRules(c, v.id)
		if err != nil || n != v.rules {
			t.Fatalf("delete rules of %s: %d, %v; want %d", v.id, n, err, v.rules)
		}
		owners, ok := ruleOwners(t, c)
		if i < len(vms)-1 {
			if !ok || owners[v.id] != 0 || len(owners) != len(vms)-1-i {
				t.Fatalf("after deleting %s: %v (table %v)", v.id, owners, ok)
			}
		} else if ok {
			t.Fatalf("table left after the last VM's rules went: %v", owners)
		}
	}
	// Deleting what is not there is fine.
	if n, err := deleteVMRules(c, "dddddddddddd"); err != nil || n != 0 {
		t.Fatalf("delete without a table: %d, %v", n, err)
	}
}
