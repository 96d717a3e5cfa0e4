package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
	"github.com/smolvm/smolvm/internal/image"
)

type check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

func newDoctorCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check this host: QEMU, KVM or TCG, image, state folder",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			checks := runChecks(cmd.Context())
			ok := true
			for _, c := range checks {
				ok = ok && c.OK
			}
			if asJSON {
				if err := printJSON(map[string]any{"ok": ok, "checks": checks}); err != nil {
					return err
				}
			} else {
				for _, c := range checks {
					mark := "ok  "
					if !c.OK {
						mark = "FAIL"
					}
					fmt.Printf("[%s] %-14s %s\n", mark, c.Name, c.Detail)
					if c.Fix != "" {
						fmt.Printf("       %-14s fix: %s\n", "", c.Fix)
					}
				}
			}
			if !ok {
				return &exitError{1}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func runChecks(ctx context.Context) []check {
	var out []check
	home := smolvm.Home()
	if v, err := qemu.Version(ctx, ""); err != nil {
		out = append(out, check{Name: "qemu", Detail: err.Error(), Fix: "smolvm setup"})
	} else {
		out = append(out, check{Name: "qemu", OK: true, Detail: "qemu-system-x86_64 " + v})
	}
	for _, p := range image.CheckHost(ctx) {
		c := check{Name: p.Missing, Detail: p.Detail, Fix: "apt-get install " + p.Package}
		if p.Optional {
			// Needed only by disk images and the bench: VMs run without.
			c.OK, c.Detail = true, "optional, "+p.Detail
		}
		out = append(out, c)
	}
	agent, err := smolvm.AgentBinary()
	if err != nil {
		out = append(out, check{Name: "agent", Detail: err.Error(), Fix: "make build"})
	} else {
		out = append(out, check{Name: "agent", OK: true, Detail: agent})
	}
	d, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home, CachedOnly: true})
	if err != nil {
		out = append(out, check{Name: "image", Detail: "default image not ready: " + err.Error(), Fix: "smolvm setup"})
	} else {
		out = append(out, check{Name: "image", OK: true, Detail: fmt.Sprintf("kernel %s, initramfs %s", d.KernelVersion, filepath.Base(d.Initrd))})
		rep := smolvm.ProbeAccel(ctx, home, d.Kernel, d.Initrd)
		detail := rep.Accel + ": " + rep.Reason
		out = append(out, check{Name: "accel", OK: true, Detail: detail})
	}
	if _, err := os.Stat("/dev/vhost-vsock"); err == nil {
		out = append(out, check{Name: "channel", OK: true, Detail: "vsock (/dev/vhost-vsock present)"})
	} else {
		out = append(out, check{Name: "channel", OK: true, Detail: "virtio-serial (no /dev/vhost-vsock; modprobe vhost_vsock for vsock)"})
	}
	if err := os.MkdirAll(home, 0o700); err != nil {
		out = append(out, check{Name: "state folder", Detail: err.Error(), Fix: "set SMOLVM_HOME to a writable folder"})
	} else if f, err := os.CreateTemp(home, ".doctor-"); err != nil {
		out = append(out, check{Name: "state folder", Detail: home + " is not writable: " + err.Error(), Fix: "set SMOLVM_HOME to a writable folder"})
	} else {
		f.Close()
		os.Remove(f.Name())
		out = append(out, check{Name: "state folder", OK: true, Detail: home})
	}
	return out
}
