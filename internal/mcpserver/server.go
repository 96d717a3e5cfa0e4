// Package mcpserver is smolvm's Model Context Protocol server: tools with
// which an agent (Claude, Cursor, any MCP host) creates sandboxes, runs
// commands and moves files in them, built on the official Go SDK
// (github.com/modelcontextprotocol/go-sdk). `smolvm mcp` serves it over
// stdio (RunStdio) and `smolvm serve` over streamable HTTP at /mcp
// (Handler).
//
// Every tool is one call of the smolvm library. Sandboxes made through a
// session are persistent VMs (so that every call, and list_sandboxes, sees
// them) that belong to the session: when it ends (stdio: the client closes
// the pipe or the server is told to stop; HTTP: the client deletes the
// session or it idles past Options.SessionTimeout) the server deletes the
// ones not made with keep:true. run_command without a sandbox boots an
// in-process VM for that one command and deletes it after.
package mcpserver

import (
	"context"
	"crypto/subtle"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm/smolvm"
)

// Defaults of Options.
const (
	DefaultOutputLimit    = 64 << 10
	DefaultTimeout        = 60 * time.Second
	DefaultMaxTimeout     = time.Hour
	DefaultSessionTimeout = 30 * time.Minute
	DefaultMaxFileBytes   = 8 << 20
	// NamePrefix starts the name of every sandbox made through MCP.
	NamePrefix = "mcp-"
)

// Options configure a Server. The zero value works.
type Options struct {
	// Home is the state folder ("" is smolvm's default, $SMOLVM_HOME…).
	Home string
	// OutputLimit caps what run_command returns of each of stdout and
	// stderr (bytes; default 64 KiB); the result says when it cut.
	OutputLimit int
	// DefaultTimeout is run_command's timeout when the call gives none
	// (default 60 s); MaxTimeout the most a call may ask for (default 1 h).
	DefaultTimeout, MaxTimeout time.Duration
	// MaxFileBytes bounds what write_file takes and read_file returns
	// (default 8 MiB).
	MaxFileBytes int
	// ProgressInterval is how often a call that boots a sandbox or runs a
	// command sends a progress notification, when the client asked for
	// them (default 1 s).
	ProgressInterval time.Duration
	// APIKey, when set, is the bearer key Handler requires
	// (Authorization: Bearer KEY), compared in constant time.
	APIKey string
	// SessionTimeout ends an HTTP session idle this long, and deletes its
	// sandboxes (default 30 min).
	SessionTimeout time.Duration
	// SupervisorBinary is the smolvm binary that runs sandboxes'
	// supervisors (see smolvm.Config.SupervisorBinary).
	SupervisorBinary string
	// MaxVMs and MaxMemoryMiB are the host's capacity limits sandboxes
	// are created within (smolvm.Config's fields of those names).
	MaxVMs, MaxMemoryMiB int
	// Logger receives the server's logs (default slog.Default()).
	Logger *slog.Logger
	// Prelaunch keeps a hypervisor started ahead of time for the next
	// one-off run_command (smolvm.Config.Prelaunch): faster one-off runs
	// for an idle QEMU process held by the server.
	Prelaunch bool
}

