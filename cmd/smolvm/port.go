package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/smolvm/smolvm"
)

// netFlags are the network flags of run and create.
type netFlags struct {
	mode         string
	publish      []string
	egress       string
	allowDomains []string
	allowCIDRs   []string
	addHosts     []string
	tapCIDR      string
}

func (f *netFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.mode, "net", "user", "network: user (userspace NAT, no root), tap (a TAP device with NAT in nftables, root) or none (no NIC)")
	fs.StringVar(&f.tapCIDR, "tap-cidr", "", "address pool of --net tap: the host takes the first address, guests lease the others (default "+smolvm.DefaultTAPSubnet+")")
	fs.StringArrayVarP(&f.publish, "publish", "p", nil, "forward a host port to a guest port: [IP:]HOST:GUEST (IP defaults to 127.0.0.1; GUEST alone picks a free host port); repeatable")
	fs.StringVar(&f.egress, "egress", "", "what the guest may reach: open (default; never link-local/cloud metadata, the host itself or other VMs), off, or allowlist (with --allow-domain/--allow-cidr)")
	fs.StringArrayVar(&f.allowDomains, "allow-domain", nil, "allow this domain and its subdomains (implies --egress allowlist); repeatable")
	fs.StringArrayVar(&f.allowCIDRs, "allow-cidr", nil, "allow connections to this IPv4 network, e.g. 10.1.0.0/16 (implies --egress allowlist); repeatable")
	fs.StringArrayVar(&f.addHosts, "add-host", nil, "answer NAME with IP in the VM's DNS: NAME:IP; the only way to the host itself (NAME:127.0.0.1 for its loopback); user mode; repeatable")
}

func (f *netFlags) config() (smolvm.Config, error) {
	c := smolvm.Config{Network: f.mode, Ports: f.publish, TAPSubnet: f.tapCIDR,
		Egress: smolvm.Egress{Mode: f.egress, AllowDomains: f.allowDomains, AllowCIDRs: f.allowCIDRs}}
	for _, h := range f.addHosts {
		name, ip, ok := strings.Cut(h, ":")
		if !ok || name == "" || ip == "" {
			return c, fmt.Errorf("%w: --add-host %q: use NAME:IP", smolvm.ErrInvalid, h)
		}
		if c.Hosts == nil {
			c.Hosts = map[string][]string{}
		}
		c.Hosts[name] = append(c.Hosts[name], ip)
	}
	for _, p := range f.publish {
		if _, err := smolvm.ParsePortForward(p); err != nil {
			return c, err
		}
	}
	return c, nil
}

func newPortCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "port",
		Short: "Forward host ports to a running VM (user-mode or tap network)",
	}
	var asJSON bool
	ls := &cobra.Command{
		Use:   "ls VM",
		Short: "List a VM's port forwards",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			fwds, err := vm.Ports(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if fwds == nil {
					fwds = []smolvm.PortForward{}
				}
				return printJSON(fwds)
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "HOST\tGUEST")
			for _, f := range fwds {
				fmt.Fprintf(w, "%s:%d\t%d/tcp\n", f.HostIP, f.HostPort, f.GuestPort)
			}
			return w.Flush()
		},
	}
	ls.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	expose := &cobra.Command{
		Use:   "expose VM [IP:][HOST:]GUEST",
		Short: "Forward a host port to a guest port (GUEST alone picks a free host port)",
		Example: `  smolvm port expose web 8080:80          # 127.0.0.1:8080 -> guest port 80
  smolvm port expose web 0.0.0.0:8080:80  # on every host address
  smolvm port expose web 80               # a free host port, printed`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			f, err := vm.ExposePort(cmd.Context(), args[1])
			if err != nil {
				return err
			}
			fmt.Printf("%s:%d -> %d/tcp\n", f.HostIP, f.HostPort, f.GuestPort)
			return nil
		},
	}
	closeCmd := &cobra.Command{
		Use:   "close VM HOST_PORT",
		Short: "End the forward of a host port",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			port, err := strconv.Atoi(args[1])
			if err != nil || port < 1 || port > 65535 {
				return fmt.Errorf("%w: %q is not a host port number", smolvm.ErrInvalid, args[1])
			}
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			return vm.ClosePort(cmd.Context(), port)
		},
	}
	cmd.AddCommand(ls, expose, closeCmd)
	return cmd
}

// networkRows adds a VM's network to `smolvm info`.
func networkRows(row func(string, any), n *smolvm.NetworkInfo) {
	if n == nil {
		return
	}
	if n.Mode == smolvm.NetworkNone {
		row("Network", "none")
		return
	}
	if n.Mode == smolvm.NetworkTAP {
		dns := n.DNS
		if dns == "" {
			dns = "none"
		}
		row("Network", fmt.Sprintf("tap: %s/%d on %s, gateway %s (the host), DNS %s, pool %s, NAT to the host's network",
			n.GuestIP, n.PrefixLen, n.TAP, n.Gateway, dns, n.Subnet))
	} else {
		row("Network", fmt.Sprintf("%s: %s/%d, gateway and DNS %s, host loopback at %s (for --add-host NAME:127.0.0.1 names)", n.Mode, n.GuestIP, n.PrefixLen, n.Gateway, n.HostIP))
	}
	var fw []string
	for _, f := range n.Forwards {
		fw = append(fw, fmt.Sprintf("%s:%d->%d/tcp", f.HostIP, f.HostPort, f.GuestPort))
	}
	if len(fw) == 0 {
		fw = []string{"none"}
	}
	row("Ports", strings.Join(fw, ", "))
	row("Egress", n.Summary)
}
