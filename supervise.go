package smolvm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// RunSupervisor is the body of a detached supervisor process (`smolvm
// __supervise ID`): it starts the VM, reports "ok" or the error on the
// ready file (errdefs.ReadyLine: the error keeps its kind), and serves the
// VM until it stops. SIGTERM stops the VM gracefully.
func RunSupervisor(ctx context.Context, id string, ready *os.File, started, createDone time.Time, log *slog.Logger) error {
	idleLean(log)
	st, err := openStore(ctx, "")
	if err != nil {
		fmt.Fprintln(ready, errdefs.ReadyLine(err))
		return err
	}
	defer st.Close()
	if _, err := st.UpdateVM(ctx, id, func(v *store.VM) error { v.SupervisorPID = os.Getpid(); return nil }); err != nil {
		fmt.Fprintln(ready, errdefs.ReadyLine(err))
		return err
	}
	sup, err := supervisor.Start(ctx, id, supervisor.Options{Store: st, Logger: log, Started: started, CreateDone: createDone})
	if err != nil {
		fmt.Fprintln(ready, errdefs.ReadyLine(err))
		return err
	}
	fmt.Fprintln(ready, errdefs.ReadyOK)
	ready.Close()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	select {
	case <-sup.Done():
	case sig := <-sigs:
		log.Info("stopping on signal", "signal", sig)
		_ = sup.Stop(context.Background(), false, 10*time.Second)
	}
	return sup.Err()
}

// idleLean makes the supervisor and the hypervisor it starts cheaper to
// keep while their VM idles, as most persistent VMs do.
//
// No transparent huge pages, for this process and its children (the
// setting is inherited and kept across exec): QEMU asks for them on TCG's
// code buffer, so each 2 MiB of it the guest's code touches is 2 MiB of
// host memory — 10 of an idle QEMU's 24 MiB of private memory.
func idleLean(log *slog.Logger) {
	if err := unix.Prctl(unix.PR_SET_THP_DISABLE, 1, 0, 0, 0); err != nil {
		log.Debug("disable transparent huge pages", "err", err)
	}
}
