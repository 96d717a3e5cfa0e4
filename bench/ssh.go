package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/smolvm/smolvm"
)

// The two ways the SSH comparison reaches the guest (SSHResult.Transport).
const (
	// transportForward is SmolVM's path: the VM's NIC and a forwarded host
	// port. The NIC's mode is appended ("user-mode NIC").
	transportForward = "dropbear via port forward"
	// transportBridge is the fallback for a VM without a NIC.
	transportBridge = "dropbear via agent exec bridge"
)

// maxSSHRuns bounds the SSH comparison: each call is a full key exchange
// under emulation.
const maxSSHRuns = 20

// sshCallTimeout bounds one dbclient call, so that a wedged connection
// cannot hang the bench. A call takes well under a second even loaded.
const sshCallTimeout = 2 * time.Minute

// sshReadyTimeout bounds the wait for dropbear to listen in the guest.
const sshReadyTimeout = time.Minute

// guestSSHDir is where dropbear and its libraries go in the guest.
const guestSSHDir = "/tmp/bench-ssh"

// guestSSHPort is the guest TCP port dropbear listens on: on every address
// when the VM has a NIC (the forward reaches it on eth0), on the guest's
// loopback for the exec bridge.
const guestSSHPort = 2222

// sshTools are the host programs of Debian's dropbear-bin.
type sshTools struct {
	dropbear, dbclient, dropbearkey string
}

// findSSHTools looks the host's dropbear-bin programs up.
func findSSHTools() (sshTools, error) {
	t := sshTools{dropbear: "/usr/sbin/dropbear", dbclient: "dbclient", dropbearkey: "dropbearkey"}
	for _, b := range []*string{&t.dropbear, &t.dbclient, &t.dropbearkey} {
		p, err := exec.LookPath(*b)
		if err != nil {
			return t, fmt.Errorf("%s not found on the host (apt-get install dropbear-bin): %w", *b, err)
		}
		*b = p
	}
	return t, nil
}

// sshTarget is where dbclient connects, and how to take it down.
type sshTarget struct {
	transport string // transportForward + NIC, or transportBridge
	path      string // the hops, for the report
	port      int    // host TCP port on 127.0.0.1
	server    *guestServer
	close     func()
}

// measureSSH times `true` over SSH on vm, a new connection each time. The
// guest image has no SSH server, so the host's dropbear (with the shared
// libraries it links) is copied into the guest and started through the
// agent. When the VM has a NIC, dropbear listens on guest port 2222 on all
// addresses and the VM forwards a free host port on 127.0.0.1 to it
// (vm.ExposePort): dbclient connects there, the path SmolVM's SSH takes.
// Without a NIC (network mode none), dropbear listens on the guest's
// loopback and each connection to a loopback listener of this process is
// bridged into the guest by a busybox nc started through the agent's exec
// stream. The forward, dropbear, its files and the client key are removed
// before it returns.
func measureSSH(ctx context.Context, vm *smolvm.VM, runs int, log *slog.Logger) *SSHResult {
	tools, err := findSSHTools()
	if err != nil {
		return &SSHResult{Skipped: err.Error()}
	}
	netInfo, err := vm.Network(ctx)
	if err != nil {
		return &SSHResult{Skipped: "read the VM's network: " + err.Error()}
	}
	tmp, err := os.MkdirTemp("", "smvssh")
	if err != nil {
		return &SSHResult{Skipped: err.Error()}
	}
	defer os.RemoveAll(tmp)
	setup, err := installDropbear(ctx, vm, tools, tmp)
	// The guest's copy goes also when the install failed halfway.
	defer removeDropbear(vm, setup.pubKey, log)
	if err != nil {
		return &SSHResult{Skipped: "could not set up dropbear in the guest: " + err.Error()}
	}
	var target *sshTarget
	if netInfo.Mode == smolvm.NetworkNone || netInfo.Mode == "" {
		target, err = viaExecBridge(ctx, vm, setup.argv, log)
	} else {
		target, err = viaPortForward(ctx, vm, setup.argv, netInfo.Mode, log)
	}
	if err != nil {
		return &SSHResult{Skipped: err.Error()}
	}
	defer target.close()
	port := strconv.Itoa(target.port)
	call := func() (time.Duration, error) {
		cctx, cancel := context.WithTimeout(ctx, sshCallTimeout)
		defer cancel()
		cmd := exec.CommandContext(cctx, tools.dbclient, "-y", "-y", "-T", "-i", setup.clientKey,
			"-p", port, "root@127.0.0.1", "true")
		cmd.Env = append(os.Environ(), "HOME="+tmp)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		t0 := time.Now()
		err := cmd.Run()
		d := time.Since(t0)
		if err != nil {
			return d, fmt.Errorf("dbclient: %w: %s", err, strings.TrimSpace(out.String()))
		}
		return d, nil
	}
	// One call first, retried while dropbear settles; it also pages
	// dropbear in and is not counted.
	for attempt := 1; ; attempt++ {
		_, err := call()
		if err == nil {
			break
		}
		if attempt == 20 || ctx.Err() != nil {
			msg := fmt.Sprintf("ssh into the guest failed (%s): %s", target.transport, err)
			if out := target.server.output(); out != "" {
				msg += "; dropbear: " + out
			}
			return &SSHResult{Skipped: msg}
		}
		time.Sleep(250 * time.Millisecond)
	}
	runs = min(runs, maxSSHRuns)
	ds := make([]time.Duration, 0, runs)
	for i := 0; i < runs; i++ {
		d, err := call()
		if err != nil {
			// A failure after a working first call is an error, not a skip.
			return &SSHResult{Skipped: fmt.Sprintf("ssh call failed midway (%s; no figure reported): %s", target.transport, err)}
		}
		ds = append(ds, d)
	}
	return &SSHResult{Transport: target.transport, Path: target.path, Runs: runs, True: Summarize(ds)}
}

