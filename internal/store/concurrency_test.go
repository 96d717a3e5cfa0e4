package store

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// TestConcurrentHandles allocates from one pool and creates VMs with
// generated names from several goroutines spread over several Store handles
// on the same database, as separate processes would.
func TestConcurrentHandles(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	const handles, workers, perWorker = 4, 10, 5 // 50 leases, 50 VMs
	stores := make([]*Store, handles)
	for i := range stores {
		stores[i] = openTest(t, home)
	}
	type result struct {
		lease int64
		name  string
		id    string
	}
	results := make(chan result, workers*perWorker)
	errs := make(chan error, workers*perWorker)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			s := stores[w%handles]
			for range perWorker {
				vm := &VM{}
				if err := s.CreateVM(ctx, vm); err != nil {
					errs <- err
					return
				}
				v, err := s.Allocate(ctx, "ip", vm.ID, 1, workers*perWorker)
				if err != nil {
					errs <- err
					return
				}
				results <- result{v, vm.Name, vm.ID}
			}
		})
	}
	wg.Wait()
	close(results)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	leases, names := map[int64]string{}, map[string]string{}
	for r := range results {
		if prev, dup := leases[r.lease]; dup {
			t.Errorf("lease %d given to %s and %s", r.lease, prev, r.id)
		}
		leases[r.lease] = r.id
		if prev, dup := names[r.name]; dup {
			t.Errorf("name %s given to %s and %s", r.name, prev, r.id)
		}
		names[r.name] = r.id
	}
	if len(leases) != workers*perWorker || len(names) != workers*perWorker {
		t.Errorf("got %d leases and %d names, want %d", len(leases), len(names), workers*perWorker)
	}
	if _, err := stores[0].Allocate(ctx, "ip", "x", 1, workers*perWorker); err == nil {
		t.Error("pool should be exhausted")
	}
}

const helperEnv = "SMOLVM_STORE_TEST_HELPER"

// TestHelperProcess is not a real test: it is the body of the child processes
// started by TestCrossProcess. It opens the store in the folder named by
// $SMOLVM_STORE_TEST_HELPER (racing the other children to create and migrate
// it), then creates VMs and allocates leases, printing "ID NAME LEASE" lines.
func TestHelperProcess(t *testing.T) {
	home := os.Getenv(helperEnv)
	if home == "" {
		t.Skip("helper process for TestCrossProcess")
	}
	n, _ := strconv.Atoi(os.Getenv(helperEnv + "_N"))
	hi, _ := strconv.ParseInt(os.Getenv(helperEnv+"_HI"), 10, 64)
	ctx := context.Background()
	s, err := Open(ctx, home)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer s.Close()
	for range n {
		vm := &VM{}
		if err := s.CreateVM(ctx, vm); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		v, err := s.Allocate(ctx, "port", vm.ID, 1, hi)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Printf("%s %s %d\n", vm.ID, vm.Name, v)
	}
}

// TestCrossProcess runs several real processes that open a fresh database at
// the same time and allocate from the same pool.
func TestCrossProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "" {
		t.Skip("nested")
	}
	const procs, perProc = 5, 12
	home := t.TempDir()
	cmds := make([]*exec.Cmd, procs)
	outs := make([]*bytes.Buffer, procs)
	for i := range cmds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(),
			helperEnv+"="+home,
			helperEnv+"_N="+strconv.Itoa(perProc),
			helperEnv+"_HI="+strconv.Itoa(procs*perProc))
		outs[i] = &bytes.Buffer{}
		cmd.Stdout, cmd.Stderr = outs[i], outs[i]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds[i] = cmd
	}
	leases, names := map[int64]string{}, map[string]string{}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("helper %d: %v\n%s", i, err, outs[i])
		}
		sc := bufio.NewScanner(outs[i])
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) != 3 || !idRE.MatchString(f[0]) {
				continue // test framework output
			}
			v, err := strconv.ParseInt(f[2], 10, 64)
			if err != nil {
				t.Fatalf("helper %d: bad line %q", i, sc.Text())
			}
			if prev, dup := leases[v]; dup {
				t.Errorf("lease %d given to %s and %s", v, prev, f[0])
			}
			leases[v] = f[0]
			if prev, dup := names[f[1]]; dup {
				t.Errorf("name %s given to %s and %s", f[1], prev, f[0])
			}
			names[f[1]] = f[0]
		}
	}
	if len(leases) != procs*perProc || len(names) != procs*perProc {
		t.Fatalf("got %d leases and %d names, want %d", len(leases), len(names), procs*perProc)
	}
	s := openTest(t, home)
	got, err := s.Leases(context.Background(), "port")
	if err != nil || len(got) != procs*perProc {
		t.Fatalf("Leases = %d, %v", len(got), err)
	}
	for _, l := range got {
		if leases[l.Value] != l.Owner {
			t.Errorf("lease %d owned by %s in the db, %s reported", l.Value, l.Owner, leases[l.Value])
		}
	}
}
