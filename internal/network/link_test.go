package network

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// guestEnd starts a user-mode stack whose network device is the other end
// of the returned connection, as QEMU's would be.
func guestEnd(t *testing.T, cfg Config) net.Conn {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	cfg.Mode = ModeUser
	st, err := Start(context.Background(), Options{Config: cfg, Dir: t.TempDir(), QEMUConn: conns[0]})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(); conns[1].Close() })
	return conns[1]
}

var guestMAC = tcpip.LinkAddress("\x5a\x94\xef\xe4\x0c\xee")

// sendARP writes a framed ARP request for target from the guest.
func sendARP(t *testing.T, c net.Conn, target string) {
	t.Helper()
	writeFrame(t, c, arpRequest(target))
}

// arpRequest is an Ethernet frame of the guest asking who has target.
func arpRequest(target string) []byte {
	frame := make([]byte, header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: header.EthernetBroadcastAddress, Type: header.ARPProtocolNumber})
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	arp.SetIPv4OverEthernet()
	arp.SetOp(header.ARPRequest)
	copy(arp.HardwareAddressSender(), guestMAC)
	g := netip.MustParseAddr(GuestIP).As4()
	copy(arp.ProtocolAddressSender(), g[:])
	tg := netip.MustParseAddr(target).As4()
	copy(arp.ProtocolAddressTarget(), tg[:])
	return frame
}

func writeFrame(t *testing.T, c net.Conn, frame []byte) {
	t.Helper()
	b := binary.BigEndian.AppendUint32(nil, uint32(len(frame)))
	if _, err := c.Write(append(b, frame...)); err != nil {
		t.Fatal(err)
	}
}

// readARPReply reads frames until an ARP reply, or fails after d.
func readARPReply(c net.Conn, d time.Duration) (header.ARP, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	for {
		var size [4]byte
		if _, err := io.ReadFull(c, size[:]); err != nil {
			return nil, err
		}
		frame := make([]byte, binary.BigEndian.Uint32(size[:]))
		if _, err := io.ReadFull(c, frame); err != nil {
			return nil, err
		}
		eth := header.Ethernet(frame)
		if eth.Type() != header.ARPProtocolNumber {
			continue
		}
		if arp := header.ARP(frame[header.EthernetMinimumSize:]); arp.IsValid() && arp.Op() == header.ARPReply {
			return arp, nil
		}
	}
}

func TestLinkAnswersARPOnlyForItsOwnAddresses(t *testing.T) {
	c := guestEnd(t, Config{Aliases: map[string]string{"192.168.127.254": "127.0.0.1"}})
	for _, ip := range []string{GatewayIP, "192.168.127.254"} {
		sendARP(t, c, ip)
		arp, err := readARPReply(c, 10*time.Second)
		if err != nil {
			t.Fatalf("ARP for %s: %v", ip, err)
		}
		if got := netip.AddrFrom4([4]byte(arp.ProtocolAddressSender())); got.String() != ip {
			t.Fatalf("ARP reply for %s names %s", ip, got)
		}
		if got := tcpip.LinkAddress(arp.HardwareAddressSender()); got.String() != GatewayMAC {
			t.Fatalf("ARP reply for %s gives MAC %s, want the gateway's %s", ip, got, GatewayMAC)
		}
	}
	// The stack is promiscuous; it must still not claim the guest's own
	// address (the guest would see a duplicate) or any other. Requests
	// are answered in order, so the next reply must be the gateway's.
	for _, ip := range []string{GuestIP, "192.168.127.77"} {
		sendARP(t, c, ip)
		sendARP(t, c, GatewayIP)
		arp, err := readARPReply(c, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got := netip.AddrFrom4([4]byte(arp.ProtocolAddressSender())); got.String() != GatewayIP {
			t.Fatalf("ARP for %s was answered (by %x)", ip, arp.HardwareAddressSender())
		}
	}
}

func TestLinkDropsAnOversizedFrame(t *testing.T) {
	c := guestEnd(t, Config{})
	writeFrame(t, c, make([]byte, maxFrame+1))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after a frame over the limit the stack's end should close; read gave %v", err)
	}
}
