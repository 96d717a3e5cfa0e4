package network

// nftables rules of TAP-mode VMs, all in one table, "inet smolvm":
//
//	chain input       filter hook input priority 0; policy accept
//	chain forward     filter hook forward priority 0; policy accept
//	chain postrouting nat hook postrouting priority 100 (srcnat); policy accept
//
// Each VM adds its own rules, all matching its TAP (iifname smvID) or its
// address, each with the comment "smolvm vm ID" (rule user data, which
// `nft list ruleset` shows), so that deleting one VM removes exactly its
// rules, and cleanup finds those of a VM whose supervisor died. The table
// is removed with the last rule. Per VM, in order:
//
//	forward:     iifname T meta nfproto ipv6 drop            (IPv4 only)
//	             iifname T ip saddr != G drop                (no spoofed sources)
//	             iifname T ip daddr 127.0.0.0/8 reject       (loopback, were route_localnet on)
//	             iifname T ip daddr 169.254.0.0/16 reject    (cloud metadata)
//	             iifname T oifname "smv*" reject             (guest-to-guest)
//	             iifname T ip daddr CIDR accept              (allowlist, each CIDR)
//	             iifname T reject                            (egress off/allowlist)
//	input:       iifname T meta nfproto ipv6 drop
//	             iifname T ip saddr != G drop
//	             iifname T ip daddr 127.0.0.0/8 reject
//	             iifname T ip daddr 169.254.0.0/16 reject
//	             iifname T ct state established,related accept
//	             iifname T ip daddr DNS udp/tcp dport 53 accept (open, DNS a host address)
//	             iifname T ip daddr CIDR accept              (allowlist)
//	             iifname T reject                            (the host itself)
//	postrouting: ip saddr G oifname != "smv*" masquerade
//
// The input chain is what the guest sends to the host itself (any of its
// addresses: the TAP's, its other interfaces'): only replies to
// connections the host opened (port forwards) and, in allowlist mode,
// addresses of an allowed CIDR get through, whatever the egress mode;
// open egress is the network beyond the host. The host's loopback is out
// of reach (the kernel drops 127.0.0.0/8 from a non-loopback device as
// martian unless route_localnet is on, and a rule rejects it then).
//
// Rejections are ICMP admin-prohibited, so a denied connection fails at
// once in the guest ("No route to host") instead of timing out.

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// NFTTable is the nftables table (family inet) of TAP-mode VMs.
const NFTTable = "smolvm"

// nftRuleComment is the comment of every rule of a VM: "smolvm vm " + id.
const nftRuleComment = "smolvm vm "

func nftTable() *nftables.Table {
	return &nftables.Table{Name: NFTTable, Family: nftables.TableFamilyINet}
}

type nftChains struct {
	input, forward, postrouting *nftables.Chain
}

func newNFTChains(t *nftables.Table) nftChains {
	return nftChains{
		input: &nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter},
		forward: &nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter},
		postrouting: &nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource},
	}
}

func (c nftChains) all() []*nftables.Chain {
	return []*nftables.Chain{c.input, c.forward, c.postrouting}
}

// RuleOwner is the VM id a rule of the smolvm table belongs to ("" when it
// carries no smolvm comment).
func RuleOwner(r *nftables.Rule) string {
	s, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	if !ok {
		return ""
	}
	id, _ := strings.CutPrefix(s, nftRuleComment)
	if id == s {
		return ""
	}
	return id
}

// ifname is an interface name as nftables compares it: NUL-padded to
// IFNAMSIZ for an exact match.
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

func matchIIF(tap string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(tap)},
	}
}

// matchOIFPrefix matches (or with neq, does not match) every interface
// whose name starts with prefix, like nft's oifname "smv*".
func matchOIFPrefix(op expr.CmpOp, prefix string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte(prefix)},
	}
}

func matchIPv4() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

// matchAddr matches the IPv4 source (offset 12) or destination (16)
// address against a prefix.
func matchAddr(offset uint32, p netip.Prefix) []expr.Any { return matchAddrOp(expr.CmpOpEq, offset, p) }

