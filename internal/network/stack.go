package network

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/smolvm/smolvm/internal/store"
)

const nicID = 1

// Options tune Start.
type Options struct {
	Config Config
	// Dir is the VM's state folder; the stack listens on Dir/net.sock.
	Dir    string
	Logger *slog.Logger
	// Resolver looks names up for DNS answers and the egress policy; nil
	// is the host's resolver. Config.Hosts are consulted first.
	Resolver Resolver
	// Store and Owner lease forwarded host ports (pool "host-port"); a
	// nil Store leases nothing.
	Store *store.Store
	Owner string
	// Persist is called with the forwards after each change at run time.
	Persist func(ctx context.Context, fwds []Forward) error
	// QEMUConn, when set, is the network device's connection, accepted
	// already (a prelaunched machine's): the stack serves it instead of
	// listening on Dir/net.sock.
	QEMUConn net.Conn
}

// Stack is one VM's user-mode network.
type Stack struct {
	opts    Options
	cfg     Config
	log     *slog.Logger
	stack   *stack.Stack
	link    *link
	policy  *policy
	dest    *destCheck
	denials *denyLog
	ln      net.Listener
	dns     []*dns.Server
	guest   tcpip.Address
	subnet  netip.Prefix
	aliases map[netip.Addr]netip.Addr // guest-visible → host
	ctx     context.Context
	cancel  context.CancelFunc
	*portForwards

	mu     sync.Mutex
	closed bool
}

// SocketPath is where the stack of a VM in dir listens for QEMU.
func SocketPath(dir string) string { return filepath.Join(dir, SocketName) }

// Start builds the stack, listens for QEMU on the socket and binds the
// configured forwards. On error nothing is left running (leases taken for
// forwards stay with the owner, released when the VM is deleted).
func Start(ctx context.Context, opts Options) (*Stack, error) {
	cfg := opts.Config
	if err := cfg.Normalize(); err != nil {
		return nil, err
	}
	if cfg.Mode != ModeUser {
		return nil, fmt.Errorf("network mode %s has no user-mode stack", cfg.Mode)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	n := &Stack{opts: opts, cfg: cfg, log: log.With("component", "network"), policy: newPolicy(&cfg, opts.Resolver),
		aliases: map[netip.Addr]netip.Addr{}}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.portForwards = newPortForwards(n.ctx, &opts, n.log, n.dialGuest)
	n.subnet = netip.MustParsePrefix(Subnet)
	n.guest = tcpip.AddrFrom4(netip.MustParseAddr(cfg.GuestIP).As4())
	own := []tcpip.Address{tcpip.AddrFrom4(netip.MustParseAddr(cfg.Gateway).As4())}
	for g, h := range cfg.Aliases {
		ga, err1 := netip.ParseAddr(g)
		ha, err2 := netip.ParseAddr(h)
		if err1 != nil || err2 != nil || !ha.IsLoopback() {
			return nil, fmt.Errorf("network alias %s → %s: want a subnet address and a loopback address", g, h)
		}
		n.aliases[ga] = ha
		own = append(own, tcpip.AddrFrom4(ga.As4()))
	}
	n.denials = newDenyLog(n.log)
	n.dest = &destCheck{subnet: n.subnet, aliases: n.aliases, policy: n.policy, route: routeOf}
	if opts.Store != nil {
		n.dest.forwardedElsewhere = n.forwardedElsewhere
	}
	var err error
	if n.link, err = newLink(GatewayMAC, own); err != nil {
		return nil, err
	}
	if err := n.buildStack(n.link); err != nil {
		return nil, err
	}
	if err := n.startDNS(); err != nil {
		n.Close()
		return nil, err
	}
	if opts.QEMUConn != nil {
		go n.serveQEMU(opts.QEMUConn)
	} else {
		path := SocketPath(opts.Dir)
		_ = os.Remove(path)
		n.ln, err = net.Listen("unix", path)
		if err != nil {
			n.Close()
			return nil, fmt.Errorf("listen for the network device: %w", err)
		}
		_ = os.Chmod(path, 0o600)
		go n.acceptQEMU()
	}
	for _, f := range cfg.Forwards {
		if _, err := n.expose(ctx, f, false); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

func (n *Stack) buildStack(ep stack.LinkEndpoint) error {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
	})
	if err := s.CreateNIC(nicID, ep); err != nil {
		return errors.New(err.String())
	}
	gw := tcpip.AddrFrom4(netip.MustParseAddr(n.cfg.Gateway).As4())
	if err := s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
		AddressWithPrefix: gw.WithPrefix()}, stack.AddressProperties{}); err != nil {
		return errors.New(err.String())
	}
	s.SetSpoofing(nicID, true)
	s.SetPromiscuousMode(nicID, true)
	sub := netip.MustParsePrefix(Subnet)
	subnet, err := tcpip.NewSubnet(tcpip.AddrFrom4(sub.Addr().As4()), tcpip.MaskFromBytes(net.CIDRMask(sub.Bits(), 32)))
	if err != nil {
		return err
	}
	s.SetRouteTable([]tcpip.Route{{Destination: subnet, NIC: nicID}})
	// Larger buffers than the defaults: the guest's downloads are bound by them.
	_ = s.SetTransportProtocolOption(tcp.ProtocolNumber, &tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20})
	_ = s.SetTransportProtocolOption(tcp.ProtocolNumber, &tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20})
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcp.NewForwarder(s, 0, 64, n.handleTCP).HandlePacket)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udp.NewForwarder(s, n.handleUDP).HandlePacket)
	n.stack = s
	return nil
}

