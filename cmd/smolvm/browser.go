package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/smolvm/smolvm"
)

func newBrowserCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "browser",
		Short: "Headless Chromium in a sandbox, driven over CDP from the host",
		Long: `A browser sandbox runs headless Chromium (the browser image: smolvm image build
browser) with its DevTools endpoint forwarded to a host port on 127.0.0.1, so
that any CDP client on the host drives it: Playwright's connectOverCDP,
Puppeteer's connect, chromedp. The browser's traffic is the sandbox's: it
reaches only what --egress allows, and the host only through --add-host.

  smolvm image build browser
  smolvm browser start --name web --add-host app:127.0.0.1   # prints ws://127.0.0.1:PORT/devtools/browser/…
  smolvm browser screenshot web http://app:8000/ -o page.png --width 1280 --height 800
  smolvm browser stop web --rm`,
	}
	cmd.AddCommand(newBrowserStartCmd(g), newBrowserScreenshotCmd(g), newBrowserStopCmd(g))
	return cmd
}

func newBrowserStartCmd(g *globals) *cobra.Command {
	var (
		vf     vmFlags
		port   int
		asJSON bool
		args   []string
	)
	cmd := &cobra.Command{
		Use:   "start [VM]",
		Short: "Start headless Chromium in a new sandbox (or a running VM of the browser image); print its ws:// URL",
		Long: `Start headless Chromium and print its DevTools WebSocket URL (with --json: the
VM's id and name, ws_url, http_url, host_port, version). Without VM, a new
persistent sandbox is created from the browser image (--image, default
"browser"; --memory default 1024) with the VM flags given; with VM, the
browser starts in that running VM, which must have chromium. The browser
keeps running after this command returns, until 'smolvm browser stop'.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, pos []string) error {
			ctx := cmd.Context()
			opts := smolvm.BrowserOptions{HostPort: port, Args: args}
			var (
				vm  *smolvm.VM
				b   *smolvm.Browser
				err error
			)
			if len(pos) == 1 {
				var changed []string
				cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
					if f.Changed && f.Name != "port" && f.Name != "json" && f.Name != "chromium-arg" {
						changed = append(changed, "--"+f.Name)
					}
				})
				if len(changed) > 0 {
					return fmt.Errorf("%w: %s apply to a new sandbox only: leave out VM, or leave out those flags", smolvm.ErrInvalid, strings.Join(changed, ", "))
				}
				vm, err = smolvm.Open(ctx, pos[0])
				if err != nil {
					return err
				}
				defer vm.Close()
				b, err = smolvm.StartBrowser(ctx, vm, opts)
			} else {
				cfg, cerr := vf.config(g)
				if cerr != nil {
					return cerr
				}
				if !cmd.Flags().Changed("memory") {
					cfg.MemoryMiB = 0 // the browser's default
				}
				cfg.Persistent = true
				vm, b, err = smolvm.NewBrowser(ctx, cfg, opts)
				if err == nil {
					defer vm.Close()
				}
			}
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(b)
			}
			fmt.Fprintf(os.Stderr, "browser %s in VM %s (%s), DevTools answered in %s; http: %s\n", b.Version, b.VMName, b.VMID, b.Ready.Round(time.Millisecond), b.HTTPURL)
			fmt.Println(b.WebSocketURL)
			return nil
		},
	}
	vf.register(cmd.Flags())
	cmd.Flags().IntVar(&port, "port", 0, "host port of the DevTools endpoint (default: a free port)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON: id, name, ws_url, http_url, host_port, version")
	cmd.Flags().StringArrayVar(&args, "chromium-arg", nil, "an extra Chromium flag, e.g. --lang=de; repeatable")
	return cmd
}

func newBrowserScreenshotCmd(g *globals) *cobra.Command {
	var (
		out           string
		width, height int
		timeout       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "screenshot VM URL -o FILE.png",
		Short: "Open URL in a new tab of the VM's browser and save the viewport as PNG",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return fmt.Errorf("%w: give the PNG file with -o FILE (- for stdout)", smolvm.ErrInvalid)
			}
			ctx := cmd.Context()
			vm, err := smolvm.Open(ctx, args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			b, err := smolvm.OpenBrowser(ctx, vm)
			if err != nil {
				return err
			}
			png, err := b.Screenshot(ctx, args[1], smolvm.ScreenshotOptions{Width: width, Height: height, Timeout: timeout})
			if err != nil {
				return err
			}
			if out == "-" {
				_, err = os.Stdout.Write(png)
				return err
			}
			return os.WriteFile(out, png, 0o644)
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "PNG file to write (- for stdout)")
	cmd.Flags().IntVar(&width, "width", 1280, "viewport width in pixels")
	cmd.Flags().IntVar(&height, "height", 800, "viewport height in pixels")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "bound on the new tab, the page load and the capture")
	return cmd
}

func newBrowserStopCmd(g *globals) *cobra.Command {
	var rm bool
	cmd := &cobra.Command{
		Use:   "stop VM",
		Short: "End the VM's browser, remove its profile and close its DevTools forward (--rm: delete the VM too)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			vm, err := smolvm.Open(ctx, args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			if rm {
				return vm.Delete(ctx)
			}
			return smolvm.StopBrowser(ctx, vm)
		},
	}
	cmd.Flags().BoolVar(&rm, "rm", false, "delete the VM (and with it the browser)")
	return cmd
}
