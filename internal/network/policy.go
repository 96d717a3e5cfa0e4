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

// maxAnswered bounds the addresses remembered from DNS answers; past it,
// expired ones are dropped.
const maxAnswered = 4096

// policy decides what the guest may resolve and reach.
type policy struct {
	mode     string
	domains  []string
	cidrs    []netip.Prefix
	hosts    map[string][]netip.Addr
	resolver Resolver
	// mapped are the addresses of --add-host names the guest may resolve:
	// the only addresses of the host itself it may reach.
	mapped map[netip.Addr]bool

	mu       sync.Mutex
	answered map[netip.Addr]time.Time
	swept    time.Time // last sweep of expired answers
}

func newPolicy(c *Config, r Resolver) *policy {
	p := &policy{mode: c.Egress.Mode, domains: c.Egress.AllowDomains, resolver: r,
		hosts: map[string][]netip.Addr{}, mapped: map[netip.Addr]bool{}, answered: map[netip.Addr]time.Time{}}
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
				if p.nameAllowed(name) {
					p.mapped[a] = true
				}
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
	return domainAllowed(p.domains, name)
}

// domainAllowed tells whether name is one of domains or a subdomain of one.
func domainAllowed(domains []string, name string) bool {
	for _, d := range domains {
		if name == d || strings.HasSuffix(name, "."+d) {
			return true
		}
	}
	return false
}

// lookup resolves name to IPv4 addresses: static entries first (static
// is true then), then the host's resolver.
func (p *policy) lookup(ctx context.Context, name string) (ips []netip.Addr, static bool, err error) {
	name = normName(name)
	if ips, ok := p.hosts[name]; ok {
		return ips, true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	addrs, err := p.resolver.LookupIPAddr(ctx, name)
	if err != nil {
		return nil, false, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap().Is4() {
			ips = append(ips, ip.Unmap())
		}
	}
	return ips, false, nil
}

// remember records addresses given out for an allowed name (allowlist
// mode: nothing else asks).
func (p *policy) remember(ips []netip.Addr) {
	if p.mode != EgressAllowlist {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if len(p.answered)+len(ips) > maxAnswered && now.Sub(p.swept) > time.Second {
		p.swept = now
		for ip, until := range p.answered {
			if now.After(until) {
				delete(p.answered, ip)
			}
		}
	}
	for _, ip := range ips {
		if _, ok := p.answered[ip]; ok || len(p.answered) < maxAnswered {
			p.answered[ip] = now.Add(answeredTTL)
		}
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

// allow decides a connection to dst (an address of another machine: the
// destination check has ruled out the host itself, see dest.go). In
// allowlist mode dst must be in an allowed CIDR, an address the DNS
// server gave out for an allowed name, or an address an allowed name
// resolves to now.
func (p *policy) allow(ctx context.Context, dst netip.Addr) error {
	if linkLocal.Contains(dst) {
		return fmt.Errorf("%s is link-local (cloud metadata is never reachable): %w", dst, ErrDenied)
	}
	switch p.mode {
	case EgressOpen:
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
		ips, _, err := p.lookup(ctx, d)
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