func (n *Stack) acceptQEMU() {
	for {
		c, err := n.ln.Accept()
		if err != nil {
			return
		}
		go n.serveQEMU(c)
	}
}

// serveQEMU moves frames between QEMU's network device and the stack.
func (n *Stack) serveQEMU(c net.Conn) {
	if err := n.link.serve(c); err != nil && n.ctx.Err() == nil {
		n.log.Debug("network device disconnected", "err", err)
	}
}

// Close stops the stack, its forwards and its socket.
func (n *Stack) Close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	n.mu.Unlock()
	n.closeAll()
	n.cancel()
	if n.opts.QEMUConn != nil {
		_ = n.opts.QEMUConn.Close()
	}
	if n.ln != nil {
		_ = n.ln.Close()
		_ = os.Remove(SocketPath(n.opts.Dir))
	}
	for _, d := range n.dns {
		_ = d.Shutdown()
	}
	if n.stack != nil {
		n.stack.Close()
	}
}

// Config is the network as running now (forwards included).
func (n *Stack) Config() Config {
	c := n.cfg
	c.Forwards = n.Forwards()
	return c
}

// forwardedElsewhere names the VM (of this state folder) that a host port
// is forwarded to, if it is another one than this.
func (n *Stack) forwardedElsewhere(ctx context.Context, port int) (string, error) {
	leases, err := n.opts.Store.Leases(ctx, PortPool)
	if err != nil {
		return "", err
	}
	for _, l := range leases {
		if l.Value == int64(port) && l.Owner != n.opts.Owner {
			return l.Owner, nil
		}
	}
	return "", nil
}

// toGuest maps a host address from a DNS answer to what the guest should
// use: loopback addresses become their alias; ok is false when the guest
// cannot reach it.
func (n *Stack) toGuest(ip netip.Addr) (netip.Addr, bool) {
	if !ip.IsLoopback() {
		return ip, true
	}
	for g, h := range n.aliases {
		if h == ip {
			return g, true
		}
	}
	return netip.Addr{}, false
}

