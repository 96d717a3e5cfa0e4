// Package network gives a VM its network: none, a userspace NAT stack, or a
// TAP device.
//
// User mode (stack.go): gvisor-tap-vsock's switch and gVisor's netstack run
// inside the VM's supervisor, connected to QEMU's `-netdev stream` over a
// unix socket. The stack serves DNS to the guest, forwards host ports to
// guest ports and enforces an egress policy on every connection the guest
// opens. Addresses (the same in every VM; each VM has its own stack):
//
//	192.168.127.0/24   the virtual subnet
//	192.168.127.1      gateway and DNS server
//	192.168.127.2      the guest (eth0)
//	192.168.127.254    the host's loopback: connections to it go to 127.0.0.1,
//	                   when a name mapped with --add-host NAME:127.0.0.1 opens it
//
// The host itself (loopback and its own addresses) and other VMs are out
// of the guest's reach but through --add-host names: see dest.go for the
// one check every connection passes.
//
// TAP mode (tap.go, nft.go; root): the supervisor creates a non-persistent
// TAP device per VM with netlink and hands QEMU its file descriptor. The
// host side of every TAP is the pool's first address (172.16.0.1 by
// default) as a /32, with a /32 route to the guest's address, which is
// leased from the pool (pool "tap-ip" in the store). The guest's eth0 is
// ADDR/32 with the host as an on-link gateway, so even traffic to another
// guest goes through the host, where nftables (table "inet smolvm")
// rejects it, masquerades the rest to the host's other interfaces and
// enforces the egress policy's CIDRs; the host itself is reached only
// through an allowed CIDR that covers its address. Every rule of a VM carries a comment
// naming the VM, so delete and cleanup remove exactly its rules.
package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/smolvm/smolvm/internal/wire"
)

// Mode is how a VM is networked.
type Mode string

// Modes.
const (
	ModeNone Mode = "none" // no NIC
	ModeUser Mode = "user" // userspace NAT in the supervisor (default, no root)
	ModeTAP  Mode = "tap"  // a TAP device per VM (root)
)

// Addresses of the user-mode network.
const (
	Subnet      = "192.168.127.0/24"
	PrefixLen   = 24
	GatewayIP   = "192.168.127.1"
	GuestIP     = "192.168.127.2"
	HostAliasIP = "192.168.127.254"
	GuestMAC    = "5a:94:ef:e4:0c:ee"
	GatewayMAC  = "5a:94:ef:e4:0c:dd"
	MTU         = 1500
)

// SocketName is the unix socket in the VM's folder that QEMU's stream
// netdev connects to.
const SocketName = "net.sock"

// PortPool is the store lease pool of forwarded host ports.
const PortPool = "host-port"

// TAP mode: the default address pool and its store lease pool (values are
// IPv4 addresses as integers).
const (
	DefaultTAPSubnet = "172.16.0.0/16"
	TAPPool          = "tap-ip"
	// TAPPrefix starts the host-side name of every VM's TAP device
	// ("smv" + VM id); nftables rules match it to tell TAPs apart.
	TAPPrefix = "smv"
)

// Ephemeral host ports (a forward given without a host port) are leased
// from this range.
const (
	EphemeralLo = 20000
	EphemeralHi = 29999
)

// Egress modes.
const (
	EgressOpen      = "open"      // everything but link-local (cloud metadata)
	EgressOff       = "off"       // nothing leaves the VM; DNS refuses every query
	EgressAllowlist = "allowlist" // only AllowDomains and AllowCIDRs
)

// Egress is what the guest may reach outside the VM.
type Egress struct {
	Mode string `json:"mode,omitempty"`
	// AllowDomains are names the guest may resolve and connect to; a name
	// also allows its subdomains ("example.com" allows "api.example.com").
	AllowDomains []string `json:"allow_domains,omitempty"`
	// AllowCIDRs are destination networks the guest may connect to.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
}

