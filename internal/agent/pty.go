package agent

import (
	"fmt"
	"os"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// openPTY opens a pseudo-terminal pair. The master is returned as a
// non-blocking, poller-backed file so that Close unblocks a pending Read.
func openPTY() (master, tty *os.File, err error) {
	m, t, err := pty.Open()
	if err != nil {
		return nil, nil, err
	}
	defer m.Close()
	fd, err := unix.Dup(int(m.Fd()))
	if err != nil {
		t.Close()
		return nil, nil, fmt.Errorf("dup pty master: %w", err)
	}
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		t.Close()
		return nil, nil, fmt.Errorf("pty master non-blocking: %w", err)
	}
	return os.NewFile(uintptr(fd), "/dev/ptmx"), t, nil
}

// setWinsize sets a terminal's size without putting the file into blocking
// mode (pty.Setsize would call Fd).
func setWinsize(f *os.File, ws *agentpb.WindowSize) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	w := &unix.Winsize{Row: uint16(min(ws.GetRows(), 0xffff)), Col: uint16(min(ws.GetCols(), 0xffff))}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, w)
	}); err != nil {
		return err
	}
	return ierr
}
