package agent

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// relayMaxConns bounds the connections a relay serves at once.
const relayMaxConns = 64

// Relay is `smolvm-agent relay LISTEN TARGET`: it accepts TCP connections
// on LISTEN and joins each to a new connection to TARGET, until it is
// killed (it returns only on an error). The browser sandbox uses it to offer Chromium's DevTools, which
// listen on the guest's loopback only, on the guest's address, where the
// host's port forward reaches (the agent binary is in every guest, at
// /proc/1/exe).
func Relay(listen, target string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	return relay(ln, target)
}

func relay(ln net.Listener, target string) error {
	slots := make(chan struct{}, relayMaxConns)
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		slots <- struct{}{}
		go func() {
			defer func() { <-slots }()
			relayConn(c, target)
		}()
	}
}

func relayConn(c net.Conn, target string) {
	defer c.Close()
	t, err := net.DialTimeout("tcp", target, 10*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "relay: %v\n", err)
		return
	}
	defer t.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	half := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}
	go half(t, c)
	go half(c, t)
	wg.Wait()
}