// Forward maps a host TCP port to a guest TCP port.
type Forward struct {
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

func (f Forward) String() string {
	return fmt.Sprintf("%s->%d/tcp", net.JoinHostPort(f.HostIP, strconv.Itoa(f.HostPort)), f.GuestPort)
}

// Config is a VM's network as stored in its spec.
type Config struct {
	Mode     Mode      `json:"mode"`
	GuestIP  string    `json:"guest_ip,omitempty"`
	Gateway  string    `json:"gateway,omitempty"`
	Forwards []Forward `json:"forwards,omitempty"`
	Egress   Egress    `json:"egress"`
	// Hosts are static name → IPv4 entries the stack's DNS answers (and
	// the egress policy resolves) before asking the host's resolver. The
	// addresses of the names egress allows are the only ones of the host
	// itself (127.0.0.1, the host's own addresses) the guest reaches.
	Hosts map[string][]string `json:"hosts,omitempty"`
	// Aliases map guest-visible addresses of the virtual subnet to host
	// addresses (loopback only); default HostAliasIP → 127.0.0.1.
	Aliases map[string]string `json:"aliases,omitempty"`

	// TAP mode only.
	// Subnet is the address pool (default DefaultTAPSubnet): the host is
	// its first address (Gateway), the guest's address is leased from
	// the rest.
	Subnet string `json:"subnet,omitempty"`
	// TAP is the host-side device name.
	TAP string `json:"tap,omitempty"`
	// MAC is the guest NIC's address.
	MAC string `json:"mac,omitempty"`
	// DNS is the guest's nameserver ("" for none): the host's first
	// non-loopback nameserver.
	DNS string `json:"dns,omitempty"`
	// NetNS identifies (by inode) the network namespace the TAP and its
	// nftables rules live in, so cleanup can find them from another one.
	NetNS uint64 `json:"netns,omitempty"`
}

// ParseForward reads docker's -p form: [IP:]HOST:GUEST or GUEST (an
// ephemeral host port), with an optional "/tcp". The host IP defaults to
// 127.0.0.1.
func ParseForward(s string) (Forward, error) {
	spec := s
	if p, proto, ok := strings.Cut(s, "/"); ok {
		if proto != "tcp" {
			return Forward{}, fmt.Errorf("port forward %q: only tcp is supported", s)
		}
		spec = p
	}
	f := Forward{HostIP: "127.0.0.1"}
	var host, guest string
	if i := strings.LastIndex(spec, ":"); i < 0 {
		guest = spec
	} else {
		guest = spec[i+1:]
		rest := spec[:i]
		if j := strings.LastIndex(rest, ":"); j >= 0 {
			f.HostIP = strings.Trim(rest[:j], "[]")
			host = rest[j+1:]
		} else {
			host = rest
		}
	}
	var err error
	if f.GuestPort, err = parsePort(guest, false); err != nil {
		return Forward{}, fmt.Errorf("port forward %q: guest port: %w (use [IP:]HOST:GUEST, e.g. 127.0.0.1:8080:80)", s, err)
	}
	if host != "" {
		if f.HostPort, err = parsePort(host, true); err != nil {
			return Forward{}, fmt.Errorf("port forward %q: host port: %w (use [IP:]HOST:GUEST, e.g. 127.0.0.1:8080:80)", s, err)
		}
	}
	if ip, err := netip.ParseAddr(f.HostIP); err != nil || !ip.Is4() {
		return Forward{}, fmt.Errorf("port forward %q: host IP %q is not an IPv4 address", s, f.HostIP)
	}
	return f, nil
}

func parsePort(s string, zeroOK bool) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 65535 || (n == 0 && !zeroOK) {
		return 0, fmt.Errorf("%q is not a port number (1-65535)", s)
	}
	return n, nil
}

