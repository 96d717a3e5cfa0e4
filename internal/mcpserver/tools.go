package mcpserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm/smolvm"
)

// The tools' inputs and outputs. Field descriptions (the jsonschema tags)
// are what a model reads.

type createInput struct {
	Image        string            `json:"image,omitempty" jsonschema:"disk image name (see 'smolvm image ls' on the host, e.g. one built with 'smolvm image build python'); empty for the default image (busybox tools, fastest start, no package manager)"`
	Snapshot     string            `json:"snapshot,omitempty" jsonschema:"start from this snapshot (made with snapshot_sandbox) instead of an image: files, processes and memory as they were"`
	CPUs         int               `json:"cpus,omitempty" jsonschema:"virtual CPUs (default 1)"`
	MemoryMiB    int               `json:"memory_mib,omitempty" jsonschema:"memory in MiB (default 512, at least 64)"`
	Env          map[string]string `json:"env,omitempty" jsonschema:"environment variables every command in the sandbox sees"`
	Network      string            `json:"network,omitempty" jsonschema:"'user' (default: NAT to the internet) or 'none' (no network at all)"`
	Egress       string            `json:"egress,omitempty" jsonschema:"what the sandbox may reach: 'open' (default: the internet, not the host), 'off' (nothing) or 'allowlist' (only allow_domains and allow_cidrs)"`
	AllowDomains []string          `json:"allow_domains,omitempty" jsonschema:"with egress 'allowlist': domain names (and their subdomains) the sandbox may resolve and connect to"`
	AllowCIDRs   []string          `json:"allow_cidrs,omitempty" jsonschema:"with egress 'allowlist': networks (e.g. 203.0.113.0/24) the sandbox may connect to"`
	Keep         bool              `json:"keep,omitempty" jsonschema:"keep the sandbox after this session ends (default false: it is deleted with the session)"`
}

type sandboxOutput struct {
	SandboxID string    `json:"sandbox_id" jsonschema:"pass this to the other tools"`
	Name      string    `json:"name"`
	State     string    `json:"state" jsonschema:"running, paused, stopped or failed"`
	Image     string    `json:"image"`
	Snapshot  string    `json:"snapshot,omitempty"`
	CPUs      int       `json:"cpus"`
	MemoryMiB int       `json:"memory_mib"`
	Created   time.Time `json:"created"`
	// Session: made in this session and deleted when it ends.
	Session bool `json:"session" jsonschema:"made in this session and deleted when it ends (false: kept, or made elsewhere)"`
	MCP     bool `json:"mcp" jsonschema:"made through MCP (only those can be deleted with delete_sandbox)"`
	Keep    bool `json:"keep" jsonschema:"made through MCP with keep: true"`
}

type createOutput struct {
	sandboxOutput
	BootMS int64 `json:"boot_ms" jsonschema:"how long the sandbox took to start"`
}

type runInput struct {
	SandboxID string            `json:"sandbox_id,omitempty" jsonschema:"sandbox to run in (from create_sandbox); omit it to run in a fresh sandbox that is deleted after the command"`
	Command   string            `json:"command" jsonschema:"shell command line, run with /bin/sh -c"`
	Cwd       string            `json:"cwd,omitempty" jsonschema:"absolute working directory (default /root)"`
	Env       map[string]string `json:"env,omitempty" jsonschema:"environment variables for this command"`
	Stdin     string            `json:"stdin,omitempty" jsonschema:"text fed to the command's standard input"`
	TimeoutS  int               `json:"timeout_s,omitempty" jsonschema:"seconds before the command is killed (default 60)"`
}

type runOutput struct {
	SandboxID  string `json:"sandbox_id,omitempty" jsonschema:"the sandbox it ran in (absent for a one-off sandbox, which is gone)"`
	Stdout     string `json:"stdout"`
	Stderr     string `json:"stderr"`
	ExitCode   int    `json:"exit_code" jsonschema:"the command's exit status; -1 when it was killed (timeout or signal)"`
	TimedOut   bool   `json:"timed_out"`
	Truncated  bool   `json:"truncated" jsonschema:"stdout or stderr passed the server's limit and was cut"`
	DurationMS int64  `json:"duration_ms" jsonschema:"the call's duration, a one-off sandbox's start included"`
}

