package engine

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor"

	_ "github.com/smolvm/smolvm/internal/hypervisor/qemu" // the driver the probe names
)

// The KVM probe's cached answer is keyed by the files it depends on: the
// same files give the same key, and a replaced QEMU binary (a package
// upgrade writes a new file) or kernel gives another, without running QEMU.
func TestProbeKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p+".new", []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(p+".new", p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kernel, initrd, qemu := write("vmlinux", "k1"), write("initrd", "i1"), write("qemu", "q1")
	k := probeKey(kernel, initrd, qemu)
	if probeKey(kernel, initrd, qemu) != k {
		t.Fatal("key is not deterministic")
	}
	write("qemu", "q2")
	k2 := probeKey(kernel, initrd, qemu)
	if k2 == k {
		t.Error("key unchanged after the QEMU binary was replaced")
	}
	write("vmlinux", "k2")
	if probeKey(kernel, initrd, qemu) == k2 {
		t.Error("key unchanged after the kernel was replaced")
	}
}

// A KVM probe that the caller cancelled, or whose caller's deadline passed,
// decided nothing: it is not cached, and the next create probes again (a
// Ctrl-C during the first New on a KVM host used to pin every later VM to
// TCG). A boot that fails with the caller still waiting is cached, also
// when it is the probe's own timeout that ended it (a hanging KVM).
func TestProbeAccelInterrupted(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd")
	for _, p := range []string{kernel, initrd} {
		if err := os.WriteFile(p, []byte(p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	usable, boot := kvmUsable, kvmBoot
	t.Cleanup(func() { kvmUsable, kvmBoot = usable, boot })
	kvmUsable = func() error { return nil }
	var (
		boots   int
		hang    func() // set: the test boot runs it, then waits for ctx
		bootErr error  // else what the test boot returns
	)
	kvmBoot = func(ctx context.Context, _ string, _ *hypervisor.MachineConfig, _ time.Duration) error {
		boots++
		if hang != nil {
			hang()
			<-ctx.Done()
			return fmt.Errorf("boot: %w", ctx.Err())
		}
		return bootErr
	}
	probe := func(t *testing.T, ctx context.Context, home, wantAccel string, wantCached bool, wantBoots int) {
		t.Helper()
		boots = 0
		rep := ProbeAccel(ctx, home, kernel, initrd)
		if rep.Accel != wantAccel || rep.Cached != wantCached || boots != wantBoots {
			t.Fatalf("ProbeAccel = %+v after %d test boots; want accel %s, cached %v, %d boots", rep, boots, wantAccel, wantCached, wantBoots)
		}
	}
	interrupted := func(t *testing.T, ctx context.Context, cancel func()) {
		home := t.TempDir()
		hang = cancel
		probe(t, ctx, home, "tcg", false, 1)
		hang = nil
		if _, err := os.Stat(filepath.Join(home, "cache", "accel-probe.json")); !os.IsNotExist(err) {
			t.Fatalf("an interrupted probe left a cached answer (stat: %v)", err)
		}
		probe(t, context.Background(), home, "kvm", false, 1) // probed again
		probe(t, context.Background(), home, "kvm", true, 0)  // now cached
	}
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		interrupted(t, ctx, cancel)
	})
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		defer cancel()
		interrupted(t, ctx, func() {}) // the boot waits until the deadline
	})
	t.Run("failed", func(t *testing.T) {
		home := t.TempDir()
		bootErr = fmt.Errorf("the probe's own timeout: %w", context.DeadlineExceeded)
		defer func() { bootErr = nil }()
		probe(t, context.Background(), home, "tcg", false, 1)
		probe(t, context.Background(), home, "tcg", true, 0)
	})
}