// matchAddrOp is matchAddr with a comparison: eq for in p, neq for not.
func matchAddrOp(op expr.CmpOp, offset uint32, p netip.Prefix) []expr.Any {
	ex := matchIPv4()
	ex = append(ex, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4})
	if p.Bits() < 32 {
		m := uint32(0)
		if p.Bits() > 0 {
			m = ^uint32(0) << (32 - p.Bits())
		}
		ex = append(ex, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.BigEndian.PutUint32(m), Xor: []byte{0, 0, 0, 0}})
	}
	a := p.Masked().Addr().As4()
	return append(ex, &expr.Cmp{Op: op, Register: 1, Data: a[:]})
}

func matchIPv6() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}},
	}
}

// matchDstPort matches a transport protocol (unix.IPPROTO_TCP, _UDP) and
// its destination port.
func matchDstPort(proto byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func matchEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

var (
	accept = &expr.Verdict{Kind: expr.VerdictAccept}
	drop   = &expr.Verdict{Kind: expr.VerdictDrop}
	reject = &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}
)

func join(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// vmRules are the rules of one VM, chain by chain, in order. dns is the
// guest's nameserver (invalid for none).
func vmRules(ch nftChains, tap string, guest, dns netip.Addr, eg Egress) (map[*nftables.Chain][][]expr.Any, error) {
	var cidrs []netip.Prefix
	if eg.Mode == EgressAllowlist {
		for _, s := range eg.AllowCIDRs {
			p, err := parseCIDR(s)
			if err != nil {
				return nil, err
			}
			cidrs = append(cidrs, p)
		}
	}
	restricted := eg.Mode == EgressOff || eg.Mode == EgressAllowlist
	iif := matchIIF(tap)
	out := map[*nftables.Chain][][]expr.Any{}
	// First in both chains: IPv4 from the guest's own address only.
	guard := [][]expr.Any{
		join(iif, matchIPv6(), []expr.Any{drop}),
		join(iif, matchAddrOp(expr.CmpOpNeq, 12, netip.PrefixFrom(guest, 32)), []expr.Any{drop}),
		join(iif, matchAddr(16, loopbackNet), []expr.Any{reject}),
		join(iif, matchAddr(16, linkLocal), []expr.Any{reject}),
	}

	fwd := append(slices.Clone(guard), join(iif, matchOIFPrefix(expr.CmpOpEq, TAPPrefix), []expr.Any{reject}))
	for _, p := range cidrs {
		fwd = append(fwd, join(iif, matchAddr(16, p), []expr.Any{accept}))
	}
	if restricted {
		fwd = append(fwd, join(iif, []expr.Any{reject}))
	}
	out[ch.forward] = fwd

	in := append(slices.Clone(guard), join(iif, matchEstablished(), []expr.Any{accept}))
	if eg.Mode == EgressOpen && dns.IsValid() {
		// A nameserver on one of the host's own addresses: DNS only.
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			in = append(in, join(iif, matchAddr(16, netip.PrefixFrom(dns, 32)), matchDstPort(proto, 53), []expr.Any{accept}))
		}
	}
	for _, p := range cidrs {
		in = append(in, join(iif, matchAddr(16, p), []expr.Any{accept}))
	}
	out[ch.input] = append(in, join(iif, []expr.Any{reject}))

	out[ch.postrouting] = [][]expr.Any{
		join(matchAddr(12, netip.PrefixFrom(guest, 32)), matchOIFPrefix(expr.CmpOpNeq, TAPPrefix), []expr.Any{&expr.Masq{}}),
	}
	return out, nil
}

// tableExists tells whether the smolvm table exists.
func tableExists(c *nftables.Conn) (bool, error) {
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range ts {
		if t.Name == NFTTable {
			return true, nil
		}
	}
	return false, nil
}

