package jail

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// A process started with Jail.NoSetID runs under a seccomp filter that
// refuses (EPERM) every system call that would give a file a setuid or
// setgid bit (chmod, fchmod, fchmodat, fchmodat2, creat, open and openat
// with O_CREAT or O_TMPFILE, mknod, mknodat, when mode&06000 != 0),
// answers EOPNOTSUPP to the calls that write an extended attribute (file
// capabilities are privilege too; tools such as cp -p take that answer
// for a file system without them), and answers ENOSYS to openat2 (its
// mode is in a struct a filter cannot read; callers fall back to
// openat), to io_uring_setup (io_uring operations pass no seccomp
// filter) and to any other architecture's calls (x32, i386). Everything else is allowed: it stacks on whatever
// filter the process installs itself.
//
// The filter is installed on the thread that starts the process, which
// the child inherits across fork and exec, and which ends with the
// process's release (Jail.Start): no other thread of this process ever
// has it, and the Go runtime starts no thread from a locked one (it
// asks its template thread), so none inherits it either.

// setIDBits are the mode bits a NoSetID process cannot set.
const setIDBits = unix.S_ISUID | unix.S_ISGID

// modeRule refuses syscall nr when its argument mode has setIDBits, and,
// when flags >= 0, only if its argument flags asks to create a file.
type modeRule struct {
	nr          uint32
	mode, flags int
}

// seccompArch and the rules per architecture: setid_*.go.

// seccompXattrCalls write extended attributes.
var seccompXattrCalls = []uint32{unix.SYS_SETXATTR, unix.SYS_LSETXATTR, unix.SYS_FSETXATTR, unix.SYS_SETXATTRAT}

// noSetIDFilter is the filter's program.
func noSetIDFilter() ([]bpf.Instruction, error) {
	if seccompArch == 0 {
		return nil, fmt.Errorf("jail: no setuid filter for %s (only amd64 and arm64 have one)", runtime.GOARCH)
	}
	const (
		offNr   = 0
		offArch = 4
		offArgs = 16 // then 8 bytes each; the low half (little-endian) first
	)
	allow := bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW}
	eperm := bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)}
	enotsup := bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EOPNOTSUPP)}
	enosys := bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)}
	arg := func(i int) bpf.Instruction { return bpf.LoadAbsolute{Off: uint32(offArgs + 8*i), Size: 4} }

	// Built backwards, so that every jump's target is known: each
	// instruction is prepended, and a jump counts the instructions
	// between it and its target.
	var prog []bpf.Instruction
	push := func(ins bpf.Instruction) { prog = append([]bpf.Instruction{ins}, prog...) }
	push(enosys)
	push(enotsup)
	push(eperm)
	push(allow)
	// to is how many instructions a jump about to be prepended skips
	// to reach ret (one of the returns at the end).
	to := func(ret bpf.Instruction) uint8 {
		for i, ins := range prog {
			if ins == ret {
				return uint8(i)
			}
		}
		panic("jail: no such return")
	}
	push(allow) // no rule matched
	for _, r := range seccompModeRules {
		// Prepend in reverse order: mode test, mode load, flags test,
		// flags load, number test.
		push(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: setIDBits, SkipTrue: to(eperm), SkipFalse: to(allow)})
		push(arg(r.mode))
		n := 2
		if r.flags >= 0 {
			push(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: unix.O_CREAT | (unix.O_TMPFILE &^ unix.O_DIRECTORY), SkipFalse: to(allow)})
			push(arg(r.flags))
			n = 4
		}
		push(bpf.JumpIf{Cond: bpf.JumpEqual, Val: r.nr, SkipFalse: uint8(n)})
	}
	for _, nr := range seccompXattrCalls {
		push(bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr, SkipTrue: to(enotsup)})
	}
	for _, nr := range []uint32{unix.SYS_OPENAT2, unix.SYS_IO_URING_SETUP} {
		push(bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr, SkipTrue: to(enosys)})
	}
	if seccompNrMask != 0 {
		push(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: seccompNrMask, SkipTrue: to(enosys)})
	}
	push(bpf.LoadAbsolute{Off: offNr, Size: 4})
	push(bpf.JumpIf{Cond: bpf.JumpEqual, Val: seccompArch, SkipFalse: to(enosys)})
	push(bpf.LoadAbsolute{Off: offArch, Size: 4})
	if len(prog) > 255 {
		return nil, fmt.Errorf("jail: setuid filter too long for its jumps (%d instructions)", len(prog))
	}
	return prog, nil
}

// noSetID installs the filter on the calling thread, which must be
// locked to its goroutine and never run other Go code afterwards (it
// ends with it). no_new_privs, which the kernel asks of a filter's
// installer, is set on the thread too and inherited alike: the process
// gains no privilege by exec (it needs none).
func noSetID() error {
	prog, err := noSetIDFilter()
	if err != nil {
		return err
	}
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return fmt.Errorf("jail: setuid filter: %w", err)
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("jail: no_new_privs: %w", err)
	}
	// Flags 0: this thread only (not SECCOMP_FILTER_FLAG_TSYNC).
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&fprog))); errno != 0 {
		return fmt.Errorf("jail: install setuid filter: %w", errno)
	}
	runtime.KeepAlive(filter)
	return nil
}
