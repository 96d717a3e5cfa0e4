package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

type output struct {
	f      *os.File
	stderr bool
}

// process is a started command and the agent's ends of its stdio.
type process struct {
	pid     int
	wait    <-chan syscall.WaitStatus
	pty     *os.File // master, when on a terminal
	stdin   *os.File // pipe write end; nil when stdin is /dev/null or a pty
	outputs []output
	// cg is the command's own cgroup (see cmdCgroups), released when
	// the command is done with; limits is where it goes back.
	cg     *cmdCgroup
	limits *CommandLimits

	stdinMu     sync.Mutex
	stdinClosed bool
}

// unread reports whether any of the process's outputs holds bytes nobody
// has read yet (TIOCINQ, which is FIONREAD, on pipes and terminals). It
// asks through SyscallConn, which leaves the descriptor non-blocking.
func (p *process) unread() bool {
	for _, o := range p.outputs {
		rc, err := o.f.SyscallConn()
		if err != nil {
			continue
		}
		n := 0
		_ = rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.TIOCINQ) })
		if n > 0 {
			return true
		}
	}
	return false
}

// feedStdin writes queued stdin until the queue closes, then closes stdin.
func (p *process) feedStdin(q <-chan []byte) {
	for b := range q {
		switch {
		case p.pty != nil:
			if _, err := p.pty.Write(b); err != nil {
				drain(q)
				return
			}
		case p.stdin != nil:
			if _, err := p.stdin.Write(b); err != nil {
				drain(q)
				p.closeStdin()
				return
			}
		}
	}
	if p.pty != nil {
		_, _ = p.pty.Write([]byte{4}) // ^D: end of input on a terminal
		return
	}
	p.closeStdin()
}

func drain(q <-chan []byte) {
	for range q {
	}
}

func (p *process) closeStdin() {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin != nil && !p.stdinClosed {
		p.stdinClosed = true
		p.stdin.Close()
	}
}

func (p *process) closeOutputs() {
	for _, o := range p.outputs {
		o.f.Close()
	}
}

func (p *process) closeAll() {
	p.closeStdin()
	p.closeOutputs()
	p.limits.release(p.cg)
	p.cg = nil
}

// signalOf is a signal number from the host, if it names one.
func signalOf(n int32) (syscall.Signal, bool) { return syscall.Signal(n), n > 0 && n < 65 }

// kill signals the process group (and the process itself, should it have
// left the group).
func (p *process) kill(sig syscall.Signal) {
	_ = syscall.Kill(-p.pid, sig)
	_ = syscall.Kill(p.pid, sig)
}

// startProcess sets up stdio and forks the command through the reaper.
func (s *Server) startProcess(argv, env []string, dir string, id *identity, start *agentpb.ExecStart) (*process, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("working directory %q is not an absolute path", dir)
	}
	if fi, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("working directory %s does not exist", dir)
		}
		return nil, fmt.Errorf("working directory %s: %w", dir, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("working directory %s is not a directory", dir)
	}
	path, err := lookPath(argv[0], env, dir)
	if err != nil {
		return nil, err
	}

	p := &process{}
	var childFiles []*os.File // closed in the parent after the fork
	defer func() {
		for _, f := range childFiles {
			f.Close()
		}
	}()
	fail := func(err error) (*process, error) {
		p.closeAll()
		if p.pty != nil {
			p.pty.Close()
		}
		return nil, err
	}
	attr := &syscall.ProcAttr{Dir: dir, Env: env, Sys: &syscall.SysProcAttr{}}
	if id != nil {
		attr.Sys.Credential = &syscall.Credential{Uid: id.uid, Gid: id.gid, Groups: id.groups}
	}
	if start.GetTty() {
		master, tty, err := openPTY()
		if err != nil {
			return nil, fmt.Errorf("open pty: %w", err)
		}
		p.pty = master
		p.outputs = []output{{f: master}}
		childFiles = append(childFiles, tty)
		if sz := start.GetSize(); sz != nil {
			_ = setWinsize(master, sz)
		}
		fd := tty.Fd()
		attr.Files = []uintptr{fd, fd, fd}
		attr.Sys.Setsid = true
		attr.Sys.Setctty = true
		attr.Sys.Ctty = 0
	} else {
		var stdinChild *os.File
		if start.GetStdin() {
			r, w, err := os.Pipe()
			if err != nil {
				return fail(err)
			}
			p.stdin, stdinChild = w, r
		} else {
			devnull, err := os.Open(os.DevNull)
			if err != nil {
				return fail(err)
			}
			stdinChild = devnull
		}
		childFiles = append(childFiles, stdinChild)
		or, ow, err := os.Pipe()
		if err != nil {
			return fail(err)
		}
		childFiles = append(childFiles, ow)
		p.outputs = append(p.outputs, output{f: or})
		er, ew, err := os.Pipe()
		if err != nil {
			return fail(err)
		}
		childFiles = append(childFiles, ew)
		p.outputs = append(p.outputs, output{f: er, stderr: true})
		attr.Files = []uintptr{stdinChild.Fd(), ow.Fd(), ew.Fd()}
		attr.Sys.Setpgid = true
	}
	p.limits = s.cfg.Limits
	p.cg = s.cfg.Limits.apply(attr.Sys)
	pid, wait, err := s.reaper.Start(path, argv, attr)
	if err != nil {
		err = fmt.Errorf("start %s: %w", argv[0], s.cfg.Limits.explain(err))
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.ENOEXEC) {
			// A missing interpreter, no permission, not a program.
			err = &startError{notRunnable(err), err}
		}
		return fail(err)
	}
	s.cfg.Limits.started(pid)
	p.pid, p.wait = pid, wait
	return p, nil
}

// startError is a command that could not start, with the exit status a
// shell gives it: 127 when it does not exist, 126 when it cannot run.
type startError struct {
	code int32
	err  error
}

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// startCode is the shell's exit status for a command that could not start
// with err (see startError), or -1.
func startCode(err error) int32 {
	if se := (*startError)(nil); errors.As(err, &se) {
		return se.code
	}
	return -1
}

// notRunnable classifies why path cannot be executed.
func notRunnable(err error) int32 {
	if errors.Is(err, fs.ErrNotExist) {
		return 127
	}
	return 126
}

// lookPath finds an executable like a shell would, using the command's PATH.
func lookPath(file string, env []string, dir string) (string, error) {
	if strings.Contains(file, "/") {
		full := file
		if !filepath.IsAbs(full) {
			full = filepath.Join(dir, full)
		}
		if err := checkExecutable(full); err != nil {
			return "", &startError{notRunnable(err), fmt.Errorf("cannot run %s: %w", file, err)}
		}
		return full, nil
	}
	pathVar := DefaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathVar = v
		}
	}
	for _, d := range filepath.SplitList(pathVar) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		full := filepath.Join(d, file)
		if checkExecutable(full) == nil {
			return full, nil
		}
	}
	return "", &startError{127, fmt.Errorf("executable file %q not found in PATH (%s)", file, pathVar)}
}

func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return errors.New("is a directory")
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return fs.ErrPermission
	}
	return nil
}
