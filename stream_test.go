package smolvm_test

// Real-VM tests of streamed exec: output order, bounded host memory,
// stdin, signals, PTY and many concurrent streams. They share one VM.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// stCtx bounds one test's calls.
func stCtx(t *testing.T) context.Context { return testutil.Context(t, 10*time.Minute) }

// lineRecorder keeps the lines written to it and when the first arrived.
type lineRecorder struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	first time.Time
}

func (r *lineRecorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.first.IsZero() {
		r.first = time.Now()
	}
	return r.buf.Write(p)
}

func (r *lineRecorder) lines() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Split(strings.TrimSuffix(r.buf.String(), "\n"), "\n")
}

func TestStreamStdoutStderrOrder(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	const n = 3000
	var out, errw lineRecorder
	c := vm.ShellCommand(ctx, fmt.Sprintf(`i=0; while [ $i -lt %d ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done`, n))
	c.Stdout, c.Stderr = &out, &errw
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		name  string
		lines []string
	}{{"out", out.lines()}, {"err", errw.lines()}} {
		if len(s.lines) != n {
			t.Fatalf("%s: %d lines, want %d", s.name, len(s.lines), n)
		}
		for i, l := range s.lines {
			if want := fmt.Sprintf("%s %d", s.name, i); l != want {
				t.Fatalf("%s line %d = %q, want %q: chunks out of order", s.name, i, l, want)
			}
		}
	}
}

func TestStreamOutputArrivesWhileRunning(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	var out lineRecorder
	c := vm.ShellCommand(ctx, "echo first; sleep 3; echo second")
	c.Stdout = &out
	start := time.Now()
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	// Without stdin, a VM of this process runs it over the fast lane,
	// streamed; the same holds for gRPC streams (TestStreamStdin).
	if !smolvm.CmdOnLane(c) {
		t.Error("a command without stdin on a VM of this process did not run over the fast lane")
	}
	total := time.Since(start)
	firstAfter := out.first.Sub(start)
	if got := out.lines(); len(got) != 2 || got[0] != "first" || got[1] != "second" {
		t.Fatalf("output %q", got)
	}
	if firstAfter > total-2*time.Second {
		t.Errorf("first chunk came %s after start and the command took %s: output is not streamed", firstAfter, total)
	}
}

func TestRunCapsOutput(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	res, err := vm.Run(stCtx(t), "head -c 300000 /dev/zero; echo done >&2", smolvm.WithOutputLimit(1000))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Stdout) != 1000 || !res.Truncated || string(res.Stderr) != "done\n" {
		t.Errorf("stdout %d bytes, truncated %v, stderr %q; want 1000, true, \"done\\n\"", len(res.Stdout), res.Truncated, res.Stderr)
	}
}

// countWriter counts and discards.
type countWriter struct{ n atomic.Int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n.Add(int64(len(p))); return len(p), nil }

func vmRSS() int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func TestStream1GiBBoundedMemory(t *testing.T) {
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	size := int64(1 << 30)
	var w countWriter
	// dd with 1 MiB blocks: under TCG each guest syscall is dear.
	c := vm.Command(ctx, "dd", "if=/dev/zero", "bs=1048576", "count="+strconv.FormatInt(size>>20, 10))
	c.Stdout = &w

	runtime.GC()
	var maxHeap uint64
	var maxRSS int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				runtime.ReadMemStats(&ms)
				maxHeap = max(maxHeap, ms.HeapInuse)
				maxRSS = max(maxRSS, vmRSS())
			}
		}
	}()
	start := time.Now()
	err := c.Run()
	took := time.Since(start)
	close(stop)
	<-sampled
	if err != nil {
		t.Fatal(err)
	}
	if got := w.n.Load(); got != size {
		t.Fatalf("received %d bytes, want %d", got, size)
	}
	t.Logf("1 GiB stream out: %s, %.1f MiB/s; host heap in use at most %d MiB, RSS at most %d MiB",
		took.Round(time.Millisecond), float64(size)/(1<<20)/took.Seconds(), maxHeap>>20, maxRSS>>20)
	if maxHeap > 200<<20 {
		t.Errorf("host heap reached %d MiB while streaming: output is being buffered", maxHeap>>20)
	}
}

