package smolvm_test

// Real-VM tests of snapshots of VMs booted from a disk image: the snapshot
// holds the disk as the saved memory knows it (a frozen copy of the VM's
// overlay, not of the image), clones restored from it at once each get a
// disk of their own, the source goes on, a clone of a clone does not
// depend on the first snapshot, a stopped clone boots from its own disk,
// and the snapshot and the image are kept while anything needs them. A
// shared (read-only) disk is snapshotted by reference; a writable disk of
// the caller's is refused. BenchmarkSnapshotDisk measures the snapshot
// and the restore.
//
// The guest is the Debian image of the python recipe, built once in the
// shared test cache (TestDebianPython builds the same one).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// debianImage builds (or takes from the shared cache) the Debian image of
// the python recipe into home as imgName.
func debianImage(t testing.TB, home, imgName string) *smolvm.ImageInfo {
	t.Helper()
	needRoot(t)
	if _, err := os.Stat("/usr/bin/mmdebstrap"); err != nil {
		t.Skip("mmdebstrap not installed (apt-get install mmdebstrap)")
	}
	opts := smolvm.Recipes()["python"]
	opts.Home, opts.Name = home, imgName
	info, err := smolvm.BuildImage(testutil.Context(t, 30*time.Minute), opts)
	if err != nil {
		t.Fatalf("build the Debian image: %v", err)
	}
	return info
}

