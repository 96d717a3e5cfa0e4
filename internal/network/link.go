package network

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// link is the stack's Ethernet port to QEMU's network device (`-netdev
// stream`): frames travel on a stream socket, each after its length as a
// 4-byte big-endian number. One VM is on the other end, so there is no
// switch: the stack's frames all go to QEMU, and QEMU's frames for the
// gateway (or everyone) go to the stack.
//
// gvisor-tap-vsock's tap package did this before, with a switch for many
// VMs; it imports gopacket, whose package initialization alone took 24 ms
// of every smolvm process's start here (half the CLI's own overhead).
type link struct {
	mac tcpip.LinkAddress
	// own are the addresses the gateway may answer ARP for. The stack is
	// promiscuous (it terminates the guest's connections to anywhere), so
	// it would claim every address asked about, the guest's own included.
	own map[tcpip.Address]bool

	mu      sync.Mutex // held while writing a frame
	conn    net.Conn
	onClose func()

	dmu        sync.Mutex
	dispatcher stack.NetworkDispatcher
}

// maxFrame bounds a frame from the guest: a virtio-net frame is at most
// 64 KiB plus its header. A longer length means a broken or hostile peer.
const maxFrame = 65535 + header.EthernetMinimumSize + 4

var _ stack.LinkEndpoint = (*link)(nil)

func newLink(mac string, own []tcpip.Address) (*link, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return nil, fmt.Errorf("gateway MAC: %w", err)
	}
	l := &link{mac: tcpip.LinkAddress(hw), own: map[tcpip.Address]bool{}}
	for _, a := range own {
		l.own[a] = true
	}
	return l, nil
}

// serve moves frames from c to the stack until c fails, then closes c;
// frames from the stack go to the last connection served.
func (l *link) serve(c net.Conn) error {
	l.mu.Lock()
	l.conn = c
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		if l.conn == c {
			l.conn = nil
		}
		l.mu.Unlock()
		_ = c.Close()
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	var size [4]byte
	for {
		if _, err := io.ReadFull(r, size[:]); err != nil {
			return err
		}
		n := binary.BigEndian.Uint32(size[:])
		if n < header.EthernetMinimumSize || n > maxFrame {
			return fmt.Errorf("network device sent a frame of %d bytes", n)
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(r, frame); err != nil {
			return err
		}
		l.deliver(frame)
	}
}

// deliver hands a frame for the gateway, or for everyone, to the stack.
func (l *link) deliver(frame []byte) {
	eth := header.Ethernet(frame)
	if dst := eth.DestinationAddress(); dst != l.mac && dst != header.EthernetBroadcastAddress {
		return
	}
	l.dmu.Lock()
	d := l.dispatcher
	l.dmu.Unlock()
	if d == nil {
		return
	}
	data := buffer.MakeWithData(frame)
	data.TrimFront(header.EthernetMinimumSize)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: data})
	d.DeliverNetworkPacket(eth.Type(), pkt)
	pkt.DecRef()
}

// WritePackets implements stack.LinkWriter.
func (l *link) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, p := range pkts.AsSlice() {
		if err := l.write(p); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

func (l *link) write(p *stack.PacketBuffer) tcpip.Error {
	src := l.mac
	if p.EgressRoute.LocalLinkAddress != "" {
		src = p.EgressRoute.LocalLinkAddress
	}
	eth := header.Ethernet(p.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{Type: p.NetworkProtocolNumber, SrcAddr: src, DstAddr: p.EgressRoute.RemoteLinkAddress})
	if arp := header.ARP(p.NetworkHeader().Slice()); p.NetworkProtocolNumber == header.ARPProtocolNumber && arp.IsValid() &&
		arp.Op() == header.ARPReply && !l.own[tcpip.AddrFromSlice(arp.ProtocolAddressSender())] {
		return nil // the promiscuous stack claiming an address not its own
	}
	var size [4]byte
	binary.BigEndian.PutUint32(size[:], uint32(p.Size()))
	bufs := net.Buffers{size[:]}
	bufs = append(bufs, p.AsSlices()...)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn == nil {
		return nil // no device connected: the frame is lost, as on a wire
	}
	if _, err := bufs.WriteTo(l.conn); err != nil {
		_ = l.conn.Close()
		l.conn = nil
		return &tcpip.ErrClosedForSend{}
	}
	return nil
}

// The rest implements stack.NetworkLinkEndpoint.

func (l *link) MTU() uint32                             { return MTU }
func (l *link) SetMTU(uint32)                           {}
func (l *link) MaxHeaderLength() uint16                 { return header.EthernetMinimumSize }
func (l *link) LinkAddress() tcpip.LinkAddress          { return l.mac }
func (l *link) SetLinkAddress(a tcpip.LinkAddress)      { l.mac = a }
func (l *link) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }
func (l *link) AddHeader(*stack.PacketBuffer)           {}
func (l *link) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (l *link) Wait()                                   {}
func (l *link) SetOnCloseAction(f func())               { l.onClose = f }
func (l *link) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired | stack.CapabilityRXChecksumOffload
}

func (l *link) Attach(d stack.NetworkDispatcher) {
	l.dmu.Lock()
	l.dispatcher = d
	l.dmu.Unlock()
}

func (l *link) IsAttached() bool {
	l.dmu.Lock()
	defer l.dmu.Unlock()
	return l.dispatcher != nil
}

func (l *link) Close() {
	l.mu.Lock()
	if l.conn != nil {
		_ = l.conn.Close()
		l.conn = nil
	}
	f := l.onClose
	l.mu.Unlock()
	if f != nil {
		f()
	}
}