func TestStreamStdin(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)

	t.Run("cat", func(t *testing.T) {
		in := make([]byte, 3<<20)
		_, _ = rand.Read(in)
		var out bytes.Buffer
		c := vm.Command(ctx, "cat")
		c.Stdin, c.Stdout = bytes.NewReader(in), &out
		if err := c.Run(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), in) {
			t.Errorf("cat returned %d bytes, want the %d sent", out.Len(), len(in))
		}
		if smolvm.CmdOnLane(c) {
			t.Error("a command with stdin ran over the fast lane, which carries none")
		}
	})
	t.Run("while read", func(t *testing.T) {
		pr, pw := io.Pipe()
		var out lineRecorder
		c := vm.ShellCommand(ctx, `while read l; do echo "got $l"; done; echo end`)
		c.Stdin, c.Stdout = pr, &out
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		// Lines are answered one by one, while stdin is still open.
		for i := 0; i < 3; i++ {
			fmt.Fprintf(pw, "line%d\n", i)
			want := fmt.Sprintf("got line%d", i)
			if err := testutil.Poll(30*time.Second, func() bool { return strings.Contains(strings.Join(out.lines(), "\n"), want) }); err != nil {
				t.Fatalf("no %q after writing it: output %q", want, out.lines())
			}
		}
		pw.Close()
		if err := c.Wait(); err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(out.lines(), ","); got != "got line0,got line1,got line2,end" {
			t.Errorf("output %q", got)
		}
	})
}

func TestStreamSignals(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			c := vm.Command(ctx, "sleep", "300")
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			if err := c.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			err := c.Wait()
			var ee *smolvm.ExitError
			if !errors.As(err, &ee) || ee.Signal != sig || ee.ExitCode != -1 {
				t.Fatalf("Wait = %v; want an ExitError for signal %d", err, sig)
			}
			if want := "signal: " + sig.String(); ee.Error() != want {
				t.Errorf("Error() = %q, want %q", ee.Error(), want)
			}
		})
	}
	t.Run("cancel kills the group", func(t *testing.T) {
		mark := fmt.Sprintf("smvcancel%d", time.Now().UnixNano())
		cctx, cancel := context.WithCancel(ctx)
		c := vm.ShellCommand(cctx, "sleep 301 & exec sleep 302 # "+mark)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		// Both sleeps run (the group to kill) before the cancel.
		if err := testutil.Poll(time.Minute, func() bool {
			res, err := vm.Run(ctx, "ps -o args | grep -c '^sleep 30[12]' || true")
			return err == nil && strings.TrimSpace(string(res.Stdout)) == "2"
		}); err != nil {
			t.Fatal("the command's two sleeps did not start:", err)
		}
		cancel()
		if err := c.Wait(); !errors.Is(err, context.Canceled) {
			t.Errorf("Wait after cancel = %v, want context.Canceled", err)
		}
		if err := testutil.Poll(20*time.Second, func() bool {
			res, err := vm.Run(ctx, "ps -o args | grep -c '^sleep 30[12]' || true")
			return err == nil && strings.TrimSpace(string(res.Stdout)) == "0"
		}); err != nil {
			res, _ := vm.Run(ctx, "ps -o pid,args")
			t.Errorf("sleep processes still running after cancel:\n%s", res.Stdout)
		}
	})
}