// nicName names a network mode's NIC for the report.
func nicName(mode string) string {
	switch mode {
	case smolvm.NetworkUser:
		return "user-mode NIC"
	case smolvm.NetworkTAP:
		return "TAP NIC"
	}
	return mode + " NIC"
}

// viaPortForward starts dropbear on guestSSHPort on all the guest's
// addresses and forwards a free host port on 127.0.0.1 to it.
func viaPortForward(ctx context.Context, vm *smolvm.VM, argv []string, mode string, log *slog.Logger) (*sshTarget, error) {
	transport := transportForward + ", " + nicName(mode)
	server, err := startDropbear(ctx, vm, argv, fmt.Sprintf("0.0.0.0:%d", guestSSHPort), log)
	if err != nil {
		return nil, fmt.Errorf("start dropbear in the guest (%s): %w", transport, err)
	}
	fwd, err := vm.ExposePort(ctx, strconv.Itoa(guestSSHPort))
	if err != nil {
		server.stop()
		return nil, fmt.Errorf("forward a host port to guest port %d (%s): %w", guestSSHPort, transport, err)
	}
	hop := "the supervisor's userspace NAT stack"
	if mode == smolvm.NetworkTAP {
		hop = "the supervisor's proxy and the TAP device"
	}
	return &sshTarget{
		transport: transport,
		path: fmt.Sprintf("dbclient → host %s → %s → virtio-net → guest eth0 :%d → dropbear; new connection per command",
			net.JoinHostPort(fwd.HostIP, strconv.Itoa(fwd.HostPort)), hop, guestSSHPort),
		port:   fwd.HostPort,
		server: server,
		close: func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if err := vm.ClosePort(cctx, fwd.HostPort); err != nil {
				log.Warn("close the SSH port forward", "forward", fwd.String(), "err", err)
			}
			server.stop()
		},
	}, nil
}