func (o *Options) setDefaults() {
	if o.OutputLimit <= 0 {
		o.OutputLimit = DefaultOutputLimit
	}
	if o.DefaultTimeout <= 0 {
		o.DefaultTimeout = DefaultTimeout
	}
	if o.MaxTimeout <= 0 {
		o.MaxTimeout = DefaultMaxTimeout
	}
	if o.MaxFileBytes <= 0 {
		o.MaxFileBytes = DefaultMaxFileBytes
	}
	if o.ProgressInterval <= 0 {
		o.ProgressInterval = time.Second
	}
	if o.SessionTimeout <= 0 {
		o.SessionTimeout = DefaultSessionTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Server holds the sandboxes of its sessions. One Server may serve stdio
// and HTTP sessions at once; Close deletes what they made.
type Server struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	owned   map[string]*owned           // sandbox id → who made it
	ended   map[*mcp.ServerSession]bool // sessions whose sandboxes are gone
	watched map[*mcp.ServerSession]bool // sessions with a cleanup waiting on their end
	handles map[string]*smolvm.VM       // open handles, by sandbox id
	cleanup sync.WaitGroup              // session cleanups under way
	h       *smolvm.Host                // the state folder, opened on first use (see host)
}

// host is the server's state folder (Options.Home), opened once: every
// handle of the server shares its store.
func (s *Server) host() (*smolvm.Host, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.h == nil {
		h, err := smolvm.OpenHost(s.opts.Home)
		if err != nil {
			return nil, err
		}
		s.h = h
	}
	return s.h, nil
}

// openIn is Host.Open on the server's state folder.
func (s *Server) openIn(ctx context.Context, ref string) (*smolvm.VM, error) {
	h, err := s.host()
	if err != nil {
		return nil, err
	}
	return h.Open(ctx, ref)
}

// owned is a sandbox made through this server.
type owned struct {
	session *mcp.ServerSession
	keep    bool
}

// New returns a Server.
func New(opts Options) *Server {
	opts.setDefaults()
	return &Server{opts: opts, log: opts.Logger,
		owned: map[string]*owned{}, ended: map[*mcp.ServerSession]bool{},
		watched: map[*mcp.ServerSession]bool{}, handles: map[string]*smolvm.VM{}}
}

// sessionVersions are the protocol versions served: those with an
// initialize handshake and so a session, which sandboxes belong to
// (2026-07-28 has no sessions over HTTP: every request would be one).
var sessionVersions = []string{"2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"}

// MCP returns a new protocol server with smolvm's tools and resources,
// for a transport of the caller's (tests use the SDK's in-memory one).
func (s *Server) MCP() *mcp.Server {
	srv := mcp.NewServer(&mcp.Implementation{Name: "smolvm", Title: "smolvm sandboxes", Version: smolvm.Version},
		&mcp.ServerOptions{
			Instructions: instructions,
			Logger:       s.log,
			// No "logging" capability: logs go to the server's stderr.
			Capabilities:              &mcp.ServerCapabilities{},
			SupportedProtocolVersions: sessionVersions,
		})
	s.addTools(srv)     // tools.go
	s.addResources(srv) // resources.go
	return srv
}

const instructions = `smolvm gives you disposable Linux sandboxes: microVMs with their own kernel that start in about 0.1-1 s. ` +
	`For one command, call run_command without sandbox_id (a fresh sandbox is made and deleted). ` +
	`To keep state between commands, call create_sandbox, then run_command, write_file, read_file and list_files with its sandbox_id, and delete_sandbox when done. ` +
	`Sandboxes you create are deleted when this session ends unless created with keep: true.`

// RunStdio serves one session over r and w (stdin and stdout) until the
// client hangs up or ctx ends, then deletes the session's sandboxes.
func (s *Server) RunStdio(ctx context.Context, r io.ReadCloser, w io.WriteCloser) error {
	ss, err := s.MCP().Connect(ctx, &mcp.IOTransport{Reader: r, Writer: w, MaxLineLength: s.maxMessage()}, nil)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- ss.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = ss.Close()
		if werr := <-done; werr != nil {
			s.log.Debug("stdio session closed", "err", werr)
		}
	}
	s.endSession(ss)
	s.cleanup.Wait()
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) {
		err = nil
	}
	return err
}

