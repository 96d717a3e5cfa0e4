package smolvm

// A browser sandbox: headless Chromium in a VM of the browser image
// (`smolvm image build browser`, Recipes["browser"]), its DevTools
// endpoint forwarded to a host port (VM.ExposePort: 127.0.0.1 unless the
// caller says otherwise), so that any CDP client on the host
// (Playwright's connectOverCDP, Puppeteer.connect, chromedp) drives it.
//
// Chromium runs in the guest as a process of its own session (setsid,
// stdio on a log file in /run/smolvm-browser), so it outlives the command
// that started it: the agent kills a command's process group only when
// the command times out or is cancelled. Its pid, log and fresh profile
// folder (--user-data-dir, made with mktemp under /tmp at each start) are
// under /run/smolvm-browser, where StopBrowser finds them.
//
// It runs with --no-sandbox: it runs as the guest's root (nothing else
// runs there), and Chromium's own sandbox needs either the setuid
// chromium-sandbox helper or user namespaces to confine renderers inside
// the guest. The boundary that matters is the VM: a page that escapes a
// renderer holds a disposable guest with no host folders and no network
// but what the sandbox's egress policy allows (Config.Egress), which the
// supervisor enforces outside the guest. The browser's traffic is the
// VM's: it reaches only what egress allows, and the host's loopback only
// through names mapped with Config.Hosts.
//
// DevTools are offered on the guest's 0.0.0.0:9222 (the forward connects to
// the guest's address), which nothing reaches but the forward: a guest is
// reachable from outside only through its port forwards. Connections
// that carry an Origin header (web pages in a browser on the host) are
// refused by Chromium (no --remote-allow-origins).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/remote"
)

// BrowserImage is the image NewBrowser boots unless Config.Image says
// otherwise.
const BrowserImage = "browser"

// BrowserDevToolsPort is the guest port Chromium's DevTools listen on.
const BrowserDevToolsPort = 9222

// browserMemoryMiB is a browser sandbox's memory unless Config.MemoryMiB
// says otherwise: Chromium's browser, GPU-less compositor and one
// renderer take some 300 MiB on a simple page.
const browserMemoryMiB = 1024

// browserImageScript runs in the browser image after its packages. It
// keeps chromium's en-US UI strings only (the other 50-odd locales are
// some 40 MiB nobody reads headless), and removes what only a GPU would
// load: Mesa's DRI drivers with the LLVM and Z3 they link (157 MiB that
// chromium-common's dependency on x11-utils pulls in through libgl1;
// Chromium itself links neither, draws in software with --disable-gpu,
// and libgbm opens a DRI driver only for a GPU device, which the guest
// has none of) and the Vulkan validation layer (a debugging aid).
const browserImageScript = `for d in /usr/lib/chromium/locales /usr/lib/chromium/headless_shell_locales; do
  [ -d "$d" ] && find "$d" -name '*.pak' ! -name 'en-US.pak' -delete
done
rm -rf /usr/lib/x86_64-linux-gnu/dri
rm -f /usr/lib/x86_64-linux-gnu/libLLVM-15.so* /usr/lib/x86_64-linux-gnu/libz3.so* /usr/lib/chromium/libVkLayer_khronos_validation.so*
true
`

// BrowserFlags are the flags Chromium starts with (before
// BrowserOptions.Args and the --user-data-dir of each start): headless,
// no GPU, nothing that phones home on its own (component updates, sync,
// safe-browsing lists, metrics), DevTools on the guest's loopback.
var BrowserFlags = []string{
	"--headless", "--no-sandbox", "--disable-gpu",
	"--disable-background-networking", "--disable-component-update", "--disable-sync",
	"--disable-default-apps", "--disable-extensions", "--disable-breakpad", "--no-first-run",
	"--no-default-browser-check", "--mute-audio",
	"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=" + strconv.Itoa(browserLoopbackPort),
}

