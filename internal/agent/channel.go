package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

const (
	portPollInterval = 50 * time.Millisecond
	// PortWaitTimeout bounds the wait for the virtio-serial device, which
	// may appear late when the guest runs under software emulation.
	PortWaitTimeout = 5 * time.Minute
	// hostPollInterval is how often a disconnected port is checked for a
	// new host connection when the port cannot send SIGIO.
	hostPollInterval = 5 * time.Millisecond
)

// FindVirtioPort returns the /dev path of the virtio-serial port with the
// given name, or "" when there is none (yet).
func FindVirtioPort(sysDir, name string) string {
	dirs, _ := filepath.Glob(filepath.Join(sysDir, "vport*"))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(d)
		}
	}
	return ""
}

// WaitVirtioPort polls for the named virtio-serial port until it appears,
// the context ends or timeout passes.
func WaitVirtioPort(ctx context.Context, log *slog.Logger, name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	logged := false
	for {
		if p := FindVirtioPort("/sys/class/virtio-ports", name); p != "" {
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio-serial port %s did not appear within %s: is the virtio_console driver loaded and the port configured on the host?", name, timeout)
		}
		if !logged {
			log.Info("waiting for virtio-serial port", "name", name)
			logged = true
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(portPollInterval):
		}
	}
}

// ListenVsock listens on the given vsock port.
func ListenVsock(port uint32) (net.Listener, error) {
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	return l, nil
}

// SerialListener presents one virtio-serial port as a net.Listener. Accept
// returns one net.Conn per host connection: it waits until a host is
// connected (the port stops reporting POLLHUP) and until the previous
// connection was closed. A conn reads EOF when the host disconnects.
type SerialListener struct {
	path string
	fd   int
	slot chan struct{} // holds a token while a conn is out
	done chan struct{}
	once sync.Once
	// connected reports whether a host is connected; replaceable in tests.
	connected func(fd int) (bool, error)
}

// ListenSerial opens a character device (a virtio-serial port) for Accept.
func ListenSerial(path string) (*SerialListener, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return newSerialListener(path, fd), nil
}

func newSerialListener(path string, fd int) *SerialListener {
	return &SerialListener{
		path:      path,
		fd:        fd,
		slot:      make(chan struct{}, 1),
		done:      make(chan struct{}),
		connected: hostConnected,
	}
}

// hostConnected polls the port: POLLHUP means no host is connected.
func hostConnected(fd int) (bool, error) {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}
	for {
		_, err := unix.Poll(pfd, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, err
		}
		if pfd[0].Revents&unix.POLLNVAL != 0 {
			return false, unix.EBADF
		}
		return pfd[0].Revents&unix.POLLHUP == 0, nil
	}
}

// Accept waits for a host connection.
func (l *SerialListener) Accept() (net.Conn, error) {
	select {
	case l.slot <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	release := func() { <-l.slot }
	// The port cannot be waited on for a host to connect (it polls as
	// hung up until then), but the driver sends SIGIO when the host's
	// side opens or closes: the wait takes that signal, asked for only
	// while waiting (the driver sends one for every arrival of data too).
	// No timer besides: an idle guest whose host never connects this
	// port (a restored VM talks over the fast lane until it needs gRPC)
	// must not wake (a poll once a second was a third of an idle VM's
	// host CPU). No connect is missed: O_ASYNC is on before the first
	// check, and each check takes the next SIGIO's channel before it
	// looks, so a connect either shows in the check or closes that
	// channel. Without O_ASYNC the port is polled.
	var tick <-chan time.Time
	if l.async(true) {
		defer l.async(false)
	} else {
		t := time.NewTicker(hostPollInterval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-l.done:
			release()
			return nil, net.ErrClosed
		default:
		}
		wake := nextSIGIO() // before the check: a later SIGIO is not lost
		ok, err := l.connected(l.fd)
		if err != nil {
			release()
			return nil, fmt.Errorf("poll %s: %w", l.path, err)
		}
		if ok {
			break
		}
		select {
		case <-l.done:
		case <-wake:
		case <-tick:
		}
	}
	// Each conn gets its own descriptor so that closing it (which unblocks
	// a pending Read through the poller) leaves the port open.
	nfd, err := unix.FcntlInt(uintptr(l.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		release()
		return nil, fmt.Errorf("dup %s: %w", l.path, err)
	}
	f := os.NewFile(uintptr(nfd), l.path) // non-blocking: registered with the poller
	return &serialConn{File: f, addr: serialAddr(l.path), release: release}, nil
}

// async turns the port's SIGIO on or off (O_ASYNC, owned by this
// process) and reports whether that worked.
func (l *SerialListener) async(on bool) bool {
	flags, err := unix.FcntlInt(uintptr(l.fd), unix.F_GETFL, 0)
	if err != nil {
		return false
	}
	if on {
		if _, err := unix.FcntlInt(uintptr(l.fd), unix.F_SETOWN, os.Getpid()); err != nil {
			return false
		}
		flags |= unix.O_ASYNC
	} else {
		flags &^= unix.O_ASYNC
	}
	_, err = unix.FcntlInt(uintptr(l.fd), unix.F_SETFL, flags)
	return err == nil
}

// sigio hands out channels that are closed at the process's next SIGIO.
var sigio struct {
	once sync.Once
	mu   sync.Mutex
	ch   chan struct{}
}

func nextSIGIO() <-chan struct{} {
	sigio.once.Do(func() {
		sigio.ch = make(chan struct{})
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGIO)
		go func() {
			for range c {
				sigio.mu.Lock()
				close(sigio.ch)
				sigio.ch = make(chan struct{})
				sigio.mu.Unlock()
			}
		}()
	})
	sigio.mu.Lock()
	defer sigio.mu.Unlock()
	return sigio.ch
}

// Close stops Accept and closes the port. Conns already handed out stay
// open until closed.
func (l *SerialListener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.done)
		err = unix.Close(l.fd)
	})
	return err
}

// Addr returns the port's path.
func (l *SerialListener) Addr() net.Addr { return serialAddr(l.path) }

type serialAddr string

func (serialAddr) Network() string  { return "virtio-serial" }
func (a serialAddr) String() string { return string(a) }

type serialConn struct {
	*os.File
	addr    serialAddr
	once    sync.Once
	release func()
}

func (c *serialConn) Close() error {
	err := c.File.Close()
	c.once.Do(c.release)
	return err
}

func (c *serialConn) LocalAddr() net.Addr  { return c.addr }
func (c *serialConn) RemoteAddr() net.Addr { return serialAddr("host") }
