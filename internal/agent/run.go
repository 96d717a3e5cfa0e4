package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/smolvm/smolvm/internal/wire"
)

// Main is the agent program: as PID 1 it initialises the guest first, then
// it serves the Agent service on virtio-serial and vsock. As PID 1 it never
// returns: on a fatal error it reports on the console and powers off.
func Main() {
	pid1 := os.Getpid() == 1
	if !pid1 && len(os.Args) == 4 && os.Args[1] == "relay" {
		err := Relay(os.Args[2], os.Args[3])
		fmt.Fprintf(os.Stderr, "smolvm-agent relay: %v\n", err)
		os.Exit(1)
	}
	var log *slog.Logger
	if pid1 {
		ignoreSentSignals()
		log = initSystem()
		switchRootIfAsked(log)                        // a root disk: does not return (see rootfs.go)
		if err := mountHostFolders(log); err != nil { // mount.go
			fmt.Fprintf(os.Stderr, "smolvm-agent: fatal: %v: powering off\n", err)
			log.Error("host folders failed, powering off", "err", err)
			_ = powerOff(false)
			select {}
		}
	} else {
		level := slog.LevelInfo
		if os.Getenv("SMOLVM_DEBUG") != "" {
			level = slog.LevelDebug
		}
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	}
	log.Info("smolvm-agent starting", "version", Version, "pid1", pid1)
	cfg := Config{Logger: log, Reaper: SharedReaper(pid1)}
	if pid1 {
		cfg.PowerOff = powerOff
		cfg.Limits = setupCommandLimits(log)
	}
	err := Run(context.Background(), cfg)
	if !pid1 {
		if err != nil {
			log.Error("agent failed", "err", err)
			os.Exit(1)
		}
		return
	}
	fmt.Fprintf(os.Stderr, "smolvm-agent: fatal: %v: powering off\n", err)
	log.Error("agent failed, powering off", "err", err)
	if perr := powerOff(false); perr != nil {
		log.Error("power off failed", "err", perr)
	}
	select {} // PID 1 must not exit
}

// Run serves the agent on every channel the guest has: vsock when
// /dev/vsock exists, and the virtio-serial port org.smolvm.agent, waited for
// up to PortWaitTimeout. It returns when serving fails on every channel or
// when ctx ends.
func Run(ctx context.Context, cfg Config) error {
	srv, err := NewServer(cfg)
	if err != nil {
		return err
	}
	log := srv.log
	g := NewGRPCServer(srv)
	defer g.Stop()

	type result struct {
		channel string
		err     error
	}
	results := make(chan result, 2)
	running := serveChannels(ctx, log, wire.AgentPortName, wire.AgentVsockPort, func(name string, l net.Listener) error {
		log.Info("serving", "channel", name, "addr", l.Addr().String(), "uptime", uptime())
		return g.Serve(l)
	}, func(name string, err error) { results <- result{name, err} })

	// The fast lane is an addition: the agent serves without it.
	serveChannels(ctx, log, wire.FastPortName, wire.FastVsockPort, func(name string, l net.Listener) error {
		log.Info("serving fast lane", "channel", name, "addr", l.Addr().String())
		context.AfterFunc(ctx, func() { l.Close() })
		for {
			conn, err := l.Accept()
			if err != nil {
				return err
			}
			serve := func() {
				if err := srv.ServeLane(conn); err != nil {
					log.Debug("fast lane connection ended", "channel", name, "err", err)
				}
			}
			if _, serial := l.(*SerialListener); serial {
				serve() // a serial port carries one connection at a time
			} else {
				go serve()
			}
		}
	}, func(name string, err error) { log.Warn("fast lane stopped", "channel", name, "err", err) })

	var errs []error
	for running > 0 {
		select {
		case <-ctx.Done():
			return nil
		case r := <-results:
			running--
			if r.err != nil {
				err := fmt.Errorf("%s: %w", r.channel, r.err)
				errs = append(errs, err)
				if running > 0 {
					log.Warn("channel failed", "err", err)
				}
			}
		}
	}
	if len(errs) == 0 {
		return errors.New("all channels closed")
	}
	return errors.Join(errs...)
}

// serveChannels runs serve on every channel of one service the guest has:
// its vsock port when /dev/vsock exists, and its virtio-serial port, waited
// for up to PortWaitTimeout. Each channel's serve runs on a goroutine of its
// own; ended gets how it ended. It returns how many channels were started.
func serveChannels(ctx context.Context, log *slog.Logger, portName string, vsockPort uint32,
	serve func(name string, l net.Listener) error, ended func(name string, err error)) int {
	n := 0
	if _, err := os.Stat("/dev/vsock"); err == nil {
		if l, err := ListenVsock(vsockPort); err != nil {
			log.Warn("vsock unavailable", "port", vsockPort, "err", err)
		} else {
			n++
			go func() { ended("vsock", serve("vsock", l)) }()
		}
	}
	n++
	go func() {
		p, err := WaitVirtioPort(ctx, log, portName, PortWaitTimeout)
		var l *SerialListener
		if err == nil {
			l, err = ListenSerial(p)
		}
		if err != nil {
			ended("virtio-serial", err)
			return
		}
		ended("virtio-serial", serve("virtio-serial", l))
	}()
	return n
}

// fatalSignals are the signals whose default action ends a process, but
// SIGKILL and SIGSTOP (which the kernel does not deliver to PID 1 from
// another process).
var fatalSignals = []os.Signal{
	syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGILL, syscall.SIGTRAP,
	syscall.SIGABRT, syscall.SIGBUS, syscall.SIGFPE, syscall.SIGUSR1, syscall.SIGSEGV,
	syscall.SIGUSR2, syscall.SIGPIPE, syscall.SIGALRM, syscall.SIGTERM, syscall.SIGSTKFLT,
	syscall.SIGXCPU, syscall.SIGXFSZ, syscall.SIGVTALRM, syscall.SIGIO, syscall.SIGPWR,
	syscall.SIGSYS,
}

// ignoreSentSignals makes PID 1 survive the signals another process (guest
// root) sends it. The kernel delivers to PID 1 only the signals it has a
// handler for, and the Go runtime has one for each, which ends the
// program; a PID 1 that ends panics the kernel. Notify takes them over:
// a signal sent with kill or tgkill, SIGSEGV, SIGBUS and SIGABRT included,
// goes to the channel, which drops it. A real fault of the agent (a
// SIGSEGV the kernel raises) still crashes it visibly: the runtime tells
// the two apart by the signal's code (see os/signal, "Synchronous
// signals"). Children get the default actions back at exec.
//
// The runtime counts only SI_USER and SI_TKILL as sent, though: a fault
// signal queued with rt_sigqueueinfo (SI_QUEUE) would still crash it, so
// guardFaultSignals (sigguard.go) drops those before the runtime sees
// them.
func ignoreSentSignals() {
	if err := guardFaultSignals(); err != nil {
		fmt.Fprintf(os.Stderr, "smolvm-agent: %v: a fault signal queued to PID 1 ends the guest\n", err)
	}
	ignoreSentSignalsWithoutGuard()
}

// ignoreSentSignalsWithoutGuard takes over the signals another process
// sends with kill or tgkill (see ignoreSentSignals).
func ignoreSentSignalsWithoutGuard() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, fatalSignals...)
	go func() {
		for range sigs {
		}
	}()
}
