package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/store"
)

// Forwarder is a VM network that forwards host ports to guest ports: the
// user-mode Stack (through its netstack) or a TAP (a userspace proxy to
// the guest's address).
type Forwarder interface {
	Expose(ctx context.Context, f Forward) (Forward, error)
	Unexpose(ctx context.Context, hostPort int) error
	Forwards() []Forward
	Config() Config
}

var (
	_ Forwarder = (*Stack)(nil)
	_ Forwarder = (*TAP)(nil)
)

// portForwards are a VM's host port forwards: listeners on the host whose
// connections are piped to a connection dial opens to the guest port.
type portForwards struct {
	log     *slog.Logger
	store   *store.Store // nil: no leases
	owner   string
	persist func(ctx context.Context, fwds []Forward) error
	dial    func(ctx context.Context, guestPort int) (net.Conn, error)
	ctx     context.Context

	mu     sync.Mutex
	m      map[int]*portForward // by host port
	closed bool
}

type portForward struct {
	Forward
	ln net.Listener
}

func newPortForwards(ctx context.Context, opts *Options, log *slog.Logger, dial func(context.Context, int) (net.Conn, error)) *portForwards {
	return &portForwards{log: log, store: opts.Store, owner: opts.Owner, persist: opts.Persist, dial: dial, ctx: ctx,
		m: map[int]*portForward{}}
}

// closeAll ends every forward (their leases stay with the owner).
func (p *portForwards) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, f := range p.m {
		_ = f.ln.Close()
	}
}

// Forwards lists the active forwards by host port.
func (p *portForwards) Forwards() []Forward {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Forward, 0, len(p.m))
	for _, f := range p.m {
		out = append(out, f.Forward)
	}
	sortForwards(out)
	return out
}

// Expose forwards a host port to a guest port at run time: it leases the
// host port, binds it and records the change. A host port of 0 picks a
// free one.
func (p *portForwards) Expose(ctx context.Context, f Forward) (Forward, error) {
	if f.HostIP == "" {
		f.HostIP = "127.0.0.1"
	}
	return p.expose(ctx, f, true)
}

func (p *portForwards) expose(ctx context.Context, f Forward, persist bool) (Forward, error) {
	if f.GuestPort < 1 || f.GuestPort > 65535 {
		return f, fmt.Errorf("%w: guest port %d is not a port number (1-65535)", errdefs.ErrInvalid, f.GuestPort)
	}
	p.mu.Lock()
	_, dup := p.m[f.HostPort]
	p.mu.Unlock()
	if f.HostPort != 0 && dup {
		return f, fmt.Errorf("host port %d is already forwarded by this VM: close it first ('smolvm port close VM %d'): %w", f.HostPort, f.HostPort, errdefs.ErrExists)
	}
	leased := false
	if p.store != nil {
		fresh, err := LeasePort(ctx, p.store, p.owner, &f)
		if err != nil {
			return f, err
		}
		leased = fresh
	}
	ln, err := listenForward(f)
	if err != nil {
		if leased {
			_ = p.store.Release(context.WithoutCancel(ctx), PortPool, int64(f.HostPort))
		}
		return f, err
	}
	pf := &portForward{Forward: f, ln: ln}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		ln.Close()
		return f, errors.New("network is closed")
	}
	p.m[f.HostPort] = pf
	p.mu.Unlock()
	go p.serve(pf)
	p.log.Debug("port forward", "forward", f.String())
	if persist && p.persist != nil {
		if err := p.persist(ctx, p.Forwards()); err != nil {
			return f, fmt.Errorf("record port forward: %w", err)
		}
	}
	return f, nil
}

// Unexpose ends the forward of a host port and releases its lease.
func (p *portForwards) Unexpose(ctx context.Context, hostPort int) error {
	p.mu.Lock()
	pf, ok := p.m[hostPort]
	delete(p.m, hostPort)
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("host port %d is not forwarded (see 'smolvm port ls VM'): %w", hostPort, errdefs.ErrNotFound)
	}
	_ = pf.ln.Close()
	if p.store != nil {
		if err := p.store.Release(ctx, PortPool, int64(hostPort)); err != nil {
			return err
		}
	}
	if p.persist != nil {
		return p.persist(ctx, p.Forwards())
	}
	return nil
}

func (p *portForwards) serve(pf *portForward) {
	for {
		c, err := pf.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			ctx, cancel := context.WithTimeout(p.ctx, 15*time.Second)
			g, err := p.dial(ctx, pf.GuestPort)
			cancel()
			if err != nil {
				p.log.Debug("port forward: guest did not accept", "forward", pf.String(), "err", err)
				c.Close()
				return
			}
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetNoDelay(true)
			}
			pipe(c, g)
		}()
	}
}

func listenForward(f Forward) (net.Listener, error) {
	addr := net.JoinHostPort(f.HostIP, strconv.Itoa(f.HostPort))
	ln, err := net.Listen("tcp4", addr)
	if err == nil {
		return ln, nil
	}
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("host port %d on %s is already %w by another program: pick another host port (e.g. -p %s:%d:%d) or stop what listens there",
			f.HostPort, f.HostIP, errdefs.ErrInUse, f.HostIP, f.HostPort+1, f.GuestPort)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return nil, fmt.Errorf("%w: forward host port %d: %s is not an address of this host", errdefs.ErrInvalid, f.HostPort, f.HostIP)
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("forward host port %d: ports below 1024 need root; pick a higher host port", f.HostPort)
	}
	return nil, fmt.Errorf("forward host port %s: %w", addr, err)
}