type writeInput struct {
	SandboxID string `json:"sandbox_id"`
	Path      string `json:"path" jsonschema:"absolute path in the sandbox; missing parent folders are made"`
	Content   string `json:"content"`
	Encoding  string `json:"encoding,omitempty" jsonschema:"'utf8' (default) or 'base64' for binary content"`
}

type writeOutput struct {
	Path  string `json:"path"`
	Bytes int64  `json:"bytes" jsonschema:"bytes written"`
}

type readInput struct {
	SandboxID string `json:"sandbox_id"`
	Path      string `json:"path" jsonschema:"absolute path of a file in the sandbox"`
	Encoding  string `json:"encoding,omitempty" jsonschema:"'utf8' (default; a file that is not valid UTF-8 comes back as base64) or 'base64'"`
}

type readOutput struct {
	Path     string `json:"path"`
	Content  string `json:"content"`
	Encoding string `json:"encoding" jsonschema:"how content is encoded: utf8 or base64"`
	Size     int64  `json:"size"`
}

type listFilesInput struct {
	SandboxID string `json:"sandbox_id"`
	Path      string `json:"path,omitempty" jsonschema:"absolute folder path in the sandbox (default /root)"`
}

type fileEntry struct {
	Name     string    `json:"name"`
	Type     string    `json:"type" jsonschema:"file, dir, symlink or other"`
	Size     int64     `json:"size"`
	Mode     string    `json:"mode"`
	Modified time.Time `json:"modified"`
	Target   string    `json:"target,omitempty" jsonschema:"a symlink's target"`
}

type listFilesOutput struct {
	Path      string      `json:"path"`
	Entries   []fileEntry `json:"entries"`
	Truncated bool        `json:"truncated" jsonschema:"the folder has more entries than were returned"`
}

type sandboxRef struct {
	SandboxID string `json:"sandbox_id"`
}

type listOutput struct {
	Sandboxes []sandboxOutput `json:"sandboxes"`
}

type deleteOutput struct {
	SandboxID string `json:"sandbox_id"`
	Deleted   bool   `json:"deleted"`
}

type exposeInput struct {
	SandboxID string `json:"sandbox_id"`
	Port      int    `json:"port" jsonschema:"TCP port a server listens on inside the sandbox (it must listen on 0.0.0.0)"`
}

