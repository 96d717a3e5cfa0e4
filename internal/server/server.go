// Package server is `smolvm serve`: one HTTP listener with the native /v1
// API over a sandbox registry (registry.go), and a mux where the other
// APIs (E2B-compatible, MCP) are mounted with Handle. Handlers keep no
// state of their own: every request goes through the registry, and
// sandbox ids are global, so a front door can route to any server by id.
package server

import (
	"context"
	"crypto/subtle"
	"log/slog"
	"net/http"
	"sync"
	"time"
)

// Options configure a Server.
type Options struct {
	// Home is the state folder (default smolvm.Home()).
	Home string
	// Listen is the address `smolvm serve` listens on (information for
	// the handlers; the caller owns the listener).
	Listen string
	// APIKey, when set, is required on every API call (Authorization:
	// Bearer KEY on /v1); "" accepts any caller.
	APIKey string
	// DefaultTimeout is a sandbox's timeout when its creation gives none
	// (0: sandboxes never expire unless told).
	DefaultTimeout time.Duration
	// MaxSandboxes bounds the sandboxes of this server (0: only the
	// host's capacity bounds them).
	MaxSandboxes int
	// MaxVMs and MaxMemoryMiB are the host's capacity limits this
	// server's sandboxes are created within (smolvm.Config's fields of
	// those names: 0 leaves them to $SMOLVM_MAX_VMS and
	// $SMOLVM_MAX_MEMORY_MIB, the host's settings or the default; -1 is
	// no limit).
	MaxVMs, MaxMemoryMiB int
	// MaxUploadBytes bounds one file or archive upload (0: 8 GiB).
	MaxUploadBytes int64
	// AllowMounts are the host folders under which a sandbox may mount
	// host folders (--allow-mount); none refuses every mount.
	AllowMounts []string
	// AllowHostLoopback lets a sandbox's hosts map a name to the host's
	// loopback (--allow-host-loopback); refused otherwise (400), as
	// mounts are without --allow-mount.
	AllowHostLoopback bool
	Logger            *slog.Logger
}

// Server serves the APIs over one registry.
type Server struct {
	opts Options
	reg  *Registry
	// allowMounts are Options.AllowMounts resolved (v1_mounts.go).
	allowMounts []string
	mux         *http.ServeMux
	log         *slog.Logger
	// ctx ends at Shutdown: streams watch it to end cleanly.
	ctx    context.Context
	cancel context.CancelFunc
	// streams are the WebSocket streams running, which Shutdown lets
	// close (1001) before it returns: their connections are hijacked, so
	// http.Server.Shutdown does not wait for them.
	streams streamSet
}

// streamWait bounds how long Shutdown waits for the streams to close.
const streamWait = 10 * time.Second

// streamSet counts running streams and tells a waiter when none is left.
type streamSet struct {
	mu   sync.Mutex
	n    int
	idle chan struct{} // closed when n falls to 0 while someone waits
}

func (s *streamSet) add() {
	s.mu.Lock()
	s.n++
	s.mu.Unlock()
}

func (s *streamSet) done() {
	s.mu.Lock()
	s.n--
	if s.n == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
	s.mu.Unlock()
}

// wait returns once no stream runs, or after d.
func (s *streamSet) wait(d time.Duration) {
	s.mu.Lock()
	if s.n == 0 {
		s.mu.Unlock()
		return
	}
	if s.idle == nil {
		s.idle = make(chan struct{})
	}
	idle := s.idle
	s.mu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-idle:
	case <-t.C:
	}
}

// New opens the registry of opts.Home (reconciling it with the VMs there)
// and makes the server's handler.
func New(opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxUploadBytes == 0 {
		opts.MaxUploadBytes = 8 << 30
	}
	allow, err := allowedDirs(opts.AllowMounts)
	if err != nil {
		return nil, err
	}
	reg, err := NewRegistry(context.Background(), RegistryOptions{Home: opts.Home, DefaultTimeout: opts.DefaultTimeout,
		MaxSandboxes: opts.MaxSandboxes, MaxVMs: opts.MaxVMs, MaxMemoryMiB: opts.MaxMemoryMiB, Logger: opts.Logger})
	if err != nil {
		return nil, err
	}
	s := &Server{opts: opts, reg: reg, mux: http.NewServeMux(), log: opts.Logger, allowMounts: allow}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.routes()
	return s, nil
}

// Registry is the server's sandbox registry.
func (s *Server) Registry() *Registry { return s.reg }

// Handler serves every API the server has. Without an API key it answers
// only requests to a loopback name from no web page but a loopback one
// (LocalOnly).
func (s *Server) Handler() http.Handler {
	if s.opts.APIKey == "" {
		return LocalOnly(s.mux)
	}
	return s.mux
}

// Handle mounts another API on the server's mux (ServeMux patterns). The
// handler checks the key itself (KeyOK), in its own API's way.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// KeyOK tells whether key is the server's API key (compared in constant
// time); any key is accepted when the server has none.
func (s *Server) KeyOK(key string) bool {
	if s.opts.APIKey == "" {
		return true
	}
	return subtle.ConstantTimeCompare([]byte(key), []byte(s.opts.APIKey)) == 1
}

// Done is closed when the server shuts down: long-lived handlers
// (streams) end cleanly when it is.
func (s *Server) Done() <-chan struct{} { return s.ctx.Done() }

// StopStreams ends the streams (Done) cleanly: the WebSocket ones close
// with 1001 (going away). http.Server.RegisterOnShutdown takes it: the
// server's Shutdown does not wait for hijacked connections.
func (s *Server) StopStreams() { s.cancel() }

// Shutdown ends the streams and closes the registry; the sandboxes keep
// running for the next server. Call it after http.Server.Shutdown
// returned (no request uses the registry any more).
func (s *Server) Shutdown() error {
	s.cancel()
	s.streams.wait(streamWait) // each closes with 1001 before the process may exit
	return s.reg.Close()
}
