package network

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	"github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// countingDispatcher takes the frames the link delivers.
type countingDispatcher struct{ frames, bytes int }

func (d *countingDispatcher) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	d.frames++
	d.bytes += pkt.Size()
}
func (d *countingDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// linkSeeds are framed Ethernet frames as QEMU sends them: an ARP request
// of the guest's, a frame for another MAC, and lengths out of bounds.
func linkSeeds(f *testing.F) {
	frame := arpRequest(GatewayIP)
	framed := binary.BigEndian.AppendUint32(nil, uint32(len(frame)))
	framed = append(framed, frame...)
	f.Add(framed)
	other := append([]byte(nil), framed...)
	copy(other[4:], guestMAC) // to the guest itself
	f.Add(append(framed, other...))
	for _, n := range []uint32{0, header.EthernetMinimumSize - 1, maxFrame + 1, 0xffffffff} {
		f.Add(binary.BigEndian.AppendUint32(nil, n))
	}
}

// FuzzLink reads framed Ethernet frames from the guest's network device:
// every delivered frame is within bounds, and a bad length ends the
// connection instead of an allocation.
func FuzzLink(f *testing.F) {
	linkSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := newLink(GatewayMAC, []tcpip.Address{tcpip.AddrFrom4(netip.MustParseAddr(GatewayIP).As4())})
		if err != nil {
			t.Fatal(err)
		}
		d := &countingDispatcher{}
		l.Attach(d)
		qemu, host := net.Pipe()
		go func() {
			_, _ = qemu.Write(data)
			qemu.Close()
		}()
		if err := l.serve(host); err == nil {
			t.Fatal("serve ended without an error")
		}
		if d.bytes > len(data) || d.frames > len(data)/(4+header.EthernetMinimumSize) {
			t.Fatalf("%d frames of %d bytes delivered from %d bytes", d.frames, d.bytes, len(data))
		}
	})
}

// FuzzStackFrames delivers arbitrary frames from the guest to the
// user-mode stack (gVisor's parsers behind our link): nothing panics. The
// stack's egress is off and its resolver and route lookups are fakes, so
// no fuzzed frame makes it dial or resolve anything on the host.
func FuzzStackFrames(f *testing.F) {
	linkSeeds(f)
	c := Config{Mode: ModeUser, Egress: Egress{Mode: EgressOff}}
	if err := c.Normalize(); err != nil {
		f.Fatal(err)
	}
	st, err := Start(context.Background(), Options{Config: c, Dir: f.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(st.Close)
	st.policy.resolver = &fakeResolver{}
	st.dest.route = fakeRoutes
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4 {
			data = data[4:] // the length prefix of the seeds
		}
		if len(data) >= header.EthernetMinimumSize && len(data) <= maxFrame {
			st.link.deliver(append([]byte(nil), data...))
		}
	})
}

// dnsWriter is a dns.ResponseWriter that keeps the reply.
type dnsWriter struct {
	remote net.Addr
	reply  *dns.Msg
}

func (w *dnsWriter) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(192, 168, 127, 1), Port: 53}
}
func (w *dnsWriter) RemoteAddr() net.Addr        { return w.remote }
func (w *dnsWriter) WriteMsg(m *dns.Msg) error   { w.reply = m; return nil }
func (w *dnsWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *dnsWriter) Close() error                { return nil }
func (w *dnsWriter) TsigStatus() error           { return nil }
func (w *dnsWriter) TsigTimersOnly(bool)         {}
func (w *dnsWriter) Hijack()                     {}

// FuzzDNS answers arbitrary queries as the guest's DNS server does (the
// bytes unpacked by miekg/dns, as its server does before our handler):
// the answer packs, and over UDP fits in what the query allows.
func FuzzDNS(f *testing.F) {
	for _, q := range []struct {
		name string
		typ  uint16
		edns uint16
	}{{"allowed.test.", dns.TypeA, 0}, {"api.allowed.test.", dns.TypeAAAA, 4096}, {"denied.test.", dns.TypeA, 100}, {"allowed.test.", dns.TypeMX, 0}} {
		m := new(dns.Msg)
		m.SetQuestion(q.name, q.typ)
		if q.edns != 0 {
			m.SetEdns0(q.edns, false)
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	r := &fakeResolver{names: map[string][]string{"allowed.test": {"127.0.0.5", "10.9.9.9", "169.254.169.254", "::1"}}}
	c := Config{Mode: ModeUser, Egress: Egress{Mode: EgressAllowlist, AllowDomains: []string{"allowed.test"}},
		Hosts: map[string][]string{"static.allowed.test": {"127.0.0.1"}}}
	if err := c.Normalize(); err != nil {
		f.Fatal(err)
	}
	d := testDest(f, c)
	d.policy.resolver = r
	n := &Stack{cfg: c, log: slog.New(slog.NewTextHandler(io.Discard, nil)), policy: d.policy, dest: d, aliases: d.aliases, ctx: context.Background()}
	f.Fuzz(func(t *testing.T, data []byte, tcp bool) {
		q := new(dns.Msg)
		if q.Unpack(data) != nil {
			return
		}
		w := &dnsWriter{remote: &net.UDPAddr{IP: net.IPv4(192, 168, 127, 2), Port: 5353}}
		if tcp {
			w.remote = &net.TCPAddr{IP: net.IPv4(192, 168, 127, 2), Port: 5353}
		}
		n.serveDNS(w, q)
		if w.reply == nil {
			t.Fatal("no answer")
		}
		b, err := w.reply.Pack()
		if err != nil {
			t.Fatalf("answer does not pack: %v", err)
		}
		limit := dns.MinMsgSize
		if e := q.IsEdns0(); e != nil {
			limit = max(limit, int(e.UDPSize()))
		}
		if !tcp && len(b) > limit {
			t.Fatalf("UDP answer of %d bytes, over the query's %d", len(b), limit)
		}
	})
}