type exposeOutput struct {
	URL       string `json:"url" jsonschema:"http URL on the host that reaches the port"`
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

type snapshotInput struct {
	SandboxID string `json:"sandbox_id"`
	Name      string `json:"name" jsonschema:"snapshot name (letters, digits, '_', '.', '-'), unique on the host"`
}

type snapshotOutput struct {
	Snapshot  string    `json:"snapshot" jsonschema:"pass it to create_sandbox as snapshot"`
	SandboxID string    `json:"sandbox_id"`
	Created   time.Time `json:"created"`
	MemoryMiB int       `json:"memory_mib"`
	CPUs      int       `json:"cpus"`
}

func (s *Server) addTools(srv *mcp.Server) {
	idem, destructive := true, true
	mcp.AddTool(srv, &mcp.Tool{Name: "create_sandbox", Title: "Create a sandbox",
		Description: "Start a new Linux sandbox (a microVM with its own kernel, root inside it) and return its sandbox_id; it starts in about 0.1-1 s. " +
			"Use it when you need state across commands (files, installed packages, running servers); for a single command call run_command without sandbox_id instead. " +
			"The sandbox is deleted when this session ends unless keep is true. Next: run_command, write_file, read_file, list_files, expose_port with the sandbox_id; delete_sandbox when done."},
		s.createSandbox)
	mcp.AddTool(srv, &mcp.Tool{Name: "run_command", Title: "Run a shell command",
		Description: fmt.Sprintf("Run a shell command (/bin/sh -c) in a sandbox and return its stdout, stderr and exit_code. "+
			"Without sandbox_id it runs in a fresh sandbox that is deleted afterwards (nothing persists). "+
			"Each of stdout and stderr keeps its first %d KiB (truncated says when output was cut: redirect big output to a file and read parts of it). "+
			"The command is killed after timeout_s (default %d s, at most %d s): start long-running servers in the background (nohup CMD >/tmp/log 2>&1 &). "+
			"A non-zero exit_code is a normal result, not an error.",
			s.opts.OutputLimit>>10, int(s.opts.DefaultTimeout.Seconds()), int(s.opts.MaxTimeout.Seconds()))},
		s.runCommand)
	mcp.AddTool(srv, &mcp.Tool{Name: "write_file", Title: "Write a file",
		Description: fmt.Sprintf("Write a file in a sandbox (replacing it if it exists; missing parent folders are made). Content is text, or base64 with encoding 'base64'; at most %d MiB.", s.opts.MaxFileBytes>>20),
		Annotations: &mcp.ToolAnnotations{IdempotentHint: true}},
		s.writeFile)
	mcp.AddTool(srv, &mcp.Tool{Name: "read_file", Title: "Read a file",
		Description: fmt.Sprintf("Read a file from a sandbox. Text comes back as is, a file that is not UTF-8 as base64 (encoding says which). Files over %d MiB are refused: read parts with run_command (head -c, tail, sed -n).", s.opts.MaxFileBytes>>20),
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true}},
		s.readFile)
	mcp.AddTool(srv, &mcp.Tool{Name: "list_files", Title: "List a folder",
		Description: "List a folder in a sandbox: name, type, size, mode and modification time of each entry (at most 1000).",
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true}},
		s.listFiles)
	mcp.AddTool(srv, &mcp.Tool{Name: "list_sandboxes", Title: "List sandboxes",
		Description: "List the sandboxes on this host with their sandbox_id, state and whether this session made them (those are deleted when it ends).",
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true}},
		s.listSandboxes)
	mcp.AddTool(srv, &mcp.Tool{Name: "delete_sandbox", Title: "Delete a sandbox",
		Description: "Delete a sandbox made through MCP and everything in it (files, processes, open ports). It cannot be undone; snapshots made from it stay.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &destructive, IdempotentHint: idem}},
		s.deleteSandboxTool)
	mcp.AddTool(srv, &mcp.Tool{Name: "expose_port", Title: "Expose a port",
		Description: "Make a TCP port of a sandbox reachable from the host and return its URL (e.g. to check a web server you started there with curl from the host, or to give the user a link). The server in the sandbox must listen on 0.0.0.0, not 127.0.0.1. The port stays open until the sandbox is deleted."},
		s.exposePort)
	mcp.AddTool(srv, &mcp.Tool{Name: "snapshot_sandbox", Title: "Snapshot a sandbox",
		Description: "Save a running sandbox (memory, processes and files) under a name; create_sandbox with snapshot: NAME then starts any number of copies of it, e.g. after a slow setup (packages installed, data loaded). The sandbox goes on running. Snapshots stay until removed on the host ('smolvm snapshot rm NAME')."},
		s.snapshotSandbox)
}

// newName is the name of a sandbox made through MCP.
func newName() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return NamePrefix + hex.EncodeToString(b)
}

func (s *Server) createSandbox(ctx context.Context, req *mcp.CallToolRequest, in createInput) (*mcp.CallToolResult, *createOutput, error) {
	t0 := time.Now()
	cfg := s.config()
	cfg.Name, cfg.Persistent = newName(), true
	cfg.Image, cfg.VCPUs, cfg.MemoryMiB = in.Image, in.CPUs, in.MemoryMiB
	if err := setNetwork(&cfg, in); err != nil {
		return nil, nil, err
	}
	stop := s.progress(ctx, req, func(el time.Duration) string { return fmt.Sprintf("starting the sandbox (%.0f s)", el.Seconds()) })
	var vm *smolvm.VM
	var err error
	if in.Snapshot != "" {
		vm, err = smolvm.Restore(ctx, in.Snapshot, cfg)
	} else {
		vm, err = smolvm.New(ctx, cfg)
	}
	stop()
	if err != nil {
		return nil, nil, createErr(err, in)
	}
	if !s.own(req.Session, vm.ID(), in.Keep, vm) {
		_ = vm.Delete(context.WithoutCancel(ctx))
		_ = vm.Close()
		return nil, nil, errors.New("the session ended while the sandbox started: it was deleted")
	}
	if len(in.Env) > 0 {
		if err := vm.SetEnv(ctx, in.Env); err != nil {
			_ = s.deleteSandbox(context.WithoutCancel(ctx), vm.ID())
			return nil, nil, fmt.Errorf("set the sandbox's environment: %w (the sandbox was deleted; fix env and call create_sandbox again)", err)
		}
	}
	info, err := vm.Info(ctx)
	if err != nil {
		return nil, nil, err
	}
	out := &createOutput{sandboxOutput: s.describe(info), BootMS: time.Since(t0).Milliseconds()}
	return nil, out, nil
}