// viaExecBridge starts dropbear on the guest's loopback and bridges each
// connection to a host loopback listener into the guest with busybox nc,
// started through the agent: for a VM without a NIC. (dropbear's inetd
// mode needs a socket on stdin, which an exec stream is not.)
func viaExecBridge(ctx context.Context, vm *smolvm.VM, argv []string, log *slog.Logger) (*sshTarget, error) {
	server, err := startDropbear(ctx, vm, argv, fmt.Sprintf("127.0.0.1:%d", guestSSHPort), log)
	if err != nil {
		return nil, fmt.Errorf("start dropbear in the guest (%s): %w", transportBridge, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		server.stop()
		return nil, fmt.Errorf("listen on the host's loopback: %w", err)
	}
	bctx, stopBridges := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				c := vm.Command(bctx, "nc", "127.0.0.1", strconv.Itoa(guestSSHPort))
				var stderr bytes.Buffer
				c.Stdin, c.Stdout, c.Stderr = conn, conn, &stderr
				if err := c.Run(); err != nil && bctx.Err() == nil {
					log.Debug("nc in the guest", "err", err, "stderr", stderr.String())
				}
			}()
		}
	}()
	return &sshTarget{
		transport: transportBridge,
		path:      fmt.Sprintf("dbclient → host loopback TCP → agent exec stream → busybox nc → guest loopback TCP :%d → dropbear; new connection per command", guestSSHPort),
		port:      ln.Addr().(*net.TCPAddr).Port,
		server:    server,
		close: func() {
			ln.Close()
			stopBridges()
			wg.Wait()
			server.stop()
		},
	}, nil
}

// guestServer is dropbear running in the guest under an agent exec.
type guestServer struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	stderr bytes.Buffer
	err    error
}

func (s *guestServer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stderr.Write(p)
}

// output is what dropbear wrote to stderr so far, trimmed to its end.
func (s *guestServer) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := strings.TrimSpace(s.stderr.String())
	if len(out) > 500 {
		out = "…" + out[len(out)-500:]
	}
	return out
}

// stop kills dropbear (the agent kills the exec's process group when its
// stream ends) and waits for the exec to end.
func (s *guestServer) stop() {
	s.cancel()
	<-s.done
}

