package network

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/smolvm/smolvm/internal/store"
)

// ErrNeedRoot is wrapped by the errors of TAP mode that come from lacking
// the privileges to create network devices and firewall rules. It wraps
// os.ErrPermission.
var ErrNeedRoot = fmt.Errorf("network mode tap needs root (it creates a TAP device, routes and nftables rules): run smolvm as root, or use --net user (no root needed): %w", os.ErrPermission)

// CheckTAP tells whether this process can run VMs in TAP mode.
func CheckTAP() error {
	if os.Geteuid() != 0 {
		return ErrNeedRoot
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return fmt.Errorf("network mode tap needs /dev/net/tun (%w): load the tun module ('modprobe tun'), or use --net user", err)
	}
	return nil
}

// ParseTAPSubnet reads a TAP address pool: an IPv4 network of /8 to /30.
// The host takes its first address, guests the others but the broadcast.
func ParseTAPSubnet(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("TAP address pool %q is not an IPv4 network (e.g. %s)", s, DefaultTAPSubnet)
	}
	if p.Bits() < 8 || p.Bits() > 30 {
		return netip.Prefix{}, fmt.Errorf("TAP address pool %s: give a network of /8 to /30 (e.g. %s)", s, DefaultTAPSubnet)
	}
	return p.Masked(), nil
}

func addrToInt(a netip.Addr) uint32 { b := a.As4(); return binary.BigEndian.Uint32(b[:]) }

func intToAddr(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// TAPGateway is the host's address in a pool: its first address.
func TAPGateway(p netip.Prefix) netip.Addr { return p.Masked().Addr().Next() }

// tapGuestRange is the range of guest addresses of a pool, as integers:
// from the second address to the one before the broadcast address.
func tapGuestRange(p netip.Prefix) (lo, hi uint32) {
	base := addrToInt(p.Masked().Addr())
	size := uint32(1) << (32 - p.Bits())
	return base + 2, base + size - 2
}

// LeaseTAPAddress leases a free guest address of the pool to owner (pool
// TAPPool of the store, atomic across processes). Leases are by address,
// so VMs of different pools never get the same one.
func LeaseTAPAddress(ctx context.Context, st *store.Store, owner string, subnet netip.Prefix) (netip.Addr, error) {
	lo, hi := tapGuestRange(subnet)
	v, err := st.Allocate(ctx, TAPPool, owner, int64(lo), int64(hi))
	if errors.Is(err, store.ErrExhausted) {
		return netip.Addr{}, fmt.Errorf("every guest address of the TAP pool %s is leased (%d VMs): delete VMs ('smolvm ls', 'smolvm cleanup') or use a larger pool (--tap-cidr): %w",
			subnet, hi-lo+1, err)
	}
	if err != nil {
		return netip.Addr{}, fmt.Errorf("lease a guest address from %s: %w", subnet, err)
	}
	return intToAddr(uint32(v)), nil
}

// TAPName is the host-side device name of a VM's TAP: "smv" and the VM id,
// within the kernel's 15 characters.
func TAPName(id string) string {
	n := TAPPrefix + id
	if len(n) > 15 {
		n = n[:15]
	}
	return n
}

// TAPMAC is the guest NIC's MAC address for a guest address: locally
// administered, unicast, unique per address.
func TAPMAC(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("5a:94:%02x:%02x:%02x:%02x", b[0], b[1], b[2], b[3])
}

// HostDNS is the nameserver a TAP guest uses: the first IPv4 nameserver of
// the host's /etc/resolv.conf that is not a loopback address (a guest
// cannot reach the host's loopback), else one of systemd-resolved's
// upstream servers; "" when there is none.
func HostDNS() string {
	for _, f := range []string{"/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"} {
		if ns := firstNameserver(f); ns != "" {
			return ns
		}
	}
	return ""
}

func firstNameserver(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 || fs[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fs[1])
		if err == nil && a.Is4() && !a.IsLoopback() && !a.IsUnspecified() {
			return a.String()
		}
	}
	return ""
}

// CurrentNetNS is the inode of this process's network namespace.
func CurrentNetNS() uint64 {
	return nsInode("/proc/self/ns/net")
}

func nsInode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// TAP is one VM's TAP network: the device (its queue's file is handed to
// QEMU), the host's address and route, the nftables rules, and the port
// forwards (a userspace proxy to the guest's address).
type TAP struct {
	cfg    Config
	log    *slog.Logger
	owner  string
	file   *os.File
	ctx    context.Context
	cancel context.CancelFunc
	*portForwards
}

