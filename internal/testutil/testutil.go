// Package testutil holds what the real-VM tests share: a fresh, short state
// folder per test with a machine-wide image cache, the agent and CLI
// binaries built once per test binary, a skip-or-fail rule for hosts without
// QEMU, one booted VM shared by every test that does not need its own, and
// helpers that poll for a condition until a deadline.
//
// A test package that uses SharedVM or the builds calls Main from its
// TestMain:
//
//	func TestMain(m *testing.M) { testutil.Main(m) }
package testutil

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/leaks"
)

// BootTimeout is how long tests let a guest take to boot. TCG boots take
// about 4 s on an idle host and far longer on a loaded one.
const BootTimeout = 3 * time.Minute

// QEMUBinary is the emulator the tests need.
const QEMUBinary = "qemu-system-x86_64"

var (
	tmpMu   sync.Mutex
	tmpDirs []string // removed by Main after the tests

	guardHome string // SMOLVM_HOME while tests run: catches stray defaults
)

// Main runs the package's tests, then closes the shared VM and removes
// what the helpers built. It points SMOLVM_HOME at a throw-away folder, so
// that code falling back to the default state folder never touches the
// user's VMs.
func Main(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if dir, err := os.MkdirTemp("", "smvg"); err == nil {
		guardHome = dir
		if err := os.Setenv("SMOLVM_HOME", dir); err != nil {
			fmt.Fprintln(os.Stderr, "testutil:", err)
			return 1
		}
		addTemp(dir)
	}
	code := m.Run()
	if err := closeShared(); err != nil {
		fmt.Fprintln(os.Stderr, "testutil: close the shared VM:", err)
		if code == 0 {
			code = 1
		}
	}
	if guardHome != "" {
		// Nothing may have been created in the default state folder.
		if ents, _ := os.ReadDir(filepath.Join(guardHome, "vms")); len(ents) > 0 {
			fmt.Fprintf(os.Stderr, "testutil: %d VM folders were left in the default state folder %s\n", len(ents), guardHome)
			if code == 0 {
				code = 1
			}
		}
		_, _ = smolvm.Cleanup(context.Background(), smolvm.CleanupOptions{Home: guardHome, All: true})
	}
	tmpMu.Lock()
	for _, d := range tmpDirs {
		_ = os.RemoveAll(d)
	}
	tmpMu.Unlock()
	removeOwnHostDir()
	return code
}

func addTemp(dir string) {
	tmpMu.Lock()
	tmpDirs = append(tmpDirs, dir)
	tmpMu.Unlock()
}

// NeedQEMU skips a real-VM test in -short mode or on a host without QEMU.
// With $CI set a missing QEMU fails the test instead: CI must never skip
// silently.
func NeedQEMU(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a real VM: skipped in -short mode")
	}
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not found and CI is set: real-VM tests must run in CI (install qemu-system-x86)", QEMUBinary)
		}
		t.Skipf("%s not found: install qemu-system-x86 (or run 'smolvm setup') to run real-VM tests", QEMUBinary)
	}
}

// RepoRoot is the module's root folder.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

type build struct {
	once sync.Once
	path string
	err  error
}

var agentBuild, cliBuild build

// ensureBuilt returns $env when it is set, else builds pkg once per test
// binary and sets $env to the result.
func ensureBuilt(t testing.TB, b *build, env, pkg, name string, extraEnv ...string) string {
	t.Helper()
	b.once.Do(func() {
		if p := os.Getenv(env); p != "" {
			if _, err := os.Stat(p); err != nil {
				b.err = fmt.Errorf("$%s: %w", env, err)
				return
			}
			b.path, _ = filepath.Abs(p)
			return
		}
		dir, err := os.MkdirTemp("", "smvbin")
		if err != nil {
			b.err = err
			return
		}
		addTemp(dir)
		out := filepath.Join(dir, name)
		cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
		cmd.Dir = RepoRoot()
		cmd.Env = append(os.Environ(), extraEnv...)
		if msg, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %w\n%s", pkg, err, msg)
			return
		}
		b.path = out
		if err := os.Setenv(env, out); err != nil {
			b.err = err
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// Agent returns the static guest agent ($SMOLVM_AGENT, or built once).
func Agent(t testing.TB) string {
	t.Helper()
	return ensureBuilt(t, &agentBuild, "SMOLVM_AGENT", "./cmd/smolvm-agent", "smolvm-agent", "CGO_ENABLED=0", "GOFLAGS=-tags=grpcnotrace")
}

// Binary returns the smolvm CLI ($SMOLVM_BIN, or built once).
func Binary(t testing.TB) string {
	t.Helper()
	return ensureBuilt(t, &cliBuild, "SMOLVM_BIN", "./cmd/smolvm", "smolvm")
}

// CacheDir is the image cache shared by every test home on this machine.
func CacheDir() string {
	if d := os.Getenv("SMOLVM_TEST_CACHE"); d != "" {
		return d
	}
	return "/var/tmp/smolvm-test-cache"
}

var image struct {
	once sync.Once
	err  error
}

// ensureImage builds the default image into the shared cache, once per test
// binary (the cache makes later calls from other binaries cheap).
func ensureImage(t testing.TB, home string) {
	t.Helper()
	Agent(t)
	image.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		_, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home, NoWarm: true, InstallPackages: os.Geteuid() == 0})
		if err != nil {
			image.err = fmt.Errorf("prepare the default image: %w", err)
		}
	})
	if image.err != nil {
		t.Fatal(image.err)
	}
}