func TestStreamPTY(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)

	t.Run("tty", func(t *testing.T) {
		c := vm.Command(ctx, "tty")
		c.TTY, c.Rows, c.Cols = true, 24, 80
		out, err := c.Output()
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(`^/dev/pts/\d+\r?\n$`).Match(out) {
			t.Errorf("tty printed %q, want /dev/pts/N", out)
		}
	})
	t.Run("resize", func(t *testing.T) {
		pr, pw := io.Pipe()
		defer pw.Close()
		var out lineRecorder
		c := vm.ShellCommand(ctx, `stty size; read x; stty size; read x; exit 5`)
		c.TTY, c.Rows, c.Cols = true, 24, 80
		c.Stdin, c.Stdout = pr, &out
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		waitFor := func(want string) {
			t.Helper()
			if err := testutil.Poll(30*time.Second, func() bool { return strings.Contains(strings.Join(out.lines(), "\n"), want) }); err != nil {
				t.Fatalf("no %q in the terminal output %q", want, out.lines())
			}
		}
		waitFor("24 80")
		if err := c.Resize(50, 132); err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(pw, "\r")
		waitFor("50 132")
		fmt.Fprint(pw, "\r")
		err := c.Wait()
		var ee *smolvm.ExitError
		if !errors.As(err, &ee) || ee.ExitCode != 5 {
			t.Errorf("Wait = %v, want exit status 5", err)
		}
	})
}

// blockingWriter blocks every Write until release is closed; blocked says
// that a Write waits.
type blockingWriter struct {
	release chan struct{}
	blocked atomic.Bool
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	w.blocked.Store(true)
	<-w.release
	return len(p), nil
}

func TestStream50ConcurrentOneStalled(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)

	// The stalled command prints far more than the flow-control windows hold.
	bw := &blockingWriter{release: make(chan struct{})}
	sctx, scancel := context.WithCancel(ctx)
	stalled := vm.Command(sctx, "head", "-c", "67108864", "/dev/zero")
	stalled.Stdout = bw
	if err := stalled.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		scancel()
		close(bw.release)
		_ = stalled.Wait()
	}()
	// Its output reaches the host, which stops reading: the windows fill.
	if err := testutil.Poll(time.Minute, bw.blocked.Load); err != nil {
		t.Fatal("the stalled command's output never reached the host:", err)
	}

	const n = 49
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			c := vm.ShellCommand(ctx, fmt.Sprintf("i=0; while [ $i -lt 200 ]; do echo %d-$i; i=$((i+1)); done; head -c 262144 /dev/zero", i))
			c.Stdout = &out
			if err := c.Run(); err != nil {
				errs <- fmt.Errorf("exec %d: %w", i, err)
				return
			}
			total := out.Len()
			sc := bufio.NewScanner(&out)
			lines := 0
			for sc.Scan() && lines < 200 {
				if want := fmt.Sprintf("%d-%d", i, lines); sc.Text() != want {
					errs <- fmt.Errorf("exec %d: line %q, want %q", i, sc.Text(), want)
					return
				}
				lines++
			}
			if total < 262144 {
				errs <- fmt.Errorf("exec %d: only %d bytes", i, total)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		t.Fatal("the 49 execs did not finish within 5 minutes while one stream was stalled")
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("49 concurrent execs finished in %s beside a stalled stream", time.Since(start).Round(time.Millisecond))
	if stalled.ProcessState != nil {
		t.Errorf("the stalled command finished although its output was never read")
	}
}

// slowWriter sleeps before each write, like a host that reads slowly.
type slowWriter struct {
	n     int64
	delay time.Duration
}

func (w *slowWriter) Write(p []byte) (int, error) {
	time.Sleep(w.delay)
	w.n += int64(len(p))
	return len(p), nil
}

// A command that exits while much of its output still waits for a slow
// host must not lose the rest of it.
func TestStreamSlowReaderGetsAllOutput(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	w := &slowWriter{delay: 100 * time.Millisecond}
	c := vm.Command(stCtx(t), "dd", "if=/dev/zero", "bs=65536", "count=32")
	c.Stdout = w
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	if w.n != 2<<20 {
		t.Errorf("got %d bytes of 2 MiB: output cut after the process exited", w.n)
	}
}