// browserLoopbackPort is where Chromium itself listens, on the guest's
// loopback: Chromium 147 binds DevTools to 127.0.0.1 whatever
// --remote-debugging-address says, so the agent's relay (smolvm-agent
// relay) offers it on the guest's BrowserDevToolsPort, where the forward
// reaches.
const browserLoopbackPort = BrowserDevToolsPort + 1

// BrowserOptions change how StartBrowser starts the browser.
type BrowserOptions struct {
	// HostPort is the host port DevTools are forwarded to; 0 picks a free
	// one (or keeps the VM's existing forward to the DevTools port).
	HostPort int
	// Args are extra Chromium flags, after BrowserFlags.
	Args []string
	// Timeout bounds the wait for DevTools to answer; default 2 minutes
	// (Chromium's first start under emulation takes several seconds).
	Timeout time.Duration
}

// Browser is a running browser's DevTools endpoint on the host.
type Browser struct {
	VMID   string `json:"id"`
	VMName string `json:"name"`
	// WebSocketURL is the browser's CDP endpoint,
	// ws://127.0.0.1:PORT/devtools/browser/ID.
	WebSocketURL string `json:"ws_url"`
	// HTTPURL is the DevTools HTTP endpoint (/json/version, /json/list),
	// what Playwright's connectOverCDP and Puppeteer's browserURL take.
	HTTPURL  string `json:"http_url"`
	HostPort int    `json:"host_port"`
	// Version is Chromium's product string, e.g. HeadlessChrome/147.0.7727.137.
	Version string `json:"version"`
	// Ready is how long StartBrowser took from the start of Chromium to
	// DevTools answering through the forward (0 from OpenBrowser).
	Ready time.Duration `json:"ready_ns,omitempty"`
}

// The guest's files of a running browser.
const (
	browserRunDir  = "/run/smolvm-browser"
	browserPidFile = browserRunDir + "/pid"
	browserLogFile = browserRunDir + "/log"
)

// browserStartScript starts Chromium detached, in a session of its own
// with the relay to its DevTools (so that one kill of the process group
// ends both), and waits until its pid is recorded. $1 is the flags, one per line. Exit 3: already running; 127:
// no chromium.
const browserStartScript = `set -e
bin=$(command -v chromium-headless-shell || command -v chromium || true)
[ -n "$bin" ] || { echo "no chromium in this VM" >&2; exit 127; }
if [ -s ` + browserPidFile + ` ] && kill -0 "$(cat ` + browserPidFile + `)" 2>/dev/null; then exit 3; fi
rm -rf "$(cat ` + browserRunDir + `/profile 2>/dev/null || echo /nonexistent)" ` + browserRunDir + `
mkdir -p ` + browserRunDir + `
profile=$(mktemp -d /tmp/smolvm-browser-profile.XXXXXX)
echo "$profile" > ` + browserRunDir + `/profile
old_ifs=$IFS; IFS='
'
set -- $1
IFS=$old_ifs
setsid sh -c 'echo $$ > ` + browserPidFile + `.tmp && mv ` + browserPidFile + `.tmp ` + browserPidFile + ` &&
  { /proc/1/exe relay 0.0.0.0:9222 127.0.0.1:9223 & } && exec "$@"' \
  chromium "$bin" "$@" --user-data-dir="$profile" about:blank </dev/null >` + browserLogFile + ` 2>&1 &
i=0
while [ ! -s ` + browserPidFile + ` ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
[ -s ` + browserPidFile + ` ] || { echo "chromium did not start" >&2; exit 1; }
`

// browserStopScript ends the browser's process group (it leads one: setsid)
// with SIGTERM, then SIGKILL after 10 s, and removes its profile and files.
const browserStopScript = `pid=$(cat ` + browserPidFile + ` 2>/dev/null || true)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  kill -s TERM -- -"$pid" 2>/dev/null || kill -s TERM "$pid" 2>/dev/null || true
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
  kill -s KILL -- -"$pid" 2>/dev/null || true
fi
profile=$(cat ` + browserRunDir + `/profile 2>/dev/null || true)
case "$profile" in /tmp/smolvm-browser-profile.*) rm -rf "$profile" ;; esac
rm -rf ` + browserRunDir + `
`