// StartTAP creates the VM's TAP device and sets up the host side: IPv4
// forwarding, the host's address and a route to the guest on the device,
// the VM's nftables rules, and its port forwards. On error nothing is left
// (leases taken for forwards stay with the owner, released when the VM is
// deleted). The device lives as long as its file stays open in this
// process or in QEMU: it is not persistent.
func StartTAP(ctx context.Context, opts Options) (*TAP, error) {
	cfg := opts.Config
	if err := cfg.Normalize(); err != nil {
		return nil, err
	}
	if cfg.Mode != ModeTAP || cfg.TAP == "" || cfg.GuestIP == "" || cfg.Gateway == "" {
		return nil, fmt.Errorf("network mode %s: not a TAP network with a leased address", cfg.Mode)
	}
	if err := CheckTAP(); err != nil {
		return nil, err
	}
	if cur := CurrentNetNS(); cfg.NetNS != 0 && cfg.NetNS != cur {
		// The VM was created (or last ran) in another network namespace
		// that still exists: its TAP belongs there, not here.
		if p := findNetNS(cfg.NetNS); p != "" {
			return nil, fmt.Errorf("this VM's TAP network lives in the network namespace %s, not in this process's: start it from there ('ip netns exec %s smolvm start ...')",
				filepath.Base(p), filepath.Base(p))
		}
	}
	guest, err := netip.ParseAddr(cfg.GuestIP)
	if err != nil {
		return nil, fmt.Errorf("guest address: %w", err)
	}
	gw, err := netip.ParseAddr(cfg.Gateway)
	if err != nil {
		return nil, fmt.Errorf("host address: %w", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	t := &TAP{cfg: cfg, log: log.With("component", "network", "tap", cfg.TAP), owner: opts.Owner}
	t.cfg.NetNS = CurrentNetNS()
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.portForwards = newPortForwards(t.ctx, &opts, t.log, func(ctx context.Context, port int) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp4", net.JoinHostPort(cfg.GuestIP, strconv.Itoa(port)))
	})
	if err := t.setup(guest, gw); err != nil {
		t.Close()
		return nil, err
	}
	for _, f := range cfg.Forwards {
		if _, err := t.expose(ctx, f, false); err != nil {
			t.Close()
			return nil, err
		}
	}
	return t, nil
}

func (t *TAP) setup(guest, gw netip.Addr) error {
	if err := enableForwarding(); err != nil {
		return err
	}
	// A device of this name is a leftover of this VM (TAPs are named
	// after the VM): remove it, and any rules the VM left.
	if l, err := netlink.LinkByName(t.cfg.TAP); err == nil {
		_ = netlink.LinkDel(l)
	}
	tt := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: t.cfg.TAP},
		Mode:      netlink.TUNTAP_MODE_TAP,
		// No packet info header (QEMU wants none), virtio-net headers
		// (checksum and segmentation offloads between guest and host),
		// and fail rather than attach to an existing device.
		Flags:      netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_TUN_EXCL,
		NonPersist: true,
		Queues:     1,
	}
	if err := netlink.LinkAdd(tt); err != nil {
		return fmt.Errorf("create TAP device %s: %w", t.cfg.TAP, err)
	}
	if len(tt.Fds) != 1 {
		for _, f := range tt.Fds {
			f.Close()
		}
		return fmt.Errorf("create TAP device %s: got %d queues, want 1", t.cfg.TAP, len(tt.Fds))
	}
	t.file = tt.Fds[0]
	// IPv4 only: no IPv6 address, so the guest cannot reach the host or
	// anything else over IPv6 link-local addresses.
	_ = os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", t.cfg.TAP, "disable_ipv6"), []byte("1"), 0o644)
	link, err := netlink.LinkByName(t.cfg.TAP)
	if err != nil {
		return fmt.Errorf("find TAP device %s: %w", t.cfg.TAP, err)
	}
	if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(gw, 32))}); err != nil {
		return fmt.Errorf("add address %s/32 to %s: %w", gw, t.cfg.TAP, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring %s up: %w", t.cfg.TAP, err)
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: prefixNet(netip.PrefixFrom(guest, 32)),
		Scope: netlink.SCOPE_LINK, Src: gw.AsSlice()}
	if err := netlink.RouteAdd(route); err != nil {
		if errors.Is(err, syscall.EEXIST) {
			// Leases are per state folder: another one in this network
			// namespace hands out the same pool.
			return fmt.Errorf("the guest address %s is already routed to another device in this network namespace (a VM of another smolvm state folder?): give this state folder's VMs another pool with --tap-cidr: %w", guest, err)
		}
		return fmt.Errorf("add route to %s via %s: %w", guest, t.cfg.TAP, err)
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	dns, _ := netip.ParseAddr(t.cfg.DNS) // invalid for none
	if err := addVMRules(c, t.owner, t.cfg.TAP, guest, dns, t.cfg.Egress); err != nil {
		return err
	}
	t.log.Debug("TAP network up", "guest", guest, "host", gw)
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}

// enableForwarding turns IPv4 forwarding on in this network namespace
// (the guests' traffic is routed through the host). It is left on when
// the last VM goes: other software may rely on it by then.
func enableForwarding() error {
	const path = "/proc/sys/net/ipv4/ip_forward"
	if b, err := os.ReadFile(path); err == nil && strings.TrimSpace(string(b)) == "1" {
		return nil
	}
	if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding (%s): %w", path, err)
	}
	return nil
}

