package network

import (
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// startDNS serves DNS on the gateway's port 53, UDP and TCP.
func (n *Stack) startDNS() error {
	addr := tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(netip.MustParseAddr(n.cfg.Gateway).As4()), Port: 53}
	uc, err := gonet.DialUDP(n.stack, &addr, nil, ipv4.ProtocolNumber)
	if err != nil {
		return err
	}
	tl, err := gonet.ListenTCP(n.stack, addr, ipv4.ProtocolNumber)
	if err != nil {
		uc.Close()
		return err
	}
	h := dns.HandlerFunc(n.serveDNS)
	// The UDP server reads with a deadline (2 s by default) and loops on
	// it: a wake-up of an idle supervisor every 2 s. An hour instead; its
	// Shutdown ends the read by setting a deadline in the past.
	n.dns = []*dns.Server{{PacketConn: uc, Handler: h, ReadTimeout: time.Hour}, {Listener: tl, Handler: h}}
	for _, s := range n.dns {
		go func() { _ = s.ActivateAndServe() }()
	}
	return nil
}

// serveDNS answers the guest's queries under the egress policy: a name
// the policy does not allow is NXDOMAIN (REFUSED when egress is off).
func (n *Stack) serveDNS(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.RecursionAvailable = true
	defer func() {
		size := dns.MinMsgSize
		if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
			size = dns.MaxMsgSize
		}
		if e := r.IsEdns0(); e != nil {
			size = int(e.UDPSize())
		}
		m.Truncate(size)
		_ = w.WriteMsg(m)
	}()
	if len(r.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return
	}
	q := r.Question[0]
	name := normName(q.Name)
	if n.policy.mode == EgressOff {
		n.log.Info("dns refused: egress is off", "name", name)
		m.Rcode = dns.RcodeRefused
		return
	}
	if !n.policy.nameAllowed(name) {
		n.log.Info("dns denied: not in the allowlist", "name", name)
		m.Rcode = dns.RcodeNameError
		return
	}
	if q.Qclass != dns.ClassINET || (q.Qtype != dns.TypeA && q.Qtype != dns.TypeAAAA) {
		return // NOERROR, no records: only addresses are served
	}
	ips, static, err := n.policy.lookup(n.ctx, name)
	if err != nil {
		var de *net.DNSError
		if errors.As(err, &de) && de.IsNotFound {
			m.Rcode = dns.RcodeNameError
		} else {
			m.Rcode = dns.RcodeServerFailure
		}
		return
	}
	if q.Qtype != dns.TypeA {
		return // IPv4 only: an empty AAAA answer
	}
	var given []netip.Addr
	for _, ip := range ips {
		g := ip
		if static {
			// An --add-host entry: the host's loopback becomes its alias.
			var ok bool
			if g, ok = n.toGuest(ip); !ok {
				continue
			}
		} else if !n.dest.answerable(ip) {
			// The host's resolver named the host itself (localhost, the
			// host's own name, a rebinding name) or an address the guest
			// cannot reach: never handed out.
			n.log.Info("dns answer withheld: not reachable from the guest", "name", name, "address", ip)
			continue
		}
		given = append(given, ip)
		m.Answer = append(m.Answer, &dns.A{
			Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 30},
			A:   net.IP(g.AsSlice()),
		})
	}
	n.policy.remember(given)
}
