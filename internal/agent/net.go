package agent

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/smolvm/smolvm/internal/wire"
)

// netParams is the smolvm.net=ADDR/PREFIX,GATEWAY,DNS boot option: how
// the host's network expects eth0 to be set up. DNS may be empty (no
// nameserver). A gateway outside ADDR/PREFIX (tap mode gives a /32) is
// reached on-link.
type netParams struct {
	addr    *netlink.Addr
	gateway net.IP
	dns     string
}

func readNetParams() (*netParams, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return nil, err
	}
	for _, f := range strings.Fields(string(b)) {
		v, ok := strings.CutPrefix(f, wire.ParamNet+"=")
		if !ok {
			continue
		}
		parts := strings.Split(v, ",")
		if len(parts) != 3 {
			return nil, fmt.Errorf("smolvm.net=%s: want ADDR/PREFIX,GATEWAY,DNS", v)
		}
		addr, err := netlink.ParseAddr(parts[0])
		if err != nil {
			return nil, fmt.Errorf("smolvm.net address: %w", err)
		}
		gw := net.ParseIP(parts[1])
		if gw == nil {
			return nil, fmt.Errorf("smolvm.net gateway %q is not an IP address", parts[1])
		}
		return &netParams{addr: addr, gateway: gw, dns: parts[2]}, nil
	}
	return nil, nil
}

// configureNetwork sets up eth0 from the boot options: address, link up,
// default route and /etc/resolv.conf. Without smolvm.net it does nothing.
func configureNetwork(log *slog.Logger) {
	p, err := readNetParams()
	if err != nil {
		log.Error("network", "err", err)
		return
	}
	if p == nil {
		return
	}
	if err := setupEth0(p); err != nil {
		log.Error("configure eth0", "err", err)
		return
	}
	log.Debug("configured eth0", "addr", p.addr.String(), "gateway", p.gateway)
}

func setupEth0(p *netParams) error {
	var link netlink.Link
	var err error
	// The NIC appears when virtio_net has probed it.
	for deadline := time.Now().Add(2 * time.Second); ; {
		if link, err = netlink.LinkByName("eth0"); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("no eth0 (is virtio_net loaded?): %w", err)
	}
	if err := netlink.AddrReplace(link, p.addr); err != nil {
		return fmt.Errorf("set address %s: %w", p.addr, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring eth0 up: %w", err)
	}
	if !p.addr.Contains(p.gateway) {
		host := &net.IPNet{IP: p.gateway, Mask: net.CIDRMask(128, 128)}
		if v4 := p.gateway.To4(); v4 != nil {
			host = &net.IPNet{IP: v4, Mask: net.CIDRMask(32, 32)}
		}
		gw := &netlink.Route{LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK, Dst: host}
		if err := netlink.RouteReplace(gw); err != nil {
			return fmt.Errorf("add on-link route to the gateway %s: %w", p.gateway, err)
		}
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: p.gateway}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("add default route via %s: %w", p.gateway, err)
	}
	conf := ""
	if p.dns != "" {
		conf = "nameserver " + p.dns + "\n"
	}
	_ = os.MkdirAll("/etc", 0o755)
	if err := os.WriteFile("/etc/resolv.conf", []byte(conf), 0o644); err != nil {
		return fmt.Errorf("write /etc/resolv.conf: %w", err)
	}
	return nil
}