// Normalize fills defaults and checks the config.
func (c *Config) Normalize() error {
	switch c.Mode {
	case "":
		c.Mode = ModeUser
	case ModeNone, ModeUser, ModeTAP:
	default:
		return fmt.Errorf("network mode %q: use none, user or tap", c.Mode)
	}
	if c.Mode == ModeNone {
		if len(c.Forwards) > 0 {
			return errors.New("port forwards need a network: drop --net none")
		}
		return nil
	}
	if c.Mode == ModeTAP {
		if len(c.Egress.AllowDomains) > 0 {
			return errors.New("egress domain allowlists are enforced by the user-mode network's DNS server, which tap mode does not have: use --net user, or allow addresses with --allow-cidr")
		}
		if len(c.Hosts) > 0 {
			return errors.New("static host entries (--add-host) are answered by the user-mode network's DNS server, which tap mode does not have: use --net user")
		}
		if c.Subnet == "" {
			c.Subnet = DefaultTAPSubnet
		}
		p, err := ParseTAPSubnet(c.Subnet)
		if err != nil {
			return err
		}
		c.Subnet = p.String()
	} else if c.GuestIP == "" {
		c.GuestIP = GuestIP
	}
	if c.Mode == ModeUser {
		if c.Gateway == "" {
			c.Gateway = GatewayIP
		}
		if c.Aliases == nil {
			c.Aliases = map[string]string{HostAliasIP: "127.0.0.1"}
		}
	}
	switch c.Egress.Mode {
	case "":
		c.Egress.Mode = EgressOpen
		if len(c.Egress.AllowDomains)+len(c.Egress.AllowCIDRs) > 0 {
			c.Egress.Mode = EgressAllowlist
		}
	case EgressOpen, EgressOff, EgressAllowlist:
	default:
		return fmt.Errorf("egress %q: use open, off or allowlist", c.Egress.Mode)
	}
	if c.Egress.Mode != EgressAllowlist && len(c.Egress.AllowDomains)+len(c.Egress.AllowCIDRs) > 0 {
		return fmt.Errorf("allowed domains and CIDRs need egress mode allowlist, not %s", c.Egress.Mode)
	}
	for i, d := range c.Egress.AllowDomains {
		d = normName(d)
		if d == "" || strings.ContainsAny(d, " /:") {
			return fmt.Errorf("allowed domain %q is not a domain name", c.Egress.AllowDomains[i])
		}
		c.Egress.AllowDomains[i] = d
	}
	for i, s := range c.Egress.AllowCIDRs {
		p, err := parseCIDR(s)
		if err != nil {
			return err
		}
		if err := c.checkAllowCIDR(p); err != nil {
			return err
		}
		c.Egress.AllowCIDRs[i] = p.String()
	}
	if err := c.checkHosts(); err != nil {
		return err
	}
	seen := map[int]bool{}
	for _, f := range c.Forwards {
		if f.HostPort != 0 && seen[f.HostPort] {
			return fmt.Errorf("host port %d is forwarded twice", f.HostPort)
		}
		seen[f.HostPort] = true
	}
	return nil
}

var (
	loopbackNet = netip.MustParsePrefix("127.0.0.0/8")
	userSubnet  = netip.MustParsePrefix(Subnet)
)

// checkAllowCIDR refuses an allowed network that could only mean what an
// allowlist never opens: the host's loopback (a name mapped with
// --add-host opens it), link-local addresses, or (user mode) the VM's own
// virtual network. A wider network that covers them (0.0.0.0/0) is
// accepted and does not open them either.
func (c *Config) checkAllowCIDR(p netip.Prefix) error {
	switch {
	case loopbackNet.Bits() <= p.Bits() && loopbackNet.Contains(p.Addr()):
		hint := "map a name to the host's loopback with --add-host NAME:127.0.0.1 (and allow that name with --allow-domain NAME)"
		if c.Mode == ModeTAP {
			hint = "a tap-mode guest never reaches the host's loopback; reach host services on the host's TAP address (" + TAPGateway(netip.MustParsePrefix(c.Subnet)).String() + ") with --allow-cidr"
		}
		return fmt.Errorf("allowed CIDR %s is the host's loopback, which an allowlist never opens: %s", p, hint)
	case linkLocal.Bits() <= p.Bits() && linkLocal.Contains(p.Addr()):
		return fmt.Errorf("allowed CIDR %s is link-local (169.254.0.0/16, cloud metadata), which is never reachable", p)
	case c.Mode == ModeUser && userSubnet.Bits() <= p.Bits() && userSubnet.Contains(p.Addr()):
		return fmt.Errorf("allowed CIDR %s is the VM's own virtual network (%s); to reach the host's loopback map a name with --add-host NAME:127.0.0.1", p, Subnet)
	}
	return nil
}

