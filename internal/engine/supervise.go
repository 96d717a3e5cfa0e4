package engine

import (
	"context"
	"flag"
	"fmt"
	"io"
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

// SuperviseCommand is the hidden command of the smolvm binary that runs a
// persistent VM's supervisor: SpawnSupervisor runs
// `BINARY __supervise ID --started T --create-done T` with the ready pipe
// as fd 3, and that command calls smolvm.SupervisorMain, which calls
// SupervisorMain here. BINARY is SupervisorProgram when there is one
// (cmd/smolvm-supervisor, which calls SupervisorMain itself), and the
// command's name stays in its arguments: health checks and leak checks
// find a VM's supervisor by it.
const SuperviseCommand = "__supervise"

// SupervisorMain parses the arguments SpawnSupervisor gave the hidden
// command (after its name) and runs the supervisor with the ready pipe on
// fd 3.
func SupervisorMain(ctx context.Context, args []string, log *slog.Logger) error {
	fs := flag.NewFlagSet(SuperviseCommand, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	started := fs.String("started", "", "")
	createDone := fs.String("create-done", "", "")
	if len(args) == 0 {
		return fmt.Errorf("%w: %s needs a VM id", errdefs.ErrInvalid, SuperviseCommand)
	}
	id := args[0]
	if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 0 {
		return fmt.Errorf("%w: %s %v: the library starts this command itself", errdefs.ErrInvalid, SuperviseCommand, args)
	}
	if log == nil {
		log = slog.Default()
	}
	t0, _ := time.Parse(time.RFC3339Nano, *started)
	t1, _ := time.Parse(time.RFC3339Nano, *createDone)
	return runSupervisor(ctx, id, os.NewFile(3, "ready"), t0, t1, log)
}

// runSupervisor starts the VM, reports "ok" or the error on the ready
// file (errdefs.ReadyLine: the error keeps its kind), and serves the VM
// until it stops.
func runSupervisor(ctx context.Context, id string, ready *os.File, started, createDone time.Time, log *slog.Logger) error {
	idleLean(log)
	st, err := OpenStore(ctx, "")
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