// config is the smolvm configuration every sandbox starts from.
func (s *Server) config() smolvm.Config {
	return smolvm.Config{Home: s.opts.Home, SupervisorBinary: s.opts.SupervisorBinary, Logger: s.log,
		MaxVMs: s.opts.MaxVMs, MaxMemoryMiB: s.opts.MaxMemoryMiB}
}

func setNetwork(cfg *smolvm.Config, in createInput) error {
	switch in.Network {
	case "", "user", "none":
		cfg.Network = in.Network
	default:
		return fmt.Errorf("network %q: use 'user' (NAT to the internet) or 'none'", in.Network)
	}
	switch in.Egress {
	case "", "open", "off", "allowlist":
	default:
		return fmt.Errorf("egress %q: use 'open', 'off' or 'allowlist'", in.Egress)
	}
	if in.Egress != "allowlist" && len(in.AllowDomains)+len(in.AllowCIDRs) > 0 {
		return errors.New("allow_domains and allow_cidrs need egress 'allowlist'")
	}
	cfg.Egress = smolvm.Egress{Mode: in.Egress, AllowDomains: in.AllowDomains, AllowCIDRs: in.AllowCIDRs}
	return nil
}

// createErr says what to do about a sandbox that did not start.
func createErr(err error, in createInput) error {
	switch {
	case errors.Is(err, smolvm.ErrCapacity):
		return fmt.Errorf("%w (delete sandboxes you no longer need with delete_sandbox; list_sandboxes shows them)", err)
	case in.Snapshot != "" && errors.Is(err, smolvm.ErrNotFound):
		return fmt.Errorf("no snapshot %q: make one with snapshot_sandbox, or leave snapshot empty (%w)", in.Snapshot, err)
	case in.Image != "" && errors.Is(err, smolvm.ErrNotFound):
		return fmt.Errorf("no image %q on this host: leave image empty for the default one, or ask the user to build or pull it ('smolvm image build', 'smolvm image pull') (%w)", in.Image, err)
	}
	return fmt.Errorf("create the sandbox: %w", err)
}

// sandbox opens the sandbox a call names, with an error a model can act on.
func (s *Server) sandbox(ctx context.Context, id string) (*smolvm.VM, error) {
	if id == "" {
		return nil, errors.New("sandbox_id is required: create a sandbox with create_sandbox, or see list_sandboxes")
	}
	vm, err := s.open(ctx, id)
	if errors.Is(err, smolvm.ErrNotFound) || errors.Is(err, smolvm.ErrInvalid) {
		return nil, fmt.Errorf("no sandbox %q: it was deleted or never existed; call list_sandboxes for the ids, or create_sandbox for a new one", id)
	}
	if err != nil {
		return nil, fmt.Errorf("sandbox %q: %w", id, err)
	}
	return vm, nil
}

