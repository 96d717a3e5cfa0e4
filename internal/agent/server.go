// Package agent is the guest side of smolvm: the program that runs as PID 1
// inside a sandbox and serves the Agent gRPC service (internal/proto/agentpb)
// to the host over virtio-serial or vsock.
//
// It mounts the pseudo filesystems, reaps zombies, runs commands (pipes or a
// PTY, signals, timeouts), moves files and tar archives, keeps the sandbox
// environment and powers the VM off. Everything that arrives over the channel
// is treated as untrusted input.
package agent

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/wire"
)

// Version is the agent's version, set at build time with
// -ldflags "-X github.com/smolvm/smolvm/internal/agent.Version=...".
var Version = "dev"

// ProtocolVersion is the version of the host/guest protocol this agent speaks.
const ProtocolVersion = 1

// MaxMessageSize bounds every gRPC message the agent receives.
const MaxMessageSize = 4 << 20

// Default file locations inside the guest.
const (
	DefaultEnvFile       = "/etc/smolvm/env"
	DefaultProfileFile   = "/etc/profile.d/smolvm-env.sh"
	DefaultMachineIDFile = "/etc/machine-id"
	DefaultModulesFile   = wire.ModulesPath
	DefaultDir           = "/root"
	DefaultPath          = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// Config configures a Server. Zero fields take the guest defaults.
type Config struct {
	EnvFile       string // sandbox environment, KEY=VALUE lines
	ProfileFile   string // shell profile snippet exporting the sandbox env
	MachineIDFile string // written by Refresh
	DefaultDir    string // working directory when ExecStart.dir is empty
	// ImageConfigFile is the image's run config (wire.ImageConfigPath).
	ImageConfigFile string
	Logger          *slog.Logger
	// Reaper collects child exit statuses; nil means SharedReaper(pid == 1).
	Reaper *Reaper
	// PowerOff is called by Shutdown after the reply has been sent. Nil makes
	// Shutdown fail with FailedPrecondition (e.g. in tests).
	PowerOff func(reboot bool) error
	// Limits keep the commands from starving the agent (cgroup.go); nil
	// starts them like any child.
	Limits *CommandLimits
}

// Server implements agentpb.AgentServer.
type Server struct {
	agentpb.UnimplementedAgentServer

	cfg    Config
	log    *slog.Logger
	reaper *Reaper

	envMu sync.Mutex
	env   []envVar

	// The image's run config (nil: none), or why it could not be read.
	image    *wire.ImageConfig
	imageErr error
}

// NewServer returns a Server and loads the sandbox environment.
func NewServer(cfg Config) (*Server, error) {
	if cfg.EnvFile == "" {
		cfg.EnvFile = DefaultEnvFile
	}
	if cfg.ProfileFile == "" {
		cfg.ProfileFile = DefaultProfileFile
	}
	if cfg.MachineIDFile == "" {
		cfg.MachineIDFile = DefaultMachineIDFile
	}
	if cfg.DefaultDir == "" {
		cfg.DefaultDir = DefaultDir
	}
	if cfg.ImageConfigFile == "" {
		cfg.ImageConfigFile = wire.ImageConfigPath
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Reaper == nil {
		cfg.Reaper = SharedReaper(os.Getpid() == 1)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, reaper: cfg.Reaper}
	env, err := loadEnvFile(cfg.EnvFile)
	if err != nil {
		return nil, err
	}
	s.env = env
	if s.image, s.imageErr = loadImageConfig(cfg.ImageConfigFile); s.imageErr != nil {
		s.log.Warn("image config", "err", s.imageErr)
	}
	return s, nil
}

// NewGRPCServer returns a gRPC server with the agent service registered and
// message sizes bounded.
func NewGRPCServer(s *Server) *grpc.Server {
	g := grpc.NewServer(
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.MaxSendMsgSize(MaxMessageSize),
		// Fixed flow-control windows, as the host sets on its side: with
		// the default (dynamic) ones the transport answers received data
		// with bandwidth-probe pings, an extra round of guest work per
		// call that costs more than the call itself under emulation.
		grpc.InitialWindowSize(1<<20), grpc.InitialConnWindowSize(4<<20),
		// Let the host probe the channel with keepalive pings as often as
		// once a second, even when idle, without being sent a GOAWAY.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             time.Second,
			PermitWithoutStream: true,
		}),
	)
	agentpb.RegisterAgentServer(g, s)
	return g
}