// Handler serves MCP over streamable HTTP (mount it at /mcp). With
// Options.APIKey set, every request must carry Authorization: Bearer KEY.
// A session ends when the client deletes it or after
// Options.SessionTimeout without requests; its sandboxes go with it.
func (s *Server) Handler() http.Handler {
	srv := s.MCP()
	h := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return srv },
		&mcp.StreamableHTTPOptions{SessionTimeout: s.opts.SessionTimeout, Logger: s.log, MaxRequestBodyBytes: int64(s.maxMessage())})
	if s.opts.APIKey == "" {
		return h
	}
	key := []byte(s.opts.APIKey)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), key) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="smolvm"`)
			http.Error(w, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server was started with", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// maxMessage bounds a message from the client: a write_file of
// MaxFileBytes in base64, and room for the rest.
func (s *Server) maxMessage() int { return s.opts.MaxFileBytes/3*4 + 1<<20 }

// HTTPHandler is New(opts).Handler(), for a caller that never needs Close.
func HTTPHandler(opts Options) http.Handler { return New(opts).Handler() }

// Close deletes every sandbox made through s that was not made with keep,
// whatever its session, and waits for cleanups under way.
func (s *Server) Close() error {
	s.mu.Lock()
	var ids []string
	for id, o := range s.owned {
		if !o.keep {
			ids = append(ids, id)
		}
		delete(s.owned, id)
	}
	s.mu.Unlock()
	err := s.deleteAll(ids)
	s.cleanup.Wait()
	if s.opts.Prelaunch {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err = errors.Join(err, smolvm.DiscardPrelaunched(ctx))
		cancel()
	}
	s.mu.Lock()
	for id, vm := range s.handles {
		_ = vm.Close()
		delete(s.handles, id)
	}
	if s.h != nil {
		err = errors.Join(err, s.h.Close())
		s.h = nil
	}
	s.mu.Unlock()
	return err
}

// closeLater closes (and so deletes) a one-off sandbox in the background.
func (s *Server) closeLater(vm *smolvm.VM) {
	s.cleanup.Add(1)
	go func() {
		defer s.cleanup.Done()
		if err := vm.Close(); err != nil {
			s.log.Error("delete a one-off sandbox", "sandbox", vm.ID(), "err", err)
		}
	}()
}

// own records a sandbox made by session ss. It reports false when the
// session has already ended: the caller deletes the sandbox.
func (s *Server) own(ss *mcp.ServerSession, id string, keep bool, vm *smolvm.VM) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended[ss] && !keep {
		return false
	}
	s.owned[id] = &owned{session: ss, keep: keep}
	s.handles[id] = vm
	if !s.watched[ss] && !s.ended[ss] {
		s.watched[ss] = true
		s.cleanup.Add(1)
		go func() {
			defer s.cleanup.Done()
			_ = ss.Wait()
			s.endSession(ss)
		}()
	}
	return true
}

// endSession deletes the sandboxes session ss made without keep.
func (s *Server) endSession(ss *mcp.ServerSession) {
	s.mu.Lock()
	if s.ended[ss] {
		s.mu.Unlock()
		return
	}
	s.ended[ss] = true
	delete(s.watched, ss)
	var ids []string
	for id, o := range s.owned {
		if o.session == ss {
			if !o.keep {
				ids = append(ids, id)
			}
			delete(s.owned, id)
		}
	}
	s.mu.Unlock()
	// A create under way when the session ended finds it here (and
	// deletes its sandbox); after that the session is forgotten.
	time.AfterFunc(10*time.Minute, func() {
		s.mu.Lock()
		delete(s.ended, ss)
		s.mu.Unlock()
	})
	if len(ids) > 0 {
		s.log.Info("mcp session ended: deleting its sandboxes", "session", ss.ID(), "sandboxes", ids)
	}
	if err := s.deleteAll(ids); err != nil {
		s.log.Error("delete a session's sandboxes", "err", err)
	}
}

// deleteAll deletes sandboxes by id with a context of its own (the
// session's is gone).
func (s *Server) deleteAll(ids []string) error {
	var errs []error
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := s.deleteSandbox(ctx, id); err != nil && !errors.Is(err, smolvm.ErrNotFound) {
			errs = append(errs, err)
		}
		cancel()
	}
	return errors.Join(errs...)
}

// deleteSandbox deletes one sandbox and forgets it.
func (s *Server) deleteSandbox(ctx context.Context, ref string) error {
	vm, err := s.open(ctx, ref)
	if err != nil {
		return err
	}
	err = vm.Delete(ctx)
	s.mu.Lock()
	delete(s.owned, vm.ID())
	delete(s.handles, vm.ID())
	s.mu.Unlock()
	_ = vm.Close()
	if err != nil && s.gone(ctx, vm.ID()) {
		return nil // deleted meanwhile (by another call, or on the host)
	}
	return err
}

// gone reports whether sandbox id no longer exists.
func (s *Server) gone(ctx context.Context, id string) bool {
	vm, err := s.openIn(ctx, id)
	if err == nil {
		_ = vm.Close()
	}
	return errors.Is(err, smolvm.ErrNotFound)
}

// open returns a handle on a sandbox by id or name, reusing an open one.
func (s *Server) open(ctx context.Context, ref string) (*smolvm.VM, error) {
	s.mu.Lock()
	for id, vm := range s.handles {
		if id == ref || vm.Name() == ref {
			s.mu.Unlock()
			return vm, nil
		}
	}
	s.mu.Unlock()
	vm, err := s.openIn(ctx, ref)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.handles[vm.ID()]; ok {
		_ = vm.Close()
		return old, nil
	}
	s.handles[vm.ID()] = vm
	return vm, nil
}

// forget drops the open handle of a sandbox (after an error that may mean
// it is gone or changed), so the next call opens it afresh.
func (s *Server) forget(vm *smolvm.VM) {
	s.mu.Lock()
	if s.handles[vm.ID()] == vm {
		delete(s.handles, vm.ID())
		s.mu.Unlock()
		_ = vm.Close()
		return
	}
	s.mu.Unlock()
}

// ownedBy reports whether sandbox id was made by session ss, and with keep.
func (s *Server) ownedBy(id string) (ss *mcp.ServerSession, keep, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.owned[id]
	if !ok {
		return nil, false, false
	}
	return o.session, o.keep, true
}
