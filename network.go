package smolvm

// Networking. A VM is networked in one of three modes (Config.Network):
//
//   - "user", the default: a userspace NAT stack (gvisor-tap-vsock and
//     gVisor's netstack) runs inside the VM's supervisor and is QEMU's
//     -netdev stream peer. No root is needed. The guest's eth0 is
//     192.168.127.2/24, its gateway and DNS server 192.168.127.1. The host
//     itself (its loopback, its own addresses) is reachable only through
//     names mapped with Config.Hosts that egress allows: a name mapped to
//     127.0.0.1 answers 192.168.127.254, which leads to the host's
//     127.0.0.1. Other VMs (their forwarded ports, tap guests) are never
//     reachable. Port forwards (Config.Ports, VM.ExposePort) listen on the host
//     (127.0.0.1 unless an IP is given) and are leased in the store (pool
//     "host-port") until the VM is deleted. The egress policy
//     (Config.Egress) is enforced by the stack: DNS answers only allowed
//     names, connections reach only allowed addresses, and link-local
//     addresses (cloud metadata, 169.254.169.254) are never reached.
//   - "none": no NIC at all.
//   - "tap" (root): the supervisor creates one non-persistent TAP device
//     per VM ("smv" + VM id) with netlink and passes QEMU an open queue
//     of it (-netdev tap,fd=N), so QEMU needs no privileges and keeps its
//     seccomp sandbox. The host side of every TAP is the pool's first
//     address (172.16.0.1 of the default pool 172.16.0.0/16, or of
//     Config.TAPSubnet) as a /32, with a /32 route to the guest. The
//     guest's address is leased from the rest of the pool (store pool
//     "tap-ip", atomic across processes) and given to the guest on the
//     kernel command line (smolvm.net=ADDR/32,GATEWAY,DNS); the guest's
//     DNS server is the host's first non-loopback nameserver, if any.
//     nftables (table "inet smolvm", one comment-tagged set of rules per
//     VM) masquerades the guest's traffic to the host's other interfaces,
//     rejects traffic between TAPs (guests cannot reach each other), keeps
//     the guest from the host itself but through an allowed CIDR covering
//     the host's address, and enforces the egress policy: off, a CIDR
//     allowlist, link-local always blocked, no IPv6; domain allowlists need the user-mode DNS server and are
//     refused. IPv4 forwarding is turned on in the network namespace.
//     Port forwards are a userspace proxy in the supervisor to the
//     guest's address. The TAP and the rules go when the VM stops or is
//     deleted, and `cleanup` removes them after a crash (from any network
//     namespace, when the VM's is a named one); the address is released
//     with the VM.

import (
	"context"
	"errors"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
)

// Network modes (Config.Network).
const (
	// NetworkUser is a userspace NAT stack in the VM's supervisor (the
	// default; no root needed).
	NetworkUser = "user"
	// NetworkNone is no NIC at all.
	NetworkNone = "none"
	// NetworkTAP is a TAP device on the host with nftables NAT (root).
	NetworkTAP = "tap"
)

// Egress modes (Egress.Mode).
const (
	// EgressOpen lets the guest reach everything but link-local addresses
	// (cloud metadata).
	EgressOpen = "open"
	// EgressOff lets nothing leave the VM; DNS refuses every query.
	EgressOff = "off"
	// EgressAllowlist lets the guest reach only Egress.AllowDomains and
	// Egress.AllowCIDRs.
	EgressAllowlist = "allowlist"
)

// Egress is what a VM's guest may reach: Mode "open" (default: all but
// link-local), "off" (nothing; DNS refuses) or "allowlist" (AllowDomains,
// each with its subdomains, and AllowCIDRs). Names are resolved by the
// host's resolver when the guest connects, not once at create. Giving
// domains or CIDRs without a mode means allowlist.
type Egress struct {
	Mode string `json:"mode,omitempty"`
	// AllowDomains are names the guest may resolve and connect to; a name
	// also allows its subdomains ("example.com" allows "api.example.com").
	AllowDomains []string `json:"allow_domains,omitempty"`
	// AllowCIDRs are destination networks the guest may connect to.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
}

// PortForward maps a host TCP port to a guest TCP port.
type PortForward struct {
	// HostIP is the host address the port listens on (127.0.0.1 unless
	// given).
	HostIP   string `json:"host_ip"`
	HostPort int    `json:"host_port"`
	// GuestPort is the guest's TCP port the connections go to.
	GuestPort int `json:"guest_port"`
}

// String shows the forward as HOSTIP:HOSTPORT->GUESTPORT/tcp.
func (f PortForward) String() string { return f.internal().String() }

func (f PortForward) internal() network.Forward {
	return network.Forward{HostIP: f.HostIP, HostPort: f.HostPort, GuestPort: f.GuestPort}
}

func portForwardOf(f network.Forward) PortForward {
	return PortForward{HostIP: f.HostIP, HostPort: f.HostPort, GuestPort: f.GuestPort}
}

