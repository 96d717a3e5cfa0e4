package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// Resolver looks names up on the host. *net.Resolver is one.
type Resolver interface {
	LookupIPAddr(ctx context.Context, host string) ([]net.IPAddr, error)
}

// ErrDenied is wrapped by every refusal of the egress policy.
var ErrDenied = errors.New("denied by the egress policy")

// linkLocal holds cloud metadata services (169.254.169.254): never reached.
var linkLocal = netip.MustParsePrefix("169.254.0.0/16")

// answeredTTL is how long an address the DNS server gave out for an
// allowed name stays reachable.
const answeredTTL = 10 * time.Minute

// policy decides what the guest may resolve and reach.
type policy struct {
	mode     string
	domains  []string
	cidrs    []netip.Prefix
	hosts    map[string][]netip.Addr
	resolver Resolver

	mu       sync.Mutex
	answered map[netip.Addr]time.Time
}

func newPolicy(c *Config, r Resolver) *policy {
	p := &policy{mode: c.Egress.Mode, domains: c.Egress.AllowDomains, resolver: r,
		hosts: map[string][]netip.Addr{}, answered: map[netip.Addr]time.Time{}}
	if p.resolver == nil {
		p.resolver = net.DefaultResolver
	}
	for _, s := range c.Egress.AllowCIDRs {
		if pr, err := parseCIDR(s); err == nil {
			p.cidrs = append(p.cidrs, pr)
		}
	}
	for name, ips := range c.Hosts {
		for _, ip := range ips {
			if a, err := netip.ParseAddr(ip); err == nil {
				p.hosts[normName(name)] = append(p.hosts[normName(name)], a)
			}
		}
	}
	return p
}

// nameAllowed tells whether the guest may resolve name.
func (p *policy) nameAllowed(name string) bool {
	name = normName(name)
	switch p.mode {
	case EgressOpen:
		return true
	case EgressOff:
		return false
	}
	for _, d := range p.domains {
		if name == d || strings.HasSuffix(name, "."+d) {
			return true
		}
	}
	return false
}

// lookup resolves name to IPv4 addresses: static entries first, then the
// host's resolver.
func (p *policy) lookup(ctx context.Context, name string) ([]netip.Addr, error) {
	name = normName(name)
	if ips, ok := p.hosts[name]; ok {
		return ips, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	addrs, err := p.resolver.LookupIPAddr(ctx, name)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap().Is4() {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}

// remember records addresses given out for an allowed name.
func (p *policy) remember(ips []netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	until := time.Now().Add(answeredTTL)
	for _, ip := range ips {
		p.answered[ip] = until
	}
}

// wasAnswered tells whether the DNS server gave dst out for an allowed
// name recently.
func (p *policy) wasAnswered(dst netip.Addr) bool {
	p.mu.Lock()
	until, ok := p.answered[dst]
	p.mu.Unlock()
	return ok && time.Now().Before(until)
}

// allow decides a connection to dst (a host address, after translation).
// In allowlist mode dst must be in an allowed CIDR, an address the DNS
// server gave out for an allowed name, or an address an allowed name
// resolves to now.
func (p *policy) allow(ctx context.Context, dst netip.Addr) error {
	if linkLocal.Contains(dst) {
		return fmt.Errorf("%s is link-local (cloud metadata is never reachable): %w", dst, ErrDenied)
	}
	switch p.mode {
	case EgressOpen:
		// The host's own loopback services are not "the internet": an
		// open sandbox reaches them only through a name given with
		// --add-host (Config.Hosts) that it resolved first.
		if dst.IsLoopback() && !p.wasAnswered(dst) {
			return fmt.Errorf("%s is the host's loopback: map a name to it with --add-host NAME:%s: %w", dst, dst, ErrDenied)
		}
		return nil
	case EgressOff:
		return fmt.Errorf("%s: egress is off: %w", dst, ErrDenied)
	}
	for _, c := range p.cidrs {
		if c.Contains(dst) {
			return nil
		}
	}
	if p.wasAnswered(dst) {
		return nil
	}
	for _, d := range p.domains {
		ips, err := p.lookup(ctx, d)
		if err != nil {
			continue
		}
		for _, ip := range ips {
			if ip == dst {
				return nil
			}
		}
	}
	return fmt.Errorf("%s is not in the allowlist: %w", dst, ErrDenied)
}
