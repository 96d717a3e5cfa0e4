package network

// The destination check: the one place that decides where a guest's
// connection through the user-mode stack may go. Every TCP connection and
// UDP flow the guest opens passes it once, at setup, on the address that
// will be dialed, after any translation (192.168.127.254 → 127.0.0.1) and
// whatever DNS answer led the guest there, so a name the host's resolver
// maps to 127.0.0.1 or to one of the host's addresses (DNS rebinding)
// cannot open the host. In order:
//
//  1. the guest-visible address: an alias of the host's loopback becomes
//     its loopback address; the rest of the virtual subnet, loopback,
//     0.0.0.0, multicast, broadcast and non-IPv4 addresses are refused;
//  2. link-local (169.254.0.0/16, cloud metadata): refused;
//  3. the host's own kernel says where it would send the packet (a route
//     lookup, no packet sent): the host itself (its loopback and every
//     address of its own, "local" routes) is reached only through an
//     address a name given with --add-host maps to, a name the egress
//     policy allows, and never on a port smolvm forwards to another VM;
//     an address routed to a TAP of smolvm (a tap-mode guest) is refused;
//     anything but a unicast route is refused;
//  4. the egress policy (open, off, allowlist).

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostRoute is where the host's kernel sends packets for an address.
type hostRoute struct {
	// Type is the route's type: unix.RTN_UNICAST for another machine,
	// unix.RTN_LOCAL for the host itself.
	Type int
	// Dev is the output device ("lo" for the host itself).
	Dev string
}

// routeHandle is this process's netlink socket for route lookups (shared,
// requests are serialized on it): a new socket per lookup costs more than
// the lookup.
var routeHandle = sync.OnceValues(func() (*netlink.Handle, error) { return netlink.NewHandle(unix.NETLINK_ROUTE) })

// routeOf asks the kernel (RTM_GETROUTE, like `ip route get`) where it
// would send packets for a. The device is named for unicast routes only.
func routeOf(a netip.Addr) (hostRoute, error) {
	h, err := routeHandle()
	if err != nil {
		return hostRoute{}, fmt.Errorf("route to %s: %w", a, err)
	}
	rs, err := h.RouteGet(a.AsSlice())
	if err != nil {
		return hostRoute{}, fmt.Errorf("route to %s: %w", a, err)
	}
	if len(rs) == 0 {
		return hostRoute{}, fmt.Errorf("route to %s: none", a)
	}
	r := hostRoute{Type: rs[0].Type}
	if r.Type == unix.RTN_UNICAST {
		l, err := h.LinkByIndex(rs[0].LinkIndex)
		if err != nil {
			return hostRoute{}, fmt.Errorf("route to %s: device %d: %w", a, rs[0].LinkIndex, err)
		}
		r.Dev = l.Attrs().Name
	}
	return r, nil
}

// destCheck holds what the destination check needs besides the policy.
type destCheck struct {
	subnet  netip.Prefix
	aliases map[netip.Addr]netip.Addr // guest-visible → host loopback
	policy  *policy
	// route is routeOf, replaced in unit tests.
	route func(netip.Addr) (hostRoute, error)
	// forwardedElsewhere tells whether a host port is forwarded to
	// another VM (nil: none known).
	forwardedElsewhere func(ctx context.Context, port int) (string, error)

	// routes remembers route lookups for routeTTL: a guest that sends
	// packet after packet to one address (a UDP flood to a denied one
	// checks every packet) costs one netlink request a second, not one
	// a packet. At most maxRoutes are kept.
	routesMu sync.Mutex
	routes   map[netip.Addr]cachedRoute
}

type cachedRoute struct {
	r   hostRoute
	err error
	at  time.Time
}

const (
	routeTTL  = time.Second
	maxRoutes = 1024
)

// lookup is d.route through the cache.
func (d *destCheck) lookup(a netip.Addr) (hostRoute, error) {
	now := time.Now()
	d.routesMu.Lock()
	c, ok := d.routes[a]
	d.routesMu.Unlock()
	if ok && now.Sub(c.at) < routeTTL {
		return c.r, c.err
	}
	r, err := d.route(a)
	d.routesMu.Lock()
	if d.routes == nil || len(d.routes) >= maxRoutes {
		d.routes = map[netip.Addr]cachedRoute{}
	}
	d.routes[a] = cachedRoute{r, err, now}
	d.routesMu.Unlock()
	return r, err
}

var broadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// check decides a guest's connection to dst:port (the address the guest
// sent to) and returns the host address to dial, or an error wrapping
// ErrDenied that says why.
func (d *destCheck) check(ctx context.Context, dst netip.Addr, port int) (netip.Addr, error) {
	dst = dst.Unmap()
	host, aliased := d.aliases[dst]
	if !aliased {
		if !dst.Is4() || d.subnet.Contains(dst) || dst.IsLoopback() || dst.IsUnspecified() || dst.IsMulticast() || dst == broadcast {
			return netip.Addr{}, fmt.Errorf("%s is not routed: %w", dst, ErrDenied)
		}
		host = dst
	}
	if linkLocal.Contains(host) {
		return netip.Addr{}, fmt.Errorf("%s is link-local (cloud metadata is never reachable): %w", host, ErrDenied)
	}
	r, err := d.lookup(host)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s: %w: %w", host, err, ErrDenied)
	}
	switch {
	case r.Type == unix.RTN_LOCAL:
		if !d.policy.mapped[host] {
			what := "one of the host's own addresses"
			if host.IsLoopback() {
				what = "the host's loopback"
			}
			return netip.Addr{}, fmt.Errorf("%s is %s: a guest reaches it only through a name mapped to it with --add-host NAME:%s (that egress allows): %w",
				host, what, host, ErrDenied)
		}
		if d.forwardedElsewhere != nil {
			owner, err := d.forwardedElsewhere(ctx, port)
			if err != nil {
				return netip.Addr{}, fmt.Errorf("%s port %d: look up port forwards: %w: %w", host, port, err, ErrDenied)
			}
			if owner != "" {
				return netip.Addr{}, fmt.Errorf("port %d of the host is forwarded to VM %s: guests never reach each other: %w", port, owner, ErrDenied)
			}
		}
		return host, nil
	case r.Type != unix.RTN_UNICAST:
		return netip.Addr{}, fmt.Errorf("%s is not a unicast address of another machine (route type %d): %w", host, r.Type, ErrDenied)
	case strings.HasPrefix(r.Dev, TAPPrefix):
		return netip.Addr{}, fmt.Errorf("%s is routed to %s, another VM's TAP network: guests never reach each other: %w", host, r.Dev, ErrDenied)
	}
	if err := d.policy.allow(ctx, host); err != nil {
		return netip.Addr{}, err
	}
	return host, nil
}

// answerable tells whether a DNS answer may hand ip (from the host's
// resolver, not an --add-host entry) to the guest: never the host itself
// nor what the guest could not reach anyway.
func (d *destCheck) answerable(ip netip.Addr) bool {
	ip = ip.Unmap()
	if !ip.Is4() || ip.IsLoopback() || ip.IsUnspecified() || ip.IsMulticast() || ip == broadcast || linkLocal.Contains(ip) || d.subnet.Contains(ip) {
		return false
	}
	r, err := d.lookup(ip)
	return err == nil && r.Type == unix.RTN_UNICAST && !strings.HasPrefix(r.Dev, TAPPrefix)
}