// Home returns a fresh, short state folder whose image cache is the shared
// one, with the default image ready. When the test ends every VM in it is
// removed, the test fails if a QEMU or supervisor process of it is left,
// and the folder is deleted.
func Home(t testing.TB) string {
	t.Helper()
	NeedQEMU(t)
	home := newHome(t)
	t.Cleanup(func() { removeHome(t, home) })
	ensureImage(t, home)
	return home
}

func newHome(t testing.TB) string {
	t.Helper()
	cache := CacheDir()
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatalf("shared image cache: %v (set SMOLVM_TEST_CACHE to a writable folder)", err)
	}
	home, err := os.MkdirTemp("", "smv")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(cache, filepath.Join(home, "cache")); err != nil {
		os.RemoveAll(home)
		t.Fatal(err)
	}
	return home
}

func removeHome(t testing.TB, home string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home, All: true}); err != nil {
		t.Errorf("cleanup of %s: %v", home, err)
	}
	if left := WaitNoProcesses(home, 30*time.Second); len(left) > 0 {
		t.Errorf("processes of %s left after cleanup: %s", home, strings.Join(left, "; "))
		for _, p := range left {
			if pid, err := strconv.Atoi(strings.Fields(p)[0]); err == nil {
				_ = killPid(pid)
			}
		}
	}
	if err := os.RemoveAll(home); err != nil {
		t.Errorf("remove %s: %v", home, err)
	}
}

// Processes lists the live QEMU and supervisor processes that belong to
// home, each as "PID command line" (see leaks.Processes).
func Processes(home string) []string { return leaks.Processes(home) }

// WaitNoProcesses polls until no process of home is left or timeout
// passes, and returns those still there.
func WaitNoProcesses(home string, timeout time.Duration) []string {
	var left []string
	_ = Poll(timeout, func() bool {
		left = Processes(home)
		return len(left) == 0
	})
	return left
}

// Poll calls cond every few milliseconds until it is true (nil) or timeout
// passes (an error).
func Poll(timeout time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	delay := 5 * time.Millisecond
	for {
		if cond() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("condition not met within %s", timeout)
		}
		time.Sleep(delay)
		if delay < 200*time.Millisecond {
			delay *= 2
		}
	}
}

// PidAlive tells whether a process exists and is not a zombie.
func PidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z'
	}
	return true
}

// Context is a context that ends with the test (or after d).
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// SyncBuffer is a bytes.Buffer that one goroutine may write while another
// reads it (the output of a process a test watches).
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// hosts are the state folders tests opened, one Host per test and folder.
var hosts = struct {
	sync.Mutex
	m map[hostKey]*smolvm.Host
}{m: map[hostKey]*smolvm.Host{}}

type hostKey struct {
	t    testing.TB
	home string
}

// OpenHost returns the Host of state folder home for a test (the same one
// for every call of the test); it is closed when the test ends.
func OpenHost(t testing.TB, home string) *smolvm.Host {
	t.Helper()
	k := hostKey{t, home}
	hosts.Lock()
	defer hosts.Unlock()
	if h := hosts.m[k]; h != nil {
		return h
	}
	h, err := smolvm.OpenHost(home)
	if err != nil {
		t.Fatalf("open state folder: %v", err)
	}
	hosts.m[k] = h
	t.Cleanup(func() {
		hosts.Lock()
		delete(hosts.m, k)
		hosts.Unlock()
		_ = h.Close()
	})
	return h
}
