package rootfs

import "syscall"

type syscallStat = syscall.Stat_t

func stat(path string, st *syscall.Stat_t) error { return syscall.Stat(path, st) }