// checkHosts checks the --add-host entries: IPv4 addresses a guest can be
// sent to, names the egress policy lets the guest resolve.
func (c *Config) checkHosts() error {
	if len(c.Hosts) > 0 && c.Egress.Mode == EgressOff {
		return errors.New("static host entries (--add-host) need egress: with --egress off the VM's DNS refuses every name and nothing is reachable; drop --add-host, or use --egress allowlist --allow-domain NAME")
	}
	names := make([]string, 0, len(c.Hosts))
	for name := range c.Hosts {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		n := normName(name)
		if n == "" || strings.ContainsAny(n, " /:") {
			return fmt.Errorf("host entry %q: not a host name (use --add-host NAME:IP)", name)
		}
		if c.Egress.Mode == EgressAllowlist && !domainAllowed(c.Egress.AllowDomains, n) {
			return fmt.Errorf("host entry %s: the name is not in the egress allowlist, so the guest could not resolve it: add --allow-domain %s", n, n)
		}
		for _, ip := range c.Hosts[name] {
			a, err := netip.ParseAddr(ip)
			switch {
			case err != nil || !a.Is4():
				return fmt.Errorf("host entry %s: %q is not an IPv4 address", n, ip)
			case a.IsLoopback() && a != netip.MustParseAddr("127.0.0.1"):
				return fmt.Errorf("host entry %s: %s: of the host's loopback only 127.0.0.1 is reachable from a guest: use --add-host %s:127.0.0.1", n, a, n)
			case a.IsUnspecified() || a.IsMulticast() || a == broadcast:
				return fmt.Errorf("host entry %s: %s is not an address a guest can connect to", n, a)
			case linkLocal.Contains(a):
				return fmt.Errorf("host entry %s: %s is link-local (cloud metadata), which is never reachable", n, a)
			case userSubnet.Contains(a):
				return fmt.Errorf("host entry %s: %s is in the VM's own virtual network (%s); for the host's loopback use --add-host %s:127.0.0.1", n, a, Subnet, n)
			}
		}
	}
	return nil
}

// parseCIDR accepts a CIDR or a bare IPv4 address (a /32).
func parseCIDR(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			return netip.Prefix{}, fmt.Errorf("allowed CIDR %q is not an IPv4 network (e.g. 10.0.0.0/8)", s)
		}
		return netip.PrefixFrom(a, 32), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("allowed CIDR %q is not an IPv4 network (e.g. 10.0.0.0/8)", s)
	}
	return p.Masked(), nil
}

func normName(s string) string { return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), ".") }

// GuestCmdline is the kernel command line option that tells the guest
// agent how to configure eth0: smolvm.net=ADDR/PREFIX,GATEWAY,DNS (DNS may
// be empty). In tap mode the address is a /32 and the gateway is reached
// on-link.
func (c *Config) GuestCmdline() string {
	switch c.Mode {
	case ModeNone, "":
		return ""
	case ModeTAP:
		return fmt.Sprintf("%s=%s/32,%s,%s", wire.ParamNet, c.GuestIP, c.Gateway, c.DNS)
	}
	return fmt.Sprintf("%s=%s/%d,%s,%s", wire.ParamNet, c.GuestIP, PrefixLen, c.Gateway, c.Gateway)
}

// GuestDNS is the guest's nameserver ("" for none).
func (c *Config) GuestDNS() string {
	if c.Mode == ModeTAP {
		return c.DNS
	}
	return c.Gateway
}

// Summary describes the network for status output.
func (c *Config) Summary() (addr, egress string) {
	if c.Mode == ModeNone || c.Mode == "" {
		return "none", "none"
	}
	if c.Mode == ModeTAP {
		dns := c.DNS
		if dns == "" {
			dns = "none"
		}
		addr = fmt.Sprintf("%s/32 via %s on %s (pool %s, dns %s, NAT to the host's network)", c.GuestIP, c.Gateway, c.TAP, c.Subnet, dns)
	} else {
		addr = fmt.Sprintf("%s/%d via %s (dns %s; host loopback at %s for --add-host names)", c.GuestIP, PrefixLen, c.Gateway, c.Gateway, HostAliasIP)
	}
	egress = c.Egress.Mode
	if c.Egress.Mode == EgressAllowlist {
		var parts []string
		parts = append(parts, c.Egress.AllowDomains...)
		parts = append(parts, c.Egress.AllowCIDRs...)
		egress += ": " + strings.Join(parts, ", ")
	}
	return addr, egress
}

// sortForwards orders forwards by host port.
func sortForwards(fs []Forward) {
	sort.Slice(fs, func(i, j int) bool { return fs[i].HostPort < fs[j].HostPort })
}
