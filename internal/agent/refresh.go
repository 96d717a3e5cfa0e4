package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

const maxEntropy = 4096

// validHostname: letters, digits, '-' and '.', 1 to 64 characters, a
// letter or digit at both ends. (Checked by hand, not with a regular
// expression: this runs first thing after a restore, when every code path
// is translated anew under emulation, and compiling one is a lot of code.)
func validHostname(h string) bool {
	if len(h) == 0 || len(h) > 64 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || i == len(h)-1 || c != '-' && c != '.') {
			return false
		}
	}
	return true
}

// validMachineID: 32 lower-case hex digits.
func validMachineID(id string) bool {
	if len(id) != 32 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Refresh makes a restored snapshot unique again: fresh entropy, the host's
// wall clock, a new hostname and machine id.
func (s *Server) Refresh(_ context.Context, req *agentpb.RefreshRequest) (*agentpb.RefreshResponse, error) {
	if len(req.GetEntropy()) > maxEntropy {
		return nil, status.Errorf(codes.InvalidArgument, "entropy is %d bytes; at most %d are accepted", len(req.GetEntropy()), maxEntropy)
	}
	if h := req.GetHostname(); h != "" && !validHostname(h) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid hostname %q: want letters, digits, '-' and '.', at most 64 characters", h)
	}
	if id := req.GetMachineId(); id != "" && !validMachineID(id) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid machine id %q: want 32 lower-case hex digits", id)
	}
	if e := req.GetEntropy(); len(e) > 0 {
		if err := addEntropy(e); err != nil {
			return nil, status.Errorf(codes.Internal, "add entropy: %v", err)
		}
	}
	if ns := req.GetTimeUnixNs(); ns != 0 {
		ts := unix.NsecToTimespec(ns)
		if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "set clock to %s: %v", time.Unix(0, ns).UTC().Format(time.RFC3339Nano), err)
		}
	}
	if h := req.GetHostname(); h != "" {
		if err := unix.Sethostname([]byte(h)); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "set hostname %q: %v", h, err)
		}
	}
	if id := req.GetMachineId(); id != "" {
		if err := writeMachineID(s.cfg.MachineIDFile, id); err != nil {
			return nil, status.Errorf(codes.Internal, "write %s: %v", s.cfg.MachineIDFile, err)
		}
	}
	return &agentpb.RefreshResponse{}, nil
}

// runMachineID holds the machine id when the root is read-only.
const runMachineID = "/run/machine-id"

// machineID is the machine id file as last written, kept open: it is
// rewritten in place on the restore's critical path, where every system
// call the guest has not made since the restore costs milliseconds under
// emulation (an open and a close of the file among them).
var machineID struct {
	sync.Mutex
	path string
	f    *os.File
}

// writeMachineID replaces the machine id file. On a read-only root (the
// shared disk mode) the id goes to /run, a tmpfs, bind-mounted over the
// file as systemd does for read-only roots; when the image has no such
// file there is nothing to mount over and /run/machine-id alone has it.
func writeMachineID(path, id string) error {
	data := []byte(id + "\n")
	machineID.Lock()
	defer machineID.Unlock()
	if machineID.f != nil && machineID.path == path && sameFile(machineID.f, path, len(data)) {
		// Same file, same length: an overwrite replaces the id.
		if _, err := machineID.f.WriteAt(data, 0); err == nil {
			return nil
		}
	}
	if machineID.f != nil {
		_ = machineID.f.Close()
		machineID.f = nil
	}
	// Rewritten in place, not through a temporary file and a rename:
	// nothing else writes the file.
	err := os.WriteFile(path, data, 0o444)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(filepath.Dir(path), 0o755); err == nil {
			err = os.WriteFile(path, data, 0o444)
		}
	}
	if err == nil {
		if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
			machineID.path, machineID.f = path, f
		}
		return nil
	}
	if !errors.Is(err, unix.EROFS) {
		return err
	}
	// Written in place: a bind mount of an earlier refresh sees it.
	if err := os.WriteFile(runMachineID, data, 0o444); err != nil {
		return err
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) || err == nil && string(b) == string(data) {
		return nil
	}
	if err := unix.Mount(runMachineID, path, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("the root is read-only and %s cannot be bind-mounted over %s: %w", runMachineID, path, err)
	}
	return nil
}

// sameFile reports whether f is still the file at path (not replaced, say
// by a rename over it) and size bytes long.
func sameFile(f *os.File, path string, size int) bool {
	a, err1 := f.Stat()
	b, err2 := os.Stat(path)
	return err1 == nil && err2 == nil && os.SameFile(a, b) && a.Size() == int64(size)
}

// urandom stays open once used: a refresh runs first thing in a restored
// guest, where the open and close of a file are paths to translate anew.
var urandom struct {
	sync.Mutex
	f *os.File
}

// addEntropy mixes data into the kernel pool and credits it with
// RNDADDENTROPY, then forces a reseed. Crediting needs CAP_SYS_ADMIN;
// without it the data is mixed in through a plain write.
func addEntropy(data []byte) error {
	urandom.Lock()
	defer urandom.Unlock()
	if urandom.f == nil {
		f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		urandom.f = f
	}
	f := urandom.f
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	words := (len(data) + 3) / 4
	buf := make([]byte, 8+words*4)
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(data)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(data)))
	copy(buf[8:], data)
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0])))
		if e != 0 {
			ierr = e
			return
		}
		// Once the kernel's RNG is initialised it reseeds only every
		// minute: force it now, or clones read the same bytes until then.
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDRESEEDCRNG, 0); e != 0 {
			ierr = e
		}
	}); err != nil {
		return err
	}
	if ierr == unix.EPERM && os.Getpid() != 1 {
		// Unprivileged (tests): mixed in, not credited.
		_, err := f.Write(data)
		return err
	}
	return ierr
}