// callErr turns a failed call into a sandbox into a message that says what
// to do, and drops a handle the failure may have made stale.
func (s *Server) callErr(vm *smolvm.VM, what string, err error) error {
	switch {
	case errors.Is(err, smolvm.ErrNotRunning):
		return fmt.Errorf("%s: sandbox %s is not running (%w): delete it and create a new one", what, vm.ID(), err)
	case errors.Is(err, smolvm.ErrNotFound) && !errors.Is(err, fs.ErrNotExist):
		s.forget(vm)
		return fmt.Errorf("%s: sandbox %s no longer exists: call create_sandbox for a new one", what, vm.ID())
	case errors.Is(err, smolvm.ErrUnavailable):
		s.forget(vm)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (s *Server) runCommand(ctx context.Context, req *mcp.CallToolRequest, in runInput) (*mcp.CallToolResult, *runOutput, error) {
	t0 := time.Now()
	if strings.TrimSpace(in.Command) == "" {
		return nil, nil, errors.New("command is empty: give a shell command line, e.g. 'ls -la /'")
	}
	timeout := s.opts.DefaultTimeout
	if in.TimeoutS < 0 || time.Duration(in.TimeoutS)*time.Second > s.opts.MaxTimeout {
		return nil, nil, fmt.Errorf("timeout_s %d: give 1 to %d seconds (0 or none: %d)", in.TimeoutS, int(s.opts.MaxTimeout.Seconds()), int(timeout.Seconds()))
	}
	if in.TimeoutS > 0 {
		timeout = time.Duration(in.TimeoutS) * time.Second
	}
	if in.Cwd != "" && !strings.HasPrefix(in.Cwd, "/") {
		return nil, nil, fmt.Errorf("cwd %q must be an absolute path (start with /)", in.Cwd)
	}
	opts := []smolvm.RunOption{smolvm.WithTimeout(timeout), smolvm.WithOutputLimit(s.opts.OutputLimit), smolvm.WithDir(in.Cwd)}
	keys := make([]string, 0, len(in.Env))
	for k := range in.Env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		opts = append(opts, smolvm.WithEnv(k+"="+in.Env[k]))
	}
	if in.Stdin != "" {
		opts = append(opts, smolvm.WithStdin(strings.NewReader(in.Stdin)))
	}

	var vm *smolvm.VM
	var stop func()
	if in.SandboxID == "" {
		stop = s.progress(ctx, req, func(el time.Duration) string {
			return fmt.Sprintf("starting a sandbox and running the command (%.0f s)", el.Seconds())
		})
		cfg := s.config()
		cfg.Prelaunch = s.opts.Prelaunch
		var err error
		vm, err = smolvm.New(ctx, cfg)
		if err != nil {
			stop()
			return nil, nil, createErr(err, createInput{})
		}
		// The answer does not wait for the one-off sandbox's deletion
		// (Close waits for it).
		defer s.closeLater(vm)
	} else {
		var err error
		if vm, err = s.sandbox(ctx, in.SandboxID); err != nil {
			return nil, nil, err
		}
		stop = s.progress(ctx, req, func(el time.Duration) string { return fmt.Sprintf("command running (%.0f s)", el.Seconds()) })
	}
	res, err := vm.Run(ctx, in.Command, opts...)
	stop()
	if err != nil {
		var se *smolvm.StartError
		if errors.As(err, &se) {
			return nil, nil, fmt.Errorf("the command could not start: %s (check cwd and the command)", se.Reason)
		}
		return nil, nil, s.callErr(vm, "run the command", err)
	}
	out := &runOutput{Stdout: string(res.Stdout), Stderr: string(res.Stderr), ExitCode: res.ExitCode,
		TimedOut: res.TimedOut, Truncated: res.Truncated, DurationMS: time.Since(t0).Milliseconds()}
	if in.SandboxID != "" {
		out.SandboxID = vm.ID()
	}
	if res.TimedOut {
		msg := fmt.Sprintf("the command timed out after %d s and was killed (output so far is in stdout and stderr): "+
			"give a larger timeout_s (at most %d), or start it in the background (nohup CMD >/tmp/out.log 2>&1 &) in a sandbox and check on it later",
			int(timeout.Seconds()), int(s.opts.MaxTimeout.Seconds()))
		return &mcp.CallToolResult{IsError: true, Content: []mcp.Content{&mcp.TextContent{Text: msg}}}, out, nil
	}
	return nil, out, nil
}

func (s *Server) writeFile(ctx context.Context, _ *mcp.CallToolRequest, in writeInput) (*mcp.CallToolResult, *writeOutput, error) {
	data, err := decode(in.Content, in.Encoding)
	if err != nil {
		return nil, nil, err
	}
	if len(data) > s.opts.MaxFileBytes {
		return nil, nil, fmt.Errorf("content is %d bytes, over the limit of %d: write it in parts (run_command with 'cat >> FILE' and stdin) or make it in the sandbox", len(data), s.opts.MaxFileBytes)
	}
	if err := checkPath(in.Path); err != nil {
		return nil, nil, err
	}
	vm, err := s.sandbox(ctx, in.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	if err := vm.WriteFile(ctx, in.Path, data, 0o644); err != nil {
		return nil, nil, s.callErr(vm, "write "+in.Path, err)
	}
	return nil, &writeOutput{Path: in.Path, Bytes: int64(len(data))}, nil
}

func (s *Server) readFile(ctx context.Context, _ *mcp.CallToolRequest, in readInput) (*mcp.CallToolResult, *readOutput, error) {
	if in.Encoding != "" && in.Encoding != "utf8" && in.Encoding != "base64" {
		return nil, nil, fmt.Errorf("encoding %q: use 'utf8' or 'base64'", in.Encoding)
	}
	if err := checkPath(in.Path); err != nil {
		return nil, nil, err
	}
	vm, err := s.sandbox(ctx, in.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	fi, err := vm.Stat(ctx, in.Path)
	if err != nil {
		return nil, nil, s.fileErr(vm, in.Path, err)
	}
	switch {
	case fi.IsDir():
		return nil, nil, fmt.Errorf("%s is a folder: call list_files to see what is in it", in.Path)
	case !fi.Mode().IsRegular() && fi.Mode()&fs.ModeSymlink == 0:
		return nil, nil, fmt.Errorf("%s is not a regular file (%s): read it with run_command", in.Path, fi.Mode().Type())
	case fi.Size() > int64(s.opts.MaxFileBytes):
		return nil, nil, fmt.Errorf("%s is %d bytes, over the limit of %d: read parts of it with run_command (head -c N, tail -c N, sed -n 'A,Bp')", in.Path, fi.Size(), s.opts.MaxFileBytes)
	}
	data, err := vm.ReadFile(ctx, in.Path)
	if err != nil {
		return nil, nil, s.fileErr(vm, in.Path, err)
	}
	if len(data) > s.opts.MaxFileBytes { // it grew since Stat
		return nil, nil, fmt.Errorf("%s grew past the limit of %d bytes while read: read parts of it with run_command", in.Path, s.opts.MaxFileBytes)
	}
	content, enc := encode(data, in.Encoding)
	return nil, &readOutput{Path: in.Path, Content: content, Encoding: enc, Size: int64(len(data))}, nil
}

// fileErr says what to do about a failed file call.
func (s *Server) fileErr(vm *smolvm.VM, p string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("no such file or folder in sandbox %s: %s (call list_files on its parent folder to see what is there)", vm.ID(), p)
	}
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("permission denied: %s in sandbox %s", p, vm.ID())
	}
	return s.callErr(vm, "read "+p, err)
}

func checkPath(p string) error {
	if !strings.HasPrefix(p, "/") || strings.ContainsRune(p, 0) {
		return fmt.Errorf("path %q must be absolute (start with /), e.g. /root/main.py", p)
	}
	return nil
}

func (s *Server) listSandboxes(ctx context.Context, _ *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, *listOutput, error) {
	list, err := s.list(ctx)
	if err != nil {
		return nil, nil, err
	}
	return nil, &listOutput{Sandboxes: list}, nil
}

// list describes every VM of the state folder.
func (s *Server) list(ctx context.Context) ([]sandboxOutput, error) {
	h, err := s.host()
	if err != nil {
		return nil, fmt.Errorf("list sandboxes: %w", err)
	}
	infos, err := h.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list sandboxes: %w", err)
	}
	out := make([]sandboxOutput, 0, len(infos))
	for _, info := range infos {
		out = append(out, s.describe(info))
	}
	return out, nil
}