func fromTCPIP(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

func (n *Stack) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := fromTCPIP(id.LocalAddress)
	host, err := n.dest.check(n.ctx, dst, int(id.LocalPort))
	if err != nil {
		n.denials.denied("tcp", dst, id.LocalPort, err)
		r.Complete(true)
		return
	}
	d := net.Dialer{Timeout: 15 * time.Second}
	out, err := d.DialContext(n.ctx, "tcp", net.JoinHostPort(host.String(), strconv.Itoa(int(id.LocalPort))))
	if err != nil {
		n.log.Debug("egress dial failed", "dst", host, "port", id.LocalPort, "err", err)
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	r.Complete(false)
	if terr != nil {
		out.Close()
		return
	}
	ep.SocketOptions().SetDelayOption(false)
	pipe(gonet.NewTCPConn(&wq, ep), out)
}

func (n *Stack) handleUDP(r *udp.ForwarderRequest) {
	id := r.ID()
	dst := fromTCPIP(id.LocalAddress)
	if id.LocalAddress == header.IPv4Broadcast {
		return
	}
	host, err := n.dest.check(n.ctx, dst, int(id.LocalPort))
	if err != nil {
		n.denials.denied("udp", dst, id.LocalPort, err)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		return
	}
	in := gonet.NewUDPConn(&wq, ep)
	go func() {
		defer in.Close()
		out, err := net.Dial("udp", net.JoinHostPort(host.String(), strconv.Itoa(int(id.LocalPort))))
		if err != nil {
			return
		}
		defer out.Close()
		const idle = 90 * time.Second
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 65535)
			for {
				_ = out.SetReadDeadline(time.Now().Add(idle))
				k, err := out.Read(buf)
				if err != nil {
					return
				}
				if _, err := in.Write(buf[:k]); err != nil {
					return
				}
			}
		}()
		buf := make([]byte, 65535)
		for {
			_ = in.SetReadDeadline(time.Now().Add(idle))
			k, err := in.Read(buf)
			if err != nil {
				break
			}
			if _, err := out.Write(buf[:k]); err != nil {
				break
			}
		}
		out.Close()
		<-done
	}()
}

type closeWriter interface{ CloseWrite() error }

// pipe copies both ways until both sides are done, then closes both.
func pipe(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if cw, ok := dst.(closeWriter); ok {
			_ = cw.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

// dialGuest opens a TCP connection to a guest port through the stack.
func (n *Stack) dialGuest(ctx context.Context, port int) (net.Conn, error) {
	return gonet.DialContextTCP(ctx, n.stack, tcpip.FullAddress{NIC: nicID, Addr: n.guest, Port: uint16(port)}, ipv4.ProtocolNumber)
}

// LeasePort leases f's host port to owner in the pool "host-port" and
// reports whether a new lease was taken. A port already leased to owner is
// kept; one leased to another VM is an error naming it. A host port of 0
// leases a free one in [EphemeralLo, EphemeralHi] that can be bound.
func LeasePort(ctx context.Context, st *store.Store, owner string, f *Forward) (bool, error) {
	if f.HostPort == 0 {
		var skipped []int64
		defer func() {
			for _, v := range skipped {
				_ = st.Release(context.WithoutCancel(ctx), PortPool, v)
			}
		}()
		for range 100 {
			v, err := st.Allocate(ctx, PortPool, owner, EphemeralLo, EphemeralHi)
			if err != nil {
				return false, fmt.Errorf("lease a host port: %w", err)
			}
			try := *f
			try.HostPort = int(v)
			if ln, err := listenForward(try); err == nil {
				ln.Close()
				f.HostPort = int(v)
				return true, nil
			}
			skipped = append(skipped, v)
		}
		return false, fmt.Errorf("no free host port in %d-%d for %s", EphemeralLo, EphemeralHi, f)
	}
	err := st.AllocateValue(ctx, PortPool, owner, int64(f.HostPort))
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, store.ErrExists) {
		return false, err
	}
	leases, lerr := st.Leases(ctx, PortPool)
	if lerr != nil {
		return false, lerr
	}
	for _, l := range leases {
		if l.Value == int64(f.HostPort) {
			if l.Owner == owner {
				return false, nil
			}
			return false, fmt.Errorf("host port %d is already forwarded to VM %s: pick another host port or remove that forward ('smolvm port close %s %d'): %w",
				f.HostPort, l.Owner, l.Owner, f.HostPort, store.ErrExists)
		}
	}
	return false, err
}

// CheckBindable tells early whether a forward's host port can be bound.
func CheckBindable(f Forward) error {
	ln, err := listenForward(f)
	if err != nil {
		return err
	}
	return ln.Close()
}