// NewBrowser creates a sandbox from the browser image (cfg.Image, default
// BrowserImage; cfg.MemoryMiB default 1024) and starts the browser in it.
// A missing image is ErrNotFound naming `smolvm image build browser`,
// before anything is created; a browser that does not start deletes the
// VM.
func NewBrowser(ctx context.Context, cfg Config, opts BrowserOptions) (*VM, *Browser, error) {
	h, err := OpenHost(cfg.Home)
	if err != nil {
		return nil, nil, err
	}
	vm, b, err := h.NewBrowser(ctx, cfg, opts)
	vm, err = h.handOver(vm, err)
	return vm, b, err
}

// NewBrowser is NewBrowser in this host's state folder.
func (h *Host) NewBrowser(ctx context.Context, cfg Config, opts BrowserOptions) (*VM, *Browser, error) {
	if cfg.Image == "" || cfg.Image == DefaultImage {
		cfg.Image = BrowserImage
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = browserMemoryMiB
	}
	if _, err := h.InspectImage(ctx, cfg.Image); err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, nil, fmt.Errorf("browser image %q is %w: build it with 'smolvm image build %s' (Debian's chromium and fonts, a few minutes)", cfg.Image, ErrNotFound, BrowserImage)
		}
		return nil, nil, err
	}
	vm, err := h.New(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	b, err := StartBrowser(ctx, vm, opts)
	if err != nil {
		if derr := vm.Delete(context.WithoutCancel(ctx)); derr != nil {
			err = errors.Join(err, fmt.Errorf("delete VM %s: %w", vm.Name(), derr))
		}
		vm.Close()
		return nil, nil, err
	}
	return vm, b, nil
}