func (s *Server) describe(info *smolvm.Info) sandboxOutput {
	_, keep, mine := s.ownedBy(info.ID)
	return sandboxOutput{SandboxID: info.ID, Name: info.Name, State: string(info.State), Image: info.Image,
		Snapshot: info.Snapshot, CPUs: info.VCPUs, MemoryMiB: info.MemoryMiB, Created: info.Created,
		Session: mine && !keep, Keep: keep, MCP: strings.HasPrefix(info.Name, NamePrefix)}
}

func (s *Server) deleteSandboxTool(ctx context.Context, _ *mcp.CallToolRequest, in sandboxRef) (*mcp.CallToolResult, *deleteOutput, error) {
	vm, err := s.sandbox(ctx, in.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	if !strings.HasPrefix(vm.Name(), NamePrefix) {
		return nil, nil, fmt.Errorf("sandbox %s (%s) was not made through MCP, so this server leaves it alone: ask the user to delete it on the host ('smolvm rm %s')", vm.ID(), vm.Name(), vm.Name())
	}
	if err := s.deleteSandbox(ctx, vm.ID()); err != nil {
		return nil, nil, fmt.Errorf("delete sandbox %s: %w", vm.ID(), err)
	}
	return nil, &deleteOutput{SandboxID: vm.ID(), Deleted: true}, nil
}

func (s *Server) exposePort(ctx context.Context, _ *mcp.CallToolRequest, in exposeInput) (*mcp.CallToolResult, *exposeOutput, error) {
	if in.Port < 1 || in.Port > 65535 {
		return nil, nil, fmt.Errorf("port %d: give the sandbox's TCP port, 1 to 65535", in.Port)
	}
	vm, err := s.sandbox(ctx, in.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	f, err := vm.ExposePort(ctx, strconv.Itoa(in.Port))
	if err != nil {
		return nil, nil, s.callErr(vm, "expose port "+strconv.Itoa(in.Port), err)
	}
	u := "http://" + net.JoinHostPort(f.HostIP, strconv.Itoa(f.HostPort))
	return nil, &exposeOutput{URL: u, HostIP: f.HostIP, HostPort: f.HostPort, GuestPort: f.GuestPort}, nil
}

func (s *Server) snapshotSandbox(ctx context.Context, req *mcp.CallToolRequest, in snapshotInput) (*mcp.CallToolResult, *snapshotOutput, error) {
	if in.Name == "" {
		return nil, nil, errors.New("name is required: the snapshot's name, e.g. 'after-setup'")
	}
	vm, err := s.sandbox(ctx, in.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	stop := s.progress(ctx, req, func(el time.Duration) string { return fmt.Sprintf("saving the sandbox (%.0f s)", el.Seconds()) })
	sn, err := vm.Snapshot(ctx, in.Name)
	stop()
	if errors.Is(err, smolvm.ErrExists) {
		return nil, nil, fmt.Errorf("a snapshot named %q exists: choose another name", in.Name)
	}
	if err != nil {
		return nil, nil, s.callErr(vm, "snapshot", err)
	}
	return nil, &snapshotOutput{Snapshot: sn.Name, SandboxID: vm.ID(), Created: sn.Created, MemoryMiB: sn.MemoryMiB, CPUs: sn.VCPUs}, nil
}

// progress sends a progress notification every Options.ProgressInterval
// while a call works, if the client asked for them (a progress token),
// until the returned stop is called.
func (s *Server) progress(ctx context.Context, req *mcp.CallToolRequest, msg func(elapsed time.Duration) string) (stop func()) {
	tok := req.Params.GetProgressToken()
	if tok == nil || req.Session == nil {
		return func() {}
	}
	t0 := time.Now()
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(s.opts.ProgressInterval)
		defer t.Stop()
		for n := 1; ; n++ {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			_ = req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{ProgressToken: tok,
				Progress: float64(n), Message: msg(time.Since(t0))})
		}
	}()
	return func() { close(done); <-finished }
}

// maxEntries bounds what list_files returns.
const maxEntries = 1000

func (s *Server) listFiles(ctx context.Context, _ *mcp.CallToolRequest, in listFilesInput) (*mcp.CallToolResult, *listFilesOutput, error) {
	if in.Path == "" {
		in.Path = "/root"
	}
	if err := checkPath(in.Path); err != nil {
		return nil, nil, err
	}
	vm, err := s.sandbox(ctx, in.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	infos, err := vm.ReadDir(ctx, in.Path)
	// A folder over the library's bound still lists its first entries.
	if err != nil && !(errors.Is(err, smolvm.ErrInvalid) && len(infos) > 0) {
		if errors.Is(err, smolvm.ErrInvalid) && !errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("%s: %w (read_file reads a file)", in.Path, err)
		}
		return nil, nil, s.fileErr(vm, in.Path, err)
	}
	out := &listFilesOutput{Path: in.Path, Entries: []fileEntry{}, Truncated: err != nil || len(infos) > maxEntries}
	for _, fi := range infos[:min(len(infos), maxEntries)] {
		typ := "other"
		switch {
		case fi.Mode().IsRegular():
			typ = "file"
		case fi.IsDir():
			typ = "dir"
		case fi.Mode()&fs.ModeSymlink != 0:
			typ = "symlink"
		}
		out.Entries = append(out.Entries, fileEntry{Name: fi.Name(), Type: typ, Size: fi.Size(),
			Mode: fi.Mode().String(), Modified: fi.ModTime().UTC(), Target: fi.LinkTarget()})
	}
	return nil, out, nil
}
