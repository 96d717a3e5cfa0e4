package jail

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// legacySetIDCalls are x86-64's calls without *at.
func legacySetIDCalls(p func(string) string) []setIDCall {
	path := func(name string) uintptr { return uintptr(unsafe.Pointer(bytePtr(p(name)))) }
	call := func(nr, a1, a2, a3 uintptr) error {
		r, _, e := unix.Syscall(nr, a1, a2, a3)
		if e == 0 && (nr == unix.SYS_OPEN || nr == unix.SYS_CREAT) {
			unix.Close(int(r))
		}
		return errnoErr(e)
	}
	return []setIDCall{
		{"chmod (legacy) 4755", unix.EPERM, func() error { return call(unix.SYS_CHMOD, path("plain"), 0o4755, 0) }},
		{"chmod (legacy) 0750", nil, func() error { return call(unix.SYS_CHMOD, path("plain"), 0o750, 0) }},
		{"creat 2755", unix.EPERM, func() error { return call(unix.SYS_CREAT, path("creat"), 0o2755, 0) }},
		{"creat 0600", nil, func() error { return call(unix.SYS_CREAT, path("creat"), 0o600, 0) }},
		{"open O_CREAT 4755", unix.EPERM, func() error { return call(unix.SYS_OPEN, path("open"), unix.O_CREAT|unix.O_WRONLY, 0o4755) }},
		{"mknod 6755", unix.EPERM, func() error { return call(unix.SYS_MKNOD, path("mknod"), unix.S_IFREG|0o6755, 0) }},
	}
}