// Ping reports versions, uptime and the guest clock.
func (s *Server) Ping(context.Context, *agentpb.PingRequest) (*agentpb.PingResponse, error) {
	resp := &agentpb.PingResponse{
		AgentVersion:    Version,
		ProtocolVersion: ProtocolVersion,
		TimeUnixNs:      time.Now().UnixNano(),
		UptimeNs:        int64(uptime()),
	}
	// One uname call gives both the hostname and the kernel release.
	var uts unix.Utsname
	if _, _, errno := unix.RawSyscall(unix.SYS_UNAME, uintptr(unsafe.Pointer(&uts)), 0, 0); errno == 0 {
		resp.Hostname = unix.ByteSliceToString(uts.Nodename[:])
		resp.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	return resp, nil
}

// Shutdown syncs the disks and powers off (or reboots) once the reply is out.
func (s *Server) Shutdown(_ context.Context, req *agentpb.ShutdownRequest) (*agentpb.ShutdownResponse, error) {
	if s.cfg.PowerOff == nil {
		return nil, status.Error(codes.FailedPrecondition, "shutdown is not available: the agent is not the guest's init")
	}
	unix.Sync()
	reboot := req.GetReboot()
	go func() {
		// The reply is queued when the handler returns; give the transport a
		// moment to write it before the machine goes away.
		time.Sleep(100 * time.Millisecond)
		unix.Sync()
		if err := s.cfg.PowerOff(reboot); err != nil {
			s.log.Error("power off failed", "err", err)
		}
	}()
	return &agentpb.ShutdownResponse{}, nil
}

// Stat describes a path without following a final symlink.
func (s *Server) Stat(_ context.Context, req *agentpb.StatRequest) (*agentpb.StatResponse, error) {
	p, err := cleanPath(req.GetPath())
	if err != nil {
		return nil, err
	}
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR) {
		return &agentpb.StatResponse{Exists: false}, nil
	}
	if err != nil {
		return nil, fsError("stat", p, err)
	}
	return statResponse(p, fi, &accountNames{}), nil
}

// cleanPath validates a path from the host: non-empty, absolute, no NUL.
// It returns the cleaned path.
func cleanPath(p string) (string, error) {
	if p == "" {
		return "", status.Error(codes.InvalidArgument, "path is empty")
	}
	for i := 0; i < len(p); i++ {
		if p[i] == 0 {
			return "", status.Errorf(codes.InvalidArgument, "path %q contains a NUL byte", p)
		}
	}
	if !filepath.IsAbs(p) {
		return "", status.Errorf(codes.InvalidArgument, "path %q is not absolute", p)
	}
	return filepath.Clean(p), nil
}

// fsError maps a file system error to a gRPC status with a helpful message.
func fsError(op, p string, err error) error {
	var code codes.Code
	switch {
	case errors.Is(err, fs.ErrNotExist):
		code = codes.NotFound
	case errors.Is(err, fs.ErrPermission):
		code = codes.PermissionDenied
	case errors.Is(err, fs.ErrExist), errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.EISDIR),
		errors.Is(err, unix.ENOTEMPTY), errors.Is(err, unix.ELOOP):
		code = codes.FailedPrecondition
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		code = codes.ResourceExhausted
	default:
		code = codes.Internal
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return status.Errorf(code, "%s %s: %v", op, p, err)
}