// restoreClone starts a clone of snapshot in home; it is deleted when the
// test ends.
func restoreClone(t *testing.T, home, snapshot string, cfg smolvm.Config) *smolvm.VM {
	t.Helper()
	cfg.Home, cfg.BootTimeout = home, testutil.BootTimeout
	if cfg.Persistent {
		cfg.SupervisorBinary = testutil.Binary(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.BootTimeout+time.Minute)
	defer cancel()
	vm, err := smolvm.Restore(ctx, snapshot, cfg)
	if err != nil {
		t.Fatalf("Restore %s as %s: %v", snapshot, cfg.Name, err)
	}
	t.Cleanup(func() {
		if cfg.Persistent {
			_ = vm.Delete(context.Background())
		}
		vm.Close()
	})
	return vm
}

// qemuImgInfo is what `qemu-img info` says of a disk file.
type qemuImgInfo struct {
	Format        string `json:"format"`
	BackingFile   string `json:"full-backing-filename"`
	BackingFormat string `json:"backing-filename-format"`
	VirtualSize   int64  `json:"virtual-size"`
}

func imgInfo(t *testing.T, path string) qemuImgInfo {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	var in qemuImgInfo
	if err := json.Unmarshal(out, &in); err != nil {
		t.Fatal(err)
	}
	return in
}

// checkFrozenDisk checks a snapshot's frozen disk: a consistent qcow2
// backed by the image itself, small (the VM's changes only) and read-only.
func checkFrozenDisk(t *testing.T, sn *smolvm.SnapshotInfo, img *smolvm.ImageInfo) {
	t.Helper()
	disk := filepath.Join(sn.Dir, "disk0.qcow2")
	in := imgInfo(t, disk)
	if in.Format != "qcow2" || in.BackingFile != img.Rootfs {
		t.Errorf("%s: %+v, want a qcow2 backed by the image %s", disk, in, img.Rootfs)
	}
	if out, err := exec.Command("qemu-img", "check", "-U", disk).CombinedOutput(); err != nil {
		t.Errorf("qemu-img check %s: %v\n%s", disk, err, out)
	}
	if sn.DiskBytes <= 0 || sn.DiskBytes > 128<<20 || sn.DiskBytes > img.DiskUsage/4 {
		t.Errorf("snapshot %s: disk takes %d bytes (image: %d): want only the VM's changes", sn.Name, sn.DiskBytes, img.DiskUsage)
	}
	if fi, err := os.Stat(disk); err != nil || fi.Mode().Perm()&0o222 != 0 {
		t.Errorf("%s: %v, %v: want a read-only file", disk, fi.Mode(), err)
	}
}

func TestSnapshotDisk(t *testing.T) {
	home := testutil.Home(t)
	img := debianImage(t, home, "deb")
	ctx := testutil.Context(t, 20*time.Minute)
	logw := logFilter{t: t, match: "snapshot saved"}
	src := bootImage(t, smolvm.Config{Home: home, Image: "deb", Name: "source", Logger: slog.New(slog.NewTextHandler(&logw, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if got := sh(t, src, "awk '$2 == \"/\" {r = $1 \" \" substr($4, 1, 2)} END {print r}' /proc/mounts"); got != "/dev/vda rw" {
		t.Fatalf("source root: %q, want /dev/vda read-write", got)
	}
	// /root/big is synced: it is on the disk. /root/a.txt and /root/late
	// are not: they are in the guest's page cache, which is in the saved
	// memory; a clone writes them to its own disk later.
	sum := sh(t, src, "head -c 16M /dev/urandom > /root/big; sync; echo snapshot-time > /root/a.txt; head -c 4M /dev/urandom > /root/late; sha256sum /root/big /root/late | cut -c1-64")

	t0 := time.Now()
	info, err := src.Snapshot(ctx, "d1")
	if err != nil {
		t.Fatalf("Snapshot of a disk VM: %v", err)
	}
	t.Logf("snapshot of a disk VM: %s (memory %d MB, disk %d MB)", time.Since(t0).Round(time.Millisecond), info.MemoryBytes>>20, info.DiskBytes>>20)
	checkFrozenDisk(t, info, img)
	if info.DiskBytes < 16<<20 {
		t.Errorf("the snapshot's disk takes %d bytes: /root/big (16 MiB, synced) is not in it", info.DiskBytes)
	}

	// The source goes on, on its own disk.
	if got := sh(t, src, "cat /root/a.txt; sha256sum /root/big /root/late | cut -c1-64"); got != "snapshot-time\n"+sum {
		t.Errorf("source after the snapshot: %q", got)
	}
	sh(t, src, "echo after > /root/a.txt; echo mine > /root/src.txt; sync")

	// Two clones at once, each on a disk of its own; clone1 is persistent
	// (a detached supervisor makes its disk).
	clones := make([]*smolvm.VM, 2)
	var wg sync.WaitGroup
	for i, cfg := range []smolvm.Config{{Name: "clone0"}, {Name: "clone1", Persistent: true}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			clones[i] = restoreClone(t, home, "d1", cfg)
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	mids := map[string]bool{}
	for _, c := range clones {
		// Written out and read back from the clone's disk (overlay,
		// snapshot's disk, image), not from the page cache.
		if got := sh(t, c, "sync; echo 3 > /proc/sys/vm/drop_caches; cat /root/a.txt; sha256sum /root/big /root/late | cut -c1-64; test -e /root/src.txt && echo src-file; hostname"); got != "snapshot-time\n"+sum+"\n"+c.Name() {
			t.Errorf("%s: %q, want the snapshot's files and its own hostname", c.Name(), got)
		}
		if _, err := os.Stat(filepath.Join(c.Dir(), "disk.qcow2")); err != nil {
			t.Errorf("%s: overlay: %v", c.Name(), err)
		} else if in := imgInfo(t, filepath.Join(c.Dir(), "disk.qcow2")); in.BackingFile != filepath.Join(info.Dir, "disk0.qcow2") {
			t.Errorf("%s: overlay backed by %s, want the snapshot's disk", c.Name(), in.BackingFile)
		}
		mids[sh(t, c, "cat /etc/machine-id")] = true
	}
	if len(mids) != 2 {
		t.Errorf("the clones share a machine id: %v", mids)
	}

	// Independent disks: clone0's file is seen by neither clone1 nor the
	// source; the source's later writes are seen by no clone.
	sh(t, clones[0], "echo from-clone0 > /root/b.txt; sync")
	for _, vm := range []*smolvm.VM{clones[1], src} {
		if got := sh(t, vm, "cat /root/b.txt 2>/dev/null || echo absent"); got != "absent" {
			t.Errorf("%s sees clone0's /root/b.txt: %q", vm.Name(), got)
		}
	}
	if got := sh(t, src, "cat /root/a.txt /root/src.txt"); got != "after\nmine" {
		t.Errorf("source: %q", got)
	}
	// A heavier write on a clone: its disk, not the snapshot's, grows.
	frozen := filepath.Join(info.Dir, "disk0.qcow2")
	before, _ := os.Stat(frozen)
	sh(t, clones[1], "head -c 32M /dev/zero | tr '\\0' x > /root/c.txt; sync; rm /root/big; sync")
	if after, _ := os.Stat(frozen); !after.ModTime().Equal(before.ModTime()) || after.Size() != before.Size() {
		t.Errorf("a clone's writes changed the snapshot's disk")
	}

	// The snapshot and the image are in use.
	if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "d1"); !errors.Is(err, smolvm.ErrInUse) {
		t.Errorf("DeleteSnapshot while clones run: %v, want ErrInUse", err)
	}
	if err := testutil.OpenHost(t, home).RemoveImage(ctx, "deb"); !errors.Is(err, smolvm.ErrInUse) {
		t.Errorf("image rm while clones run: %v, want ErrInUse", err)
	}

	t.Run("CloneOfClone", func(t *testing.T) {
		// A snapshot of a clone holds the first snapshot's data but does
		// not depend on its files: it is rebased onto the image.
		info2, err := clones[0].Snapshot(ctx, "d2")
		if err != nil {
			t.Fatalf("Snapshot of a clone: %v", err)
		}
		checkFrozenDisk(t, info2, img)
		c := restoreClone(t, home, "d2", smolvm.Config{Name: "clone2"})
		if got := sh(t, c, "echo 3 > /proc/sys/vm/drop_caches; cat /root/a.txt /root/b.txt; sha256sum /root/big /root/late | cut -c1-64"); got != "snapshot-time\nfrom-clone0\n"+sum {
			t.Errorf("clone of a clone: %q", got)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "d2"); err != nil {
			t.Errorf("DeleteSnapshot d2: %v", err)
		}
	})

	t.Run("StopStart", func(t *testing.T) {
		// A stopped clone starts again from its own disk (a boot: its disk
		// has moved on from the snapshot's memory).
		c := clones[1]
		sh(t, c, "echo kept > /root/kept.txt; sync")
		if err := c.Stop(ctx); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		// Stopped, the clone still needs the snapshot's disk.
		if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "d1"); !errors.Is(err, smolvm.ErrInUse) || !strings.Contains(err.Error(), "clone1") {
			t.Errorf("DeleteSnapshot while a stopped clone has its disk: %v, want ErrInUse naming clone1", err)
		}
		if err := c.Start(ctx); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if got := sh(t, c, "cat /root/a.txt /root/kept.txt; hostname; test -e /root/big || echo big-gone"); got != "snapshot-time\nkept\nclone1\nbig-gone" {
			t.Errorf("clone started again: %q", got)
		}
		in, err := c.Info(ctx)
		if err != nil || in.Snapshot != "d1" {
			t.Errorf("Info: %+v, %v", in, err)
		}
	})

	// Source and clones still work, then the clones go and the snapshot
	// can be deleted, leaving nothing behind.
	for _, vm := range append([]*smolvm.VM{src}, clones...) {
		if got := sh(t, vm, "echo ok"); got != "ok" {
			t.Errorf("%s: %q", vm.Name(), got)
		}
	}
	if err := clones[0].Close(); err != nil {
		t.Error(err)
	}
	if err := clones[1].Delete(ctx); err != nil {
		t.Error(err)
	}
	if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "d1"); err != nil {
		t.Fatalf("DeleteSnapshot after the clones are gone: %v", err)
	}
	if _, err := os.Stat(info.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot folder %s is still there: %v", info.Dir, err)
	}
	if left, _ := os.ReadDir(filepath.Join(home, "snapshots")); len(left) > 0 {
		t.Errorf("snapshots left: %v", left)
	}
	vms, _ := os.ReadDir(filepath.Join(home, "vms"))
	if len(vms) != 1 || vms[0].Name() != src.ID() {
		var names []string
		for _, v := range vms {
			names = append(names, v.Name())
		}
		t.Errorf("VM folders left: %v, want the source's alone", names)
	}
	// With the snapshot gone, only the source holds the image.
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if err := testutil.OpenHost(t, home).RemoveImage(ctx, "deb"); err != nil {
		t.Errorf("image rm after everything is gone: %v", err)
	}
}

// TestSnapshotDiskImageInUse checks that a snapshot alone (no VM left)
// keeps its image: its frozen disk is backed by it.
func TestSnapshotDiskImageInUse(t *testing.T) {
	home := testutil.Home(t)
	debianImage(t, home, "deb")
	ctx := testutil.Context(t, 10*time.Minute)
	src := bootImage(t, smolvm.Config{Home: home, Image: "deb"})
	if _, err := src.Snapshot(ctx, "only"); err != nil {
		t.Fatal(err)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	// The snapshot does not need its source.
	c := restoreClone(t, home, "only", smolvm.Config{})
	if got := sh(t, c, "echo ok"); got != "ok" {
		t.Errorf("clone of a deleted VM: %q", got)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	err := testutil.OpenHost(t, home).RemoveImage(ctx, "deb")
	if !errors.Is(err, smolvm.ErrInUse) || !strings.Contains(err.Error(), "snapshot only") {
		t.Errorf("image rm while a snapshot needs it: %v, want ErrInUse naming the snapshot", err)
	}
	if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "only"); err != nil {
		t.Fatal(err)
	}
	if err := testutil.OpenHost(t, home).RemoveImage(ctx, "deb"); err != nil {
		t.Errorf("image rm after the snapshot is gone: %v", err)
	}
}

// TestSnapshotSharedDisk snapshots a VM whose root is the read-only image
// (shared mode): the snapshot refers to the image, copies nothing.
func TestSnapshotSharedDisk(t *testing.T) {
	home := testutil.Home(t)
	debianImage(t, home, "deb")
	ctx := testutil.Context(t, 10*time.Minute)
	src := bootImage(t, smolvm.Config{Home: home, Image: "deb", DiskMode: smolvm.DiskShared})
	sh(t, src, "echo in-memory > /tmp/x")
	info, err := src.Snapshot(ctx, "ro")
	if err != nil {
		t.Fatalf("Snapshot of a shared-disk VM: %v", err)
	}
	if info.DiskBytes != 0 {
		t.Errorf("a shared-disk snapshot copied %d bytes of disk", info.DiskBytes)
	}
	c := restoreClone(t, home, "ro", smolvm.Config{Name: "roclone"})
	if got := sh(t, c, "cat /tmp/x; hostname; awk '$2 == \"/\" {r = substr($4, 1, 2)} END {print r}' /proc/mounts"); got != "in-memory\nroclone\nro" {
		t.Errorf("clone of a shared-disk VM: %q", got)
	}
	// The image has no /etc/machine-id and the root is read-only: the
	// clone's new id is in /run.
	if got := sh(t, c, "cat /etc/machine-id 2>/dev/null || cat /run/machine-id"); len(got) != 32 {
		t.Errorf("clone's machine id: %q", got)
	}
	if err := testutil.OpenHost(t, home).RemoveImage(ctx, "deb"); !errors.Is(err, smolvm.ErrInUse) {
		t.Errorf("image rm while a clone runs: %v, want ErrInUse", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "ro"); err != nil {
		t.Errorf("DeleteSnapshot: %v", err)
	}
}

// BenchmarkSnapshotDisk measures, for a VM of the Debian image and (for
// comparison) a VM of the default image, memory only, the snapshot (the
// call: the source is paused, saved, resumed and reconnected) and a
// restore (create → first command output):
//
//	go test -run '^$' -bench SnapshotDisk -benchtime 3x .
//
// The supervisors' debug lines (with -v) say where the time goes: memory,
// disk copy (paused), resume and disk finish of a snapshot; the overlay of
// a clone.
func BenchmarkSnapshotDisk(b *testing.B) {
	home := testutil.Home(b)
	debianImage(b, home, "deb")
	ctx := testutil.Context(b, 20*time.Minute)
	logger := func(match string) *slog.Logger {
		return slog.New(slog.NewTextHandler(&logFilter{t: b, match: match}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	for _, c := range []struct{ name, image string }{{"debian-disk", "deb"}, {"default-memory", ""}} {
		// The source boots once, outside the timed loop.
		src := bootImage(b, smolvm.Config{Home: home, Image: c.image, Logger: logger("snapshot saved")})
		sh(b, src, "echo x > /root/x")
		i := 0
		b.Run(c.name, func(b *testing.B) {
			var snaps, restores time.Duration
			for b.Loop() {
				i++
				name := fmt.Sprintf("t%s%d", c.image, i)
				t0 := time.Now()
				if _, err := src.Snapshot(ctx, name); err != nil {
					b.Fatal(err)
				}
				snaps += time.Since(t0)
				t1 := time.Now()
				clone, err := smolvm.Restore(ctx, name, smolvm.Config{Home: home, BootTimeout: testutil.BootTimeout, Logger: logger("overlays made")})
				if err != nil {
					b.Fatal(err)
				}
				res, err := clone.Run(ctx, "cat /root/x")
				restores += time.Since(t1)
				if err != nil || string(res.Stdout) != "x\n" {
					b.Errorf("clone: %+v, %v", res, err)
				}
				if err := clone.Close(); err != nil {
					b.Fatal(err)
				}
				if err := testutil.OpenHost(b, home).DeleteSnapshot(ctx, name); err != nil {
					b.Fatal(err)
				}
			}
			ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / float64(b.N) }
			b.ReportMetric(ms(snaps), "snapshot-ms")
			b.ReportMetric(ms(restores), "restore-to-first-output-ms")
		})
		if err := src.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// logFilter passes the log lines that contain match to t.Log.
type logFilter struct {
	t     testing.TB
	match string
}

func (w *logFilter) Write(p []byte) (int, error) {
	if strings.Contains(string(p), w.match) {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// TestSnapshotCallerDiskRefused: a writable disk of the caller's
// (Config.RootfsPath) would have to be copied whole: the snapshot is
// refused with what to do instead, and leaves nothing behind.
func TestSnapshotCallerDiskRefused(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	disk := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	vm := newVM(t, smolvm.Config{Home: home, RootfsPath: disk})
	_, err := vm.Snapshot(ctx, "nope")
	if !errors.Is(err, smolvm.ErrUnsupported) || !strings.Contains(err.Error(), "disk image") {
		t.Errorf("Snapshot of a VM with a caller's writable disk: %v, want ErrUnsupported naming disk images", err)
	}
	if sns, err := testutil.OpenHost(t, home).Snapshots(ctx); err != nil || len(sns) != 0 {
		t.Errorf("snapshots after a refused one: %v, %v", sns, err)
	}
	if left, _ := os.ReadDir(filepath.Join(home, "snapshots")); len(left) > 0 {
		t.Errorf("files left in snapshots/: %v", left)
	}
	if got := sh(t, vm, "echo ok"); got != "ok" {
		t.Errorf("VM after a refused snapshot: %q", got)
	}
}