// ParsePortForward reads docker's -p form: [IP:]HOST:GUEST, or GUEST alone
// for a free host port.
func ParsePortForward(s string) (PortForward, error) {
	f, err := engine.ParseForward(s)
	return portForwardOf(f), err
}

// DefaultTAPSubnet is the address pool of tap mode (Config.TAPSubnet).
const DefaultTAPSubnet = "172.16.0.0/16"

// NetworkInfo describes a VM's network.
type NetworkInfo struct {
	Mode    string `json:"mode"`
	GuestIP string `json:"guest_ip,omitempty"`
	// PrefixLen is the guest address's prefix length (24 in user mode, 32
	// in tap mode).
	PrefixLen int    `json:"prefix_len,omitempty"`
	Gateway   string `json:"gateway,omitempty"`
	DNS       string `json:"dns,omitempty"`
	// HostIP is where the guest reaches the host's loopback (user mode),
	// through names mapped to 127.0.0.1 (Config.Hosts).
	HostIP string `json:"host_loopback_ip,omitempty"`
	// TAP is the host-side device and Subnet the address pool (tap mode).
	TAP      string        `json:"tap,omitempty"`
	Subnet   string        `json:"subnet,omitempty"`
	Forwards []PortForward `json:"forwards,omitempty"`
	Egress   Egress        `json:"egress"`
	// Summary is the egress policy in one line.
	Summary string `json:"egress_summary,omitempty"`
}

func networkInfo(nc *network.Config) *NetworkInfo {
	if nc == nil || nc.Mode == network.ModeNone || nc.Mode == "" {
		return &NetworkInfo{Mode: NetworkNone}
	}
	_, summary := nc.Summary()
	in := &NetworkInfo{Mode: string(nc.Mode), GuestIP: nc.GuestIP, PrefixLen: network.PrefixLen, Gateway: nc.Gateway, DNS: nc.GuestDNS(),
		HostIP: network.HostAliasIP, Egress: Egress(nc.Egress), Summary: summary}
	for _, f := range nc.Forwards {
		in.Forwards = append(in.Forwards, portForwardOf(f))
	}
	if nc.Mode == network.ModeTAP {
		in.PrefixLen, in.HostIP, in.TAP, in.Subnet = 32, "", nc.TAP, nc.Subnet
	}
	return in
}

// Network describes the VM's network as recorded in its state: mode,
// addresses, port forwards and egress policy.
func (vm *VM) Network(ctx context.Context) (*NetworkInfo, error) {
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	nc, err := engine.NetworkOf(rec)
	if err != nil {
		return nil, err
	}
	return networkInfo(nc), nil
}

func (vm *VM) networkClient(ctx context.Context) (controlpb.NetworkClient, error) {
	vm.mu.Lock()
	conn := vm.conn
	vm.mu.Unlock()
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	if conn == nil || rec.State != store.StateRunning && rec.State != store.StatePaused {
		return nil, notRunning(rec)
	}
	return controlpb.NewNetworkClient(conn), nil
}

// Ports lists the VM's port forwards: the running supervisor's, or the
// recorded ones of a stopped VM.
func (vm *VM) Ports(ctx context.Context) ([]PortForward, error) {
	c, err := vm.networkClient(ctx)
	if err != nil {
		if errors.Is(err, ErrNotRunning) {
			in, ierr := vm.Network(ctx)
			if ierr != nil {
				return nil, ierr
			}
			return in.Forwards, nil
		}
		return nil, err
	}
	resp, err := c.ListPorts(ctx, &controlpb.ListPortsRequest{})
	if err != nil {
		return nil, vm.apiErr(ctx, "list ports", err)
	}
	out := []PortForward{}
	for _, f := range resp.Forwards {
		out = append(out, portForwardOf(network.FromPB(f)))
	}
	return out, nil
}

// ExposePort forwards a host port to a guest port of the running VM, in
// docker's -p form ([IP:]HOST:GUEST; GUEST alone picks a free host port).
// The forward lasts until ClosePort or the VM's deletion, restarts
// included.
func (vm *VM) ExposePort(ctx context.Context, spec string) (PortForward, error) {
	f, err := ParsePortForward(spec)
	if err != nil {
		return f, err
	}
	c, err := vm.networkClient(ctx)
	if err != nil {
		return f, err
	}
	resp, err := c.ExposePort(ctx, &controlpb.ExposePortRequest{Forward: &controlpb.PortForward{
		HostIp: f.HostIP, HostPort: int32(f.HostPort), GuestPort: int32(f.GuestPort)}})
	if err != nil {
		return f, vm.apiErr(ctx, "expose port", err)
	}
	return portForwardOf(network.FromPB(resp.Forward)), nil
}

// ClosePort ends the forward of a host port and releases it.
func (vm *VM) ClosePort(ctx context.Context, hostPort int) error {
	c, err := vm.networkClient(ctx)
	if err != nil {
		return err
	}
	if _, err := c.ClosePort(ctx, &controlpb.ClosePortRequest{HostPort: int32(hostPort)}); err != nil {
		return vm.apiErr(ctx, "close port", err)
	}
	return nil
}
