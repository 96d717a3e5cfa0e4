package agent

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakePort is a listener on a pipe standing in for a virtio-serial port
// (a pipe takes O_ASYNC and F_SETOWN as the port does); connected(n)
// answers its n-th check (from 1) for a host.
func fakePort(t *testing.T, connected func(n int32) bool) *SerialListener {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	l := newSerialListener("fake-port", p[0])
	t.Cleanup(func() {
		_ = l.Close()
		_ = unix.Close(p[1])
	})
	var checks atomic.Int32
	l.connected = func(int) (bool, error) { return connected(checks.Add(1)), nil }
	return l
}

// accept runs Accept and fails the test if it does not return within a
// generous bound (a missed connect leaves it waiting for good).
func accept(t *testing.T, l *SerialListener) (net.Conn, error) {
	t.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-time.After(30 * time.Second):
		t.Fatal("Accept still waits: it missed the host's connect")
		return nil, nil
	}
}

// A host that connects right after Accept found the port hung up, its
// SIGIO arriving before Accept waits, is not missed: each check takes
// the channel of the next SIGIO before it looks. (Taking it after the
// check loses that signal, and Accept waits for good.)
func TestSerialAcceptConnectAfterCheck(t *testing.T) {
	var up atomic.Bool
	l := fakePort(t, func(n int32) bool {
		if up.Load() {
			return true
		}
		// The host connects as this check returns: the driver sends
		// SIGIO, handled before Accept goes on to wait.
		up.Store(true)
		handled := nextSIGIO()
		if err := unix.Kill(os.Getpid(), unix.SIGIO); err != nil {
			t.Error(err)
		}
		<-handled
		return false
	})
	c, err := accept(t, l)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
}

// A host that connects while Accept waits wakes it (SIGIO), and Close
// ends a wait with net.ErrClosed.
func TestSerialAcceptWaits(t *testing.T) {
	var checked, up atomic.Bool
	l := fakePort(t, func(int32) bool {
		checked.Store(true)
		return up.Load()
	})
	go func() {
		for !checked.Load() {
			time.Sleep(time.Millisecond)
		}
		up.Store(true)
		_ = unix.Kill(os.Getpid(), unix.SIGIO)
	}()
	c, err := accept(t, l)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.Close()

	var idleChecked atomic.Bool
	idle := fakePort(t, func(int32) bool {
		idleChecked.Store(true)
		return false
	})
	go func() {
		for !idleChecked.Load() {
			time.Sleep(time.Millisecond)
		}
		_ = idle.Close()
	}()
	if _, err := accept(t, idle); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept on a closed listener: %v, want net.ErrClosed", err)
	}
}
