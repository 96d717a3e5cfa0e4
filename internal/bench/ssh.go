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

// sshTransport describes how the SSH comparison reaches the guest.
const sshTransport = "dbclient → host loopback TCP → agent exec stream → busybox nc → guest loopback TCP → dropbear; new connection per command"

// maxSSHRuns bounds the SSH comparison: each call is a full key exchange
// under emulation.
const maxSSHRuns = 20

// guestSSHDir is where dropbear and its libraries go in the guest.
const guestSSHDir = "/tmp/bench-ssh"

// guestSSHAddr is where dropbear listens in the guest.
const guestSSHAddr = "127.0.0.1:2222"

// Host tools of Debian's dropbear-bin.
var (
	dropbearBin    = "/usr/sbin/dropbear"
	dbclientBin    = "dbclient"
	dropbearkeyBin = "dropbearkey"
)

// measureSSH times `true` over SSH on vm, new connection each time. The
// guest image has no SSH server and the library no guest network yet, so
// the host's dropbear (with the shared libraries it links) is copied into
// the guest and listens on the guest's loopback. Each connection that a
// loopback TCP listener of this process accepts is bridged into the guest
// by a busybox nc started through the agent (dropbear's inetd mode needs a
// socket on stdin, which an exec stream is not); the host's dbclient
// connects to that listener. What is measured is the SSH protocol (key
// exchange, auth, session, command) under the same emulation; the byte
// transport is the agent's exec stream instead of a virtual NIC.
func measureSSH(ctx context.Context, vm *smolvm.VM, runs int, log *slog.Logger) *SSHResult {
	for _, b := range []*string{&dropbearBin, &dbclientBin, &dropbearkeyBin} {
		p, err := exec.LookPath(*b)
		if err != nil {
			return &SSHResult{Skipped: fmt.Sprintf("%s not found on the host (apt-get install dropbear-bin)", *b)}
		}
		*b = p
	}
	tmp, err := os.MkdirTemp("", "smvssh")
	if err != nil {
		return &SSHResult{Skipped: err.Error()}
	}
	defer os.RemoveAll(tmp)
	server, err := installDropbear(ctx, vm, tmp)
	if err != nil {
		return &SSHResult{Skipped: "could not set up dropbear in the guest: " + err.Error()}
	}
	sctx, stopServer := context.WithCancel(ctx)
	serverDone := make(chan struct{})
	go func() {
		defer close(serverDone)
		var stderr bytes.Buffer
		c := vm.Command(sctx, server[0], server[1:]...)
		c.Stderr = &stderr
		if err := c.Run(); err != nil && sctx.Err() == nil {
			log.Warn("dropbear in the guest ended", "err", err, "stderr", stderr.String())
		}
	}()
	defer func() { stopServer(); <-serverDone }()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return &SSHResult{Skipped: "listen on loopback: " + err.Error()}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
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
				host, port, _ := strings.Cut(guestSSHAddr, ":")
				c := vm.Command(ctx, "nc", host, port)
				var stderr bytes.Buffer
				c.Stdin, c.Stdout, c.Stderr = conn, conn, &stderr
				if err := c.Run(); err != nil {
					log.Debug("nc in the guest", "err", err, "stderr", stderr.String())
				}
			}()
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	call := func() (time.Duration, error) {
		cmd := exec.CommandContext(ctx, dbclientBin, "-y", "-y", "-T", "-i", filepath.Join(tmp, "client_key"),
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
	// One call first, retried while dropbear starts; it also pages
	// dropbear in.
	for attempt := 1; ; attempt++ {
		_, err := call()
		if err == nil {
			break
		}
		if attempt == 20 || ctx.Err() != nil {
			return &SSHResult{Skipped: "ssh into the guest failed: " + err.Error()}
		}
		time.Sleep(250 * time.Millisecond)
	}
	runs = min(runs, maxSSHRuns)
	ds := make([]time.Duration, 0, runs)
	for i := 0; i < runs; i++ {
		d, err := call()
		if err != nil {
			// A failure after a working first call is an error, not a skip.
			return &SSHResult{Skipped: "ssh call failed midway (no figure reported): " + err.Error()}
		}
		ds = append(ds, d)
	}
	return &SSHResult{Transport: sshTransport, Runs: runs, True: Summarize(ds)}
}

// installDropbear copies dropbear, its shared libraries, a host key and an
// authorized client key into the guest, and returns the guest command line
// that runs dropbear in the foreground on guestSSHAddr.
func installDropbear(ctx context.Context, vm *smolvm.VM, tmp string) ([]string, error) {
	libs, loader, err := sharedLibs(ctx, dropbearBin)
	if err != nil {
		return nil, err
	}
	hostKey, clientKey := filepath.Join(tmp, "host_key"), filepath.Join(tmp, "client_key")
	for _, k := range []string{hostKey, clientKey} {
		if out, err := exec.CommandContext(ctx, dropbearkeyBin, "-t", "ed25519", "-f", k).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("dropbearkey: %w: %s", err, out)
		}
	}
	out, err := exec.CommandContext(ctx, dropbearkeyBin, "-y", "-f", clientKey).Output()
	if err != nil {
		return nil, fmt.Errorf("dropbearkey -y: %w", err)
	}
	var pub string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "ssh-") {
			pub = line + "\n"
		}
	}
	if pub == "" {
		return nil, errors.New("dropbearkey -y printed no public key")
	}
	put := func(guestPath string, data []byte, mode string) error {
		script := fmt.Sprintf("mkdir -p %s && cat > %s && chmod %s %s", filepath.Dir(guestPath), guestPath, mode, guestPath)
		res, err := vm.Run(ctx, script, smolvm.WithStdin(bytes.NewReader(data)))
		if err == nil && res.ExitCode != 0 {
			err = fmt.Errorf("%s: exit code %d: %s", script, res.ExitCode, res.Stderr)
		}
		return err
	}
	files := map[string]string{dropbearBin: guestSSHDir + "/dropbear", hostKey: guestSSHDir + "/host_key"}
	for soname, path := range libs {
		files[path] = guestSSHDir + "/lib/" + soname
	}
	for host, guest := range files {
		b, err := os.ReadFile(host)
		if err != nil {
			return nil, err
		}
		if err := put(guest, b, "700"); err != nil {
			return nil, err
		}
	}
	if res, err := vm.Run(ctx, "mkdir -p /root/.ssh && chmod 700 /root/.ssh"); err != nil || res.ExitCode != 0 {
		return nil, fmt.Errorf("make /root/.ssh: %w", err)
	}
	if err := put("/root/.ssh/authorized_keys", []byte(pub), "600"); err != nil {
		return nil, err
	}
	return []string{guestSSHDir + "/lib/" + loader, "--library-path", guestSSHDir + "/lib",
		guestSSHDir + "/dropbear", "-F", "-E", "-s", "-p", guestSSHAddr, "-r", guestSSHDir + "/host_key"}, nil
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