// startDropbear runs argv (dropbear in the foreground) with -p listen in
// the guest and waits until the guest has a TCP socket listening on
// guestSSHPort, or dropbear ended.
func startDropbear(ctx context.Context, vm *smolvm.VM, argv []string, listen string, log *slog.Logger) (*guestServer, error) {
	sctx, cancel := context.WithCancel(ctx)
	s := &guestServer{cancel: cancel, done: make(chan struct{})}
	args := append(append([]string(nil), argv[1:]...), "-p", listen)
	c := vm.Command(sctx, argv[0], args...)
	c.Stderr = s
	go func() {
		defer close(s.done)
		err := c.Run()
		if err != nil && sctx.Err() == nil {
			s.mu.Lock()
			s.err = err
			s.mu.Unlock()
			log.Warn("dropbear in the guest ended", "err", err, "stderr", s.output())
		}
	}()
	// The listening socket shows in /proc/net/tcp as local address
	// ADDR:PORT (hex) in state 0A; busybox has no ss.
	probe := fmt.Sprintf("grep -qi ':%04X 00000000:0000 0A' /proc/net/tcp", guestSSHPort)
	deadline := time.Now().Add(sshReadyTimeout)
	for {
		select {
		case <-s.done:
			s.mu.Lock()
			err := s.err
			s.mu.Unlock()
			if err == nil {
				err = errors.New("exited")
			}
			cancel()
			return nil, fmt.Errorf("dropbear: %w: %s", err, s.output())
		default:
		}
		res, err := vm.Run(ctx, probe)
		if err != nil {
			s.stop()
			return nil, fmt.Errorf("wait for dropbear to listen: %w", err)
		}
		if res.ExitCode == 0 {
			return s, nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("dropbear did not listen on guest port %d within %s: %s", guestSSHPort, sshReadyTimeout, s.output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dropbearSetup is what installDropbear made.
type dropbearSetup struct {
	argv      []string // guest command line, without -p
	clientKey string   // host path of the client's private key
	pubKey    string   // the line added to root's authorized_keys
}

// installDropbear copies dropbear, its shared libraries, a host key and an
// authorized client key into the guest, and returns the guest command line
// that runs dropbear in the foreground (the caller adds -p).
func installDropbear(ctx context.Context, vm *smolvm.VM, tools sshTools, tmp string) (dropbearSetup, error) {
	var setup dropbearSetup
	libs, loader, err := sharedLibs(ctx, tools.dropbear)
	if err != nil {
		return setup, err
	}
	hostKey, clientKey := filepath.Join(tmp, "host_key"), filepath.Join(tmp, "client_key")
	for _, k := range []string{hostKey, clientKey} {
		if out, err := exec.CommandContext(ctx, tools.dropbearkey, "-t", "ed25519", "-f", k).CombinedOutput(); err != nil {
			return setup, fmt.Errorf("dropbearkey: %w: %s", err, out)
		}
	}
	out, err := exec.CommandContext(ctx, tools.dropbearkey, "-y", "-f", clientKey).Output()
	if err != nil {
		return setup, fmt.Errorf("dropbearkey -y: %w", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "ssh-") {
			setup.pubKey = strings.TrimSpace(line)
		}
	}
	if setup.pubKey == "" {
		return setup, errors.New("dropbearkey -y printed no public key")
	}
	run := func(script string, stdin []byte) error {
		res, err := vm.Run(ctx, script, smolvm.WithStdin(bytes.NewReader(stdin)))
		if err != nil {
			return fmt.Errorf("%s: %w", script, err)
		}
		if res.ExitCode != 0 {
			return fmt.Errorf("%s: exit code %d: %s", script, res.ExitCode, res.Stderr)
		}
		return nil
	}
	files := map[string]string{tools.dropbear: guestSSHDir + "/dropbear", hostKey: guestSSHDir + "/host_key"}
	for soname, path := range libs {
		files[path] = guestSSHDir + "/lib/" + soname
	}
	for host, guest := range files {
		b, err := os.ReadFile(host)
		if err != nil {
			return setup, fmt.Errorf("read %s: %w", host, err)
		}
		script := fmt.Sprintf("mkdir -p %s && cat > %s && chmod 700 %s", filepath.Dir(guest), guest, guest)
		if err := run(script, b); err != nil {
			return setup, err
		}
	}
	// Appended, so that keys already there stay; removeDropbear takes
	// this line out again.
	if err := run("mkdir -p /root/.ssh && chmod 700 /root/.ssh && cat >> /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys",
		[]byte(setup.pubKey+"\n")); err != nil {
		return setup, err
	}
	setup.clientKey = clientKey
	setup.argv = []string{guestSSHDir + "/lib/" + loader, "--library-path", guestSSHDir + "/lib",
		guestSSHDir + "/dropbear", "-F", "-E", "-s", "-r", guestSSHDir + "/host_key"}
	return setup, nil
}

// removeDropbear undoes installDropbear in the guest: it kills whatever
// still runs from guestSSHDir (dropbear's per-connection processes are in
// sessions of their own, out of reach of the exec's group kill), removes
// the folder and takes pubKey out of root's authorized_keys (the file and
// /root/.ssh go when nothing else is left in them).
func removeDropbear(vm *smolvm.VM, pubKey string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	script := `for p in /proc/[0-9]*; do
  case "$(readlink "$p/exe" 2>/dev/null)" in ` + guestSSHDir + `/*) kill -9 "${p#/proc/}" 2>/dev/null;; esac
done
rm -rf ` + guestSSHDir + `
if [ -n "$KEY" ] && [ -f /root/.ssh/authorized_keys ]; then
  grep -vxF "$KEY" /root/.ssh/authorized_keys > /root/.ssh/.ak.tmp
  if [ -s /root/.ssh/.ak.tmp ]; then mv /root/.ssh/.ak.tmp /root/.ssh/authorized_keys
  else rm -f /root/.ssh/.ak.tmp /root/.ssh/authorized_keys; rmdir /root/.ssh 2>/dev/null; fi
fi
true`
	c := vm.ShellCommand(ctx, script)
	c.Env = []string{"KEY=" + pubKey}
	var out bytes.Buffer
	c.Stdout, c.Stderr = &out, &out
	if err := c.Run(); err != nil {
		log.Warn("remove dropbear from the guest", "err", err, "output", out.String())
	}
}

// sharedLibs asks ldd which libraries bin needs: soname → host path, and
// the soname of the dynamic loader.
func sharedLibs(ctx context.Context, bin string) (map[string]string, string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return nil, "", fmt.Errorf("ldd %s: %w", bin, err)
	}
	return parseLdd(string(out))
}

// parseLdd reads ldd's output.
func parseLdd(out string) (map[string]string, string, error) {
	libs := map[string]string{}
	loader := ""
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs[f[0]] = f[2]
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			loader = filepath.Base(f[0])
			libs[loader] = f[0]
		}
	}
	if loader == "" {
		return nil, "", errors.New("ldd found no dynamic loader (a static binary?)")
	}
	return libs, loader, nil
}