// StartBrowser starts headless Chromium in a running VM that has it (a VM
// of the browser image), forwards its DevTools port to a host port and
// waits until DevTools answer through the forward. A VM whose browser
// already runs is ErrExists; on failure the browser is stopped and a
// forward this call made is closed.
func StartBrowser(ctx context.Context, vm *VM, opts BrowserOptions) (b *Browser, err error) {
	if opts.HostPort < 0 || opts.HostPort > 65535 {
		return nil, fmt.Errorf("%w: host port %d", ErrInvalid, opts.HostPort)
	}
	for _, a := range opts.Args {
		if !strings.HasPrefix(a, "--") || strings.ContainsAny(a, "\n\x00") {
			return nil, fmt.Errorf("%w: chromium flag %q: give --name or --name=value", ErrInvalid, a)
		}
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	fwd, made, err := browserForward(ctx, vm, opts.HostPort)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil && made {
			if cerr := vm.ClosePort(context.WithoutCancel(ctx), fwd.HostPort); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
	}()

	flags := strings.Join(append(append([]string(nil), BrowserFlags...), opts.Args...), "\n")
	t0 := time.Now()
	res, err := vm.Run(ctx, "sh -c "+shellQuote(browserStartScript)+" browser "+shellQuote(flags), WithTimeout(time.Minute))
	if err != nil {
		return nil, fmt.Errorf("start the browser in VM %s: %w", vm.Name(), err)
	}
	switch res.ExitCode {
	case 0:
	case 3:
		at := ""
		if ob, oerr := OpenBrowser(ctx, vm); oerr == nil {
			at = " at " + ob.WebSocketURL
		}
		return nil, fmt.Errorf("a browser %w in VM %s%s: connect to it, or stop it first (smolvm browser stop %s)", ErrExists, vm.Name(), at, vm.Name())
	case 127:
		return nil, fmt.Errorf("%w: VM %s has no chromium: create it from the browser image (smolvm image build browser; smolvm browser start)", ErrInvalid, vm.Name())
	default:
		return nil, fmt.Errorf("start the browser in VM %s: exit %d: %s", vm.Name(), res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	defer func() {
		if err != nil {
			if serr := stopBrowserProcess(context.WithoutCancel(ctx), vm); serr != nil {
				err = errors.Join(err, serr)
			}
		}
	}()
	b, err = waitDevTools(ctx, vm, fwd)
	if err != nil {
		return nil, err
	}
	b.Ready = time.Since(t0)
	return b, nil
}

// browserForward returns the VM's forward to the DevTools port, making
// one (on hostPort, or a free port) when there is none or it is on
// another port; made says this call made it.
func browserForward(ctx context.Context, vm *VM, hostPort int) (PortForward, bool, error) {
	fwds, err := vm.Ports(ctx)
	if err != nil {
		return PortForward{}, false, err
	}
	for _, f := range fwds {
		if f.GuestPort != BrowserDevToolsPort {
			continue
		}
		if hostPort == 0 || f.HostPort == hostPort {
			return f, false, nil
		}
		if err := vm.ClosePort(ctx, f.HostPort); err != nil {
			return PortForward{}, false, err
		}
	}
	spec := strconv.Itoa(BrowserDevToolsPort)
	if hostPort != 0 {
		spec = strconv.Itoa(hostPort) + ":" + spec
	}
	f, err := vm.ExposePort(ctx, spec)
	if err != nil {
		return f, false, fmt.Errorf("forward the browser's DevTools port: %w", err)
	}
	return f, true, nil
}

// waitDevTools polls DevTools through the forward until they answer,
// checking every second that Chromium still runs.
func waitDevTools(ctx context.Context, vm *VM, fwd PortForward) (*Browser, error) {
	lastCheck := time.Now()
	for {
		b, err := devTools(ctx, vm, fwd)
		if err == nil {
			return b, nil
		}
		if time.Since(lastCheck) >= time.Second {
			lastCheck = time.Now()
			res, rerr := vm.Run(ctx, "kill -0 \"$(cat "+browserPidFile+")\" && exit 0; tail -c 2000 "+browserLogFile+"; exit 1", WithTimeout(30*time.Second))
			if rerr == nil && res.ExitCode != 0 {
				return nil, fmt.Errorf("chromium in VM %s exited before DevTools answered: %s", vm.Name(), strings.TrimSpace(string(res.Stdout)))
			}
		}
		select {
		case <-ctx.Done():
			log := ""
			lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			if res, rerr := vm.Run(lctx, "tail -c 2000 "+browserLogFile); rerr == nil {
				log = "; its log: " + strings.TrimSpace(string(res.Stdout))
			}
			cancel()
			return nil, fmt.Errorf("chromium in VM %s: DevTools did not answer on %s: %w (last: %w)%s", vm.Name(), hostAddr(fwd), ctx.Err(), err, log)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// wsPathRE is the path of a browser's CDP endpoint.
var wsPathRE = regexp.MustCompile(`^/devtools/browser/[A-Za-z0-9-]{1,64}$`)

// devTools asks the DevTools HTTP endpoint for the browser's WebSocket
// URL. The guest's answer is not trusted: only its path is kept, checked,
// on the forward's own address (a guest cannot point a host client
// elsewhere), and at most 64 KiB of it is read.
func devTools(ctx context.Context, vm *VM, fwd PortForward) (*Browser, error) {
	addr := hostAddr(fwd)
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, "http://"+addr+"/json/version", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /json/version: %s", resp.Status)
	}
	var v struct {
		Browser string `json:"Browser"`
		WS      string `json:"webSocketDebuggerUrl"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&v); err != nil {
		return nil, fmt.Errorf("GET /json/version: %w", err)
	}
	i := strings.Index(v.WS, "/devtools/")
	if i < 0 || !wsPathRE.MatchString(v.WS[i:]) {
		return nil, fmt.Errorf("GET /json/version: unexpected webSocketDebuggerUrl %q", v.WS)
	}
	v.Browser = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, v.Browser)
	if len(v.Browser) > 200 {
		v.Browser = v.Browser[:200]
	}
	return &Browser{VMID: vm.ID(), VMName: vm.Name(), WebSocketURL: "ws://" + addr + v.WS[i:], HTTPURL: "http://" + addr,
		HostPort: fwd.HostPort, Version: v.Browser}, nil
}

// hostAddr is where a forward is reached on the host: its address, or
// loopback for a forward on all addresses.
func hostAddr(f PortForward) string {
	ip := f.HostIP
	if ip == "" || net.ParseIP(ip).IsUnspecified() {
		ip = "127.0.0.1"
	}
	return net.JoinHostPort(ip, strconv.Itoa(f.HostPort))
}

// OpenBrowser returns the endpoint of the browser running in vm; a VM
// without one is ErrNotRunning naming `smolvm browser start`.
func OpenBrowser(ctx context.Context, vm *VM) (*Browser, error) {
	fwds, err := vm.Ports(ctx)
	if err != nil {
		return nil, err
	}
	for _, f := range fwds {
		if f.GuestPort == BrowserDevToolsPort {
			if b, err := devTools(ctx, vm, f); err == nil {
				return b, nil
			}
		}
	}
	return nil, fmt.Errorf("browser of VM %s: %w: start it with 'smolvm browser start %s'", vm.Name(), ErrNotRunning, vm.Name())
}

// StopBrowser ends the browser of vm, removes its profile and closes its
// DevTools forward. A VM without a browser is no error.
func StopBrowser(ctx context.Context, vm *VM) error {
	err := stopBrowserProcess(ctx, vm)
	fwds, perr := vm.Ports(ctx)
	if perr != nil {
		return errors.Join(err, perr)
	}
	for _, f := range fwds {
		if f.GuestPort == BrowserDevToolsPort {
			err = errors.Join(err, vm.ClosePort(ctx, f.HostPort))
		}
	}
	return err
}

func stopBrowserProcess(ctx context.Context, vm *VM) error {
	res, err := vm.Run(ctx, browserStopScript, WithTimeout(time.Minute))
	if err != nil {
		return fmt.Errorf("stop the browser in VM %s: %w", vm.Name(), err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("stop the browser in VM %s: exit %d: %s", vm.Name(), res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	return nil
}

// ScreenshotOptions change Browser.Screenshot.
type ScreenshotOptions struct {
	// Width and Height are the viewport in CSS pixels (the PNG's size);
	// default 1280×800, at most 8192 each.
	Width, Height int
	// Timeout bounds the new tab, the page load and the capture; default
	// 2 minutes (each tab is a new renderer process: 10-30 s under
	// emulation on a loaded host).
	Timeout time.Duration
}

// Screenshot opens url in a new tab of the browser, waits for its load
// event, captures the viewport as PNG and closes the tab. A page that
// does not load (a name or address egress denies, a refused connection)
// is an error naming Chromium's reason (net::ERR_…).
func (b *Browser) Screenshot(ctx context.Context, url string, opts ScreenshotOptions) ([]byte, error) {
	if opts.Width == 0 {
		opts.Width = 1280
	}
	if opts.Height == 0 {
		opts.Height = 800
	}
	if opts.Width < 1 || opts.Height < 1 || opts.Width > 8192 || opts.Height > 8192 {
		return nil, fmt.Errorf("%w: screenshot size %dx%d: give 1 to 8192 pixels each", ErrInvalid, opts.Width, opts.Height)
	}
	if url == "" {
		return nil, fmt.Errorf("%w: no URL to screenshot", ErrInvalid)
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	// The allocator's context bounds the connection: its end closes the
	// tab this made and the WebSocket, never the browser.
	actx, acancel := remote.NewAllocator(ctx, b.WebSocketURL, remote.NoModifyURL)
	defer acancel()
	tctx, tcancel := chromedp.NewContext(actx)
	defer tcancel()
	if err := chromedp.Do(tctx, chromedp.EmulateViewport(int64(opts.Width), int64(opts.Height)), chromedp.Navigate(url)); err != nil {
		return nil, fmt.Errorf("screenshot %q in VM %s: %w", url, b.VMName, err)
	}
	png, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		return nil, fmt.Errorf("screenshot %q in VM %s: %w", url, b.VMName, err)
	}
	return png, nil
}

// shellQuote quotes s for /bin/sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