// queueDelete queues the deletion of owner's rules (every VM's when owner
// is "") on c and reports how many it queued and how many rules the table
// keeps.
func queueDelete(c *nftables.Conn, owner string) (deleted, kept int, err error) {
	rules, err := tableRules(c)
	if err != nil {
		return 0, 0, err
	}
	for _, r := range rules {
		if o := RuleOwner(r); o != "" && (owner == "" || o == owner) {
			if err := c.DelRule(r); err != nil {
				return 0, 0, err
			}
			deleted++
		} else {
			kept++
		}
	}
	return deleted, kept, nil
}

// tableRules lists the rules in the smolvm table's chains (none when there
// is no table).
func tableRules(c *nftables.Conn) ([]*nftables.Rule, error) {
	ok, err := tableExists(c)
	if err != nil || !ok {
		return nil, err
	}
	t := nftTable()
	var out []*nftables.Rule
	for _, ch := range newNFTChains(t).all() {
		rules, err := c.GetRules(t, ch)
		if err != nil {
			// A chain that does not exist has no rules.
			if exists, _ := chainExists(c, t, ch.Name); !exists {
				continue
			}
			return nil, fmt.Errorf("list nftables rules of %s: %w", ch.Name, err)
		}
		out = append(out, rules...)
	}
	return out, nil
}

func chainExists(c *nftables.Conn, t *nftables.Table, name string) (bool, error) {
	ch, err := c.ListChain(t, name)
	return err == nil && ch != nil, err
}

// addVMRules installs the rules of one VM (replacing any it had) in one
// transaction, creating the table and chains when needed.
func addVMRules(c *nftables.Conn, owner, tap string, guest, dns netip.Addr, eg Egress) error {
	unlock, err := lockNFT()
	if err != nil {
		return err
	}
	defer unlock()
	if _, _, err := queueDelete(c, owner); err != nil {
		return err
	}
	t := c.AddTable(nftTable())
	ch := newNFTChains(t)
	for _, chain := range ch.all() {
		c.AddChain(chain)
	}
	rules, err := vmRules(ch, tap, guest, dns, eg)
	if err != nil {
		return err
	}
	tag := userdata.AppendString(nil, userdata.TypeComment, nftRuleComment+owner)
	for _, chain := range ch.all() {
		for _, ex := range rules[chain] {
			c.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: ex, UserData: tag})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("add nftables rules (table inet %s): %w", NFTTable, err)
	}
	return nil
}

// deleteVMRules removes the rules of one VM, and the table when no rule is
// left in it. It reports how many rules it removed.
func deleteVMRules(c *nftables.Conn, owner string) (int, error) {
	unlock, err := lockNFT()
	if err != nil {
		return 0, err
	}
	defer unlock()
	deleted, kept, err := queueDelete(c, owner)
	if err != nil {
		return 0, err
	}
	if deleted == 0 && kept > 0 {
		return 0, nil
	}
	if kept == 0 {
		if ok, err := tableExists(c); err != nil || !ok {
			return 0, err
		}
		c.DelTable(nftTable())
	}
	if err := c.Flush(); err != nil {
		return 0, fmt.Errorf("delete nftables rules of VM %s (table inet %s): %w", owner, NFTTable, err)
	}
	return deleted, nil
}

// lockNFT serializes changes to the smolvm table across processes: a VM
// adding rules must not race another deleting the table it thinks empty.
func lockNFT() (func(), error) {
	var f *os.File
	var err error
	for _, dir := range []string{"/run", os.TempDir()} {
		f, err = os.OpenFile(filepath.Join(dir, "smolvm-nftables.lock"), os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err == nil {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("nftables lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("nftables lock: %w", err)
	}
	return func() { _ = f.Close() }, nil
}

// RuleOwners lists the VM id of every rule of the smolvm table in this
// network namespace (one entry per rule; none when there is no table).
func RuleOwners() ([]string, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	rules, err := tableRules(c)
	if err != nil {
		return nil, err
	}
	var owners []string
	for _, r := range rules {
		if o := RuleOwner(r); o != "" {
			owners = append(owners, o)
		}
	}
	return owners, nil
}