// File is the TAP queue to hand to QEMU (-netdev tap,fd=N).
func (t *TAP) File() *os.File { return t.file }

// ReleaseFile closes this process's copy of the TAP queue once QEMU has
// its own: from then on the device lives exactly as long as QEMU.
func (t *TAP) ReleaseFile() {
	if t.file != nil {
		_ = t.file.Close()
		t.file = nil
	}
}

// Config is the network as running now (forwards and namespace included).
func (t *TAP) Config() Config {
	c := t.cfg
	c.Forwards = t.Forwards()
	return c
}

// Close ends the forwards and removes the device and the VM's rules.
func (t *TAP) Close() {
	t.closeAll()
	t.cancel()
	t.ReleaseFile()
	if l, err := netlink.LinkByName(t.cfg.TAP); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			t.log.Warn("remove TAP device", "err", err)
		}
	}
	c, err := nftables.New()
	if err == nil {
		_, err = deleteVMRules(c, t.owner)
	}
	if err != nil {
		t.log.Warn("remove nftables rules", "err", err)
	}
}

// RemoveTAP removes what a TAP-mode VM may have left on the host (its
// device and nftables rules) after its supervisor died. It works from
// another network namespace when the VM's is a named one (ip netns). It
// reports what it removed.
func RemoveTAP(ctx context.Context, cfg *Config, owner string) (string, error) {
	if cfg == nil || cfg.Mode != ModeTAP {
		return "", nil
	}
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("remove the TAP network of VM %s: %w", owner, ErrNeedRoot)
	}
	fd := -1
	if cfg.NetNS != 0 && cfg.NetNS != CurrentNetNS() {
		path := findNetNS(cfg.NetNS)
		if path == "" {
			// The namespace is gone (and with it the device and rules),
			// or is not a named one we can enter.
			slog.Debug("TAP network of a VM in another network namespace: not found, nothing to remove", "vm", owner, "netns", cfg.NetNS)
			return "", nil
		}
		f, err := os.Open(path)
		if err != nil {
			return "", fmt.Errorf("open network namespace %s of VM %s: %w", path, owner, err)
		}
		defer f.Close()
		fd = int(f.Fd())
	}
	var done []string
	h, err := netlinkHandle(fd)
	if err != nil {
		return "", err
	}
	defer h.Close()
	if cfg.TAP != "" {
		if l, err := h.LinkByName(cfg.TAP); err == nil {
			if err := h.LinkDel(l); err != nil {
				// Gone meanwhile (its QEMU exited) is fine.
				if _, still := h.LinkByName(cfg.TAP); still == nil {
					return "", fmt.Errorf("remove TAP device %s of VM %s: %w", cfg.TAP, owner, err)
				}
			} else {
				done = append(done, "device "+cfg.TAP)
			}
		}
	}
	var opts []nftables.ConnOption
	if fd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(fd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return "", fmt.Errorf("nftables: %w", err)
	}
	n, err := deleteVMRules(c, owner)
	if err != nil {
		return "", err
	}
	if n > 0 {
		done = append(done, fmt.Sprintf("%d nftables rules", n))
	}
	return strings.Join(done, ", "), nil
}

func netlinkHandle(fd int) (*netlink.Handle, error) {
	var h *netlink.Handle
	var err error
	if fd >= 0 {
		h, err = netlink.NewHandleAt(netns.NsHandle(fd))
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return h, nil
}

// findNetNS finds the named network namespace (ip netns) with this inode.
func findNetNS(ino uint64) string {
	for _, dir := range []string{"/run/netns", "/var/run/netns"} {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			if nsInode(p) == ino {
				return p
			}
		}
	}
	return ""
}
