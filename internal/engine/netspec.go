package engine

import (
	"context"
	"fmt"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// ParseForward reads docker's -p form ([IP:]HOST:GUEST, or GUEST alone
// for a free host port); a malformed one is ErrInvalid.
func ParseForward(s string) (network.Forward, error) {
	f, err := network.ParseForward(s)
	if err != nil {
		return f, fmt.Errorf("%w: %w", errdefs.ErrInvalid, err)
	}
	return f, nil
}

// buildNetwork turns the config's network into the spec's, leases the
// forwarded host ports (and in tap mode the guest's address) and adds the
// NIC to the machine. Leases go with the VM's row if creation fails.
func (h *Host) buildNetwork(ctx context.Context, cfg *VMConfig, rec *store.VM, mc *hypervisor.MachineConfig) (*network.Config, error) {
	nc := &network.Config{Mode: network.Mode(cfg.Network), Hosts: cfg.Hosts, Subnet: cfg.TAPSubnet, Egress: network.Egress{Mode: cfg.Egress.Mode,
		AllowDomains: append([]string(nil), cfg.Egress.AllowDomains...), AllowCIDRs: append([]string(nil), cfg.Egress.AllowCIDRs...)}}
	for _, p := range cfg.Ports {
		f, err := ParseForward(p)
		if err != nil {
			return nil, err
		}
		nc.Forwards = append(nc.Forwards, f)
	}
	if cfg.TAPSubnet != "" && nc.Mode != network.ModeTAP {
		return nil, fmt.Errorf("%w: a TAP address pool (--tap-cidr %s) needs network mode tap (--net tap)", errdefs.ErrInvalid, cfg.TAPSubnet)
	}
	if err := nc.Normalize(); err != nil {
		return nil, fmt.Errorf("%w: %w", errdefs.ErrInvalid, err)
	}
	switch nc.Mode {
	case network.ModeNone:
		return nc, nil
	case network.ModeTAP:
		if err := network.CheckTAP(); err != nil {
			return nil, err
		}
	}
	for i := range nc.Forwards {
		// The lease first (it names another VM holding the port), then a
		// bind test, so a taken port fails before the guest boots.
		f := &nc.Forwards[i]
		if _, err := network.LeasePort(ctx, h.Store, rec.ID, f); err != nil {
			return nil, err
		}
		if err := network.CheckBindable(*f); err != nil {
			return nil, err
		}
	}
	if nc.Mode == network.ModeTAP {
		subnet, err := network.ParseTAPSubnet(nc.Subnet)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errdefs.ErrInvalid, err)
		}
		ip, err := network.LeaseTAPAddress(ctx, h.Store, rec.ID, subnet)
		if err != nil {
			return nil, err
		}
		nc.GuestIP, nc.Gateway = ip.String(), network.TAPGateway(subnet).String()
		nc.TAP, nc.MAC, nc.DNS = network.TAPName(rec.ID), network.TAPMAC(ip), network.HostDNS()
		nc.NetNS = network.CurrentNetNS()
		mc.Net = []hypervisor.NetDevice{{MAC: nc.MAC, TAP: nc.TAP}}
	} else {
		mc.Net = []hypervisor.NetDevice{{MAC: network.GuestMAC, StreamSocket: network.SocketPath(mc.Dir)}}
	}
	mc.Cmdline += " " + nc.GuestCmdline()
	return nc, nil
}
