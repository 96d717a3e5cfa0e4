package engine

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// AccelReport says which accelerator VMs use on this host, and why.
type AccelReport struct {
	Accel  string `json:"accel"`
	Reason string `json:"reason"`
	Cached bool   `json:"cached"`
}

type probeRecord struct {
	Key    string `json:"key"`
	KVM    bool   `json:"kvm"`
	Reason string `json:"reason"`
}

// kvmProbeTimeout bounds the KVM boot probe. A working KVM boots the
// default image far faster; a broken one (a nested hypervisor that does not
// boot standard kernels) hangs, and the probe gives up.
const kvmProbeTimeout = 20 * time.Second

// ResolveAccel picks the accelerator of a VM of hypervisor driver: want
// ("kvm", "tcg"), else KVM when the probe of this kernel and initrd
// (ProbeAccel) booted with it.
func ResolveAccel(ctx context.Context, home, driver, want, kernel, initrd string, log *slog.Logger) (hypervisor.Accel, error) {
	switch want {
	case "tcg":
		return hypervisor.AccelTCG, nil
	case "kvm":
		if err := kvmDeviceUsable(); err != nil {
			return "", fmt.Errorf("%w: accel kvm: %w", errdefs.ErrUnsupported, err)
		}
		return hypervisor.AccelKVM, nil
	}
	rep := probeAccel(ctx, home, driver, kernel, initrd)
	if rep.Accel == "kvm" {
		return hypervisor.AccelKVM, nil
	}
	log.Debug("using TCG software emulation", "reason", rep.Reason)
	return hypervisor.AccelTCG, nil
}

// The KVM probe's seams: the unit tests replace the device check and the
// test boot.
var (
	kvmUsable = kvmDeviceUsable
	kvmBoot   = supervisor.Probe
)

func kvmDeviceUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable (%w): enable virtualization or add your user to the kvm group", err)
	}
	f.Close()
	return nil
}

// ProbeAccel decides between KVM and TCG for this kernel: KVM only when
// /dev/kvm opens and a real boot with it reaches the guest agent. The
// result is cached in home's cache per kernel, initrd and QEMU binary; a
// probe that ctx cancelled (or whose deadline passed) decided nothing and
// is not cached.
func ProbeAccel(ctx context.Context, home, kernel, initrd string) AccelReport {
	return probeAccel(ctx, home, hypervisor.Default, kernel, initrd)
}

// probeAccel is ProbeAccel for the hypervisor driver named driver.
func probeAccel(ctx context.Context, home, driver, kernel, initrd string) AccelReport {
	if err := kvmUsable(); err != nil {
		return AccelReport{Accel: "tcg", Reason: err.Error()}
	}
	d, err := hypervisor.Get(driver)
	if err != nil {
		return AccelReport{Accel: "tcg", Reason: err.Error()}
	}
	// The driver's program (QEMU's binary) by its file (CacheKey), which
	// an upgrade replaces, so the key changes.
	key := probeKey(kernel, initrd, d.CacheKey())
	path := filepath.Join(home, "cache", "accel-probe.json")
	var rec probeRecord
	if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &rec) == nil && rec.Key == key {
		return report(rec, true)
	}
	dir, err := os.MkdirTemp(home, "probe-")
	if err != nil {
		return AccelReport{Accel: "tcg", Reason: "cannot run the KVM probe: " + err.Error()}
	}
	defer os.RemoveAll(dir)
	mc := &hypervisor.MachineConfig{
		ID: "kvm-probe", Dir: dir, Kernel: kernel, Initrd: initrd, Cmdline: KernelCmdline("probe", hypervisor.AccelKVM, ""),
		VCPUs: 1, MemoryMiB: 256, Accel: hypervisor.AccelKVM, Channel: hypervisor.ChannelVirtioSerial,
		ConsoleLog: filepath.Join(dir, "console.log"),
	}
	rec = probeRecord{Key: key, KVM: true, Reason: "a test boot with KVM reached the guest agent"}
	if err := kvmBoot(ctx, driver, mc, kvmProbeTimeout); err != nil {
		if cerr := context.Cause(ctx); cerr != nil {
			return AccelReport{Accel: "tcg", Reason: fmt.Sprintf("the KVM probe was interrupted (%v): using TCG software emulation this time", cerr)}
		}
		rec = probeRecord{Key: key, Reason: fmt.Sprintf("a test boot with KVM failed (%v): using TCG software emulation", err)}
	}
	if b, err := json.Marshal(rec); err == nil {
		_ = os.MkdirAll(filepath.Dir(path), 0o700)
		_ = os.WriteFile(path, b, 0o600)
	}
	return report(rec, false)
}

func report(rec probeRecord, cached bool) AccelReport {
	r := AccelReport{Accel: "tcg", Reason: rec.Reason, Cached: cached}
	if rec.KVM {
		r.Accel = "kvm"
	}
	return r
}

// probeKey identifies a KVM probe's kernel, initrd and QEMU binary by path,
// size, modification time and inode.
func probeKey(kernel, initrd, qemuBin string) string {
	h := sha256.New()
	for _, p := range []string{kernel, initrd, qemuBin} {
		fi, err := os.Stat(p)
		if err != nil {
			fmt.Fprintf(h, "%s|missing|", p)
			continue
		}
		var ino uint64
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			ino = st.Ino
		}
		fmt.Fprintf(h, "%s|%d|%d|%d|", p, fi.Size(), fi.ModTime().UnixNano(), ino)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}
