package smolvm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// RunSupervisor is the body of a detached supervisor process (`smolvm
// __supervise ID`): it starts the VM, reports "ok" or the error on the
// ready file (errdefs.ReadyLine: the error keeps its kind), and serves the
// VM until it stops. SIGTERM stops the VM gracefully.
func RunSupervisor(ctx context.Context, id string, ready *os.File, started, createDone time.Time, log *slog.Logger) error {
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
