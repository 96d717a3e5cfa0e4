package image

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"sort"
	"strings"

	"github.com/cavaliergopher/cpio"

	"github.com/smolvm/smolvm/internal/wire"
)

// DefaultBusybox is where Debian's busybox-static installs busybox.
const DefaultBusybox = "/bin/busybox"

// ModuleListPath is the file in the initramfs that lists the module files in
// load order, one absolute path a line.
const ModuleListPath = wire.ModulesPath

// initramfsSpec is what goes into the archive.
type initramfsSpec struct {
	Agent   string      // host path of the agent, becomes /init
	Busybox string      // host path of a static busybox
	Applets []string    // busybox --list-full output, e.g. "bin/ls"
	Modules []kernelMod // load order
}

// Directories created in the guest (besides parents of files).
var initramfsDirs = []struct {
	name string
	mode cpio.FileMode
}{
	{"bin", 0o755}, {"sbin", 0o755}, {"usr", 0o755}, {"usr/bin", 0o755}, {"usr/sbin", 0o755},
	{"lib", 0o755}, {"lib/modules", 0o755}, {"etc", 0o755}, {"etc/smolvm", 0o755},
	{"proc", 0o555}, {"sys", 0o555}, {"dev", 0o755}, {"tmp", 0o1777}, {"run", 0o755},
	{"root", 0o700}, {"mnt", 0o755}, {"var", 0o755}, {"var/tmp", 0o1777},
}

// bashShim is the default image's /bin/bash: busybox has no bash, but
// clients written for other sandboxes (the e2b SDK runs every command as
// `/bin/bash -l -c CMD`) expect one. It hands its arguments to busybox's
// shell, which takes -l (login: reads /etc/profile, absent here) and -c.
const bashShim = "#!/bin/sh\n# smolvm: the default image has no bash; busybox's shell runs the command.\nexec /bin/sh \"$@\"\n"

var etcFiles = []struct{ name, content string }{
	{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"},
	{"etc/group", "root:x:0:\n"},
	{"etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"},
	{"etc/nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"},
}

// writeInitramfs writes the newc archive for spec to w. The output depends
// only on the inputs (timestamps are zero), so equal inputs give equal bytes.
func writeInitramfs(w io.Writer, spec initramfsSpec) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	cw := cpio.NewWriter(bw)
	seen := map[string]bool{}
	add := func(h *cpio.Header, data []byte) error {
		seen[h.Name] = true
		if err := cw.WriteHeader(h); err != nil {
			return fmt.Errorf("write initramfs entry %s: %w", h.Name, err)
		}
		if len(data) > 0 {
			if _, err := cw.Write(data); err != nil {
				return fmt.Errorf("write initramfs entry %s: %w", h.Name, err)
			}
		}
		return nil
	}
	dir := func(name string, mode cpio.FileMode) error {
		return add(&cpio.Header{Name: name, Mode: cpio.TypeDir | mode, Links: 2}, nil)
	}
	file := func(name string, mode cpio.FileMode, data []byte) error {
		return add(&cpio.Header{Name: name, Mode: cpio.TypeReg | mode, Size: int64(len(data)), Links: 1}, data)
	}
	for _, d := range initramfsDirs {
		if err := dir(d.name, d.mode); err != nil {
			return err
		}
	}
	agent, err := os.ReadFile(spec.Agent)
	if err != nil {
		return fmt.Errorf("read guest agent: %w", err)
	}
	if err := file("init", 0o755, agent); err != nil {
		return err
	}
	bb, err := os.ReadFile(spec.Busybox)
	if err != nil {
		return fmt.Errorf("read busybox: %w: run 'apt-get install busybox-static'", err)
	}
	if err := file("bin/busybox", 0o755, bb); err != nil {
		return err
	}
	if err := file("bin/bash", 0o755, []byte(bashShim)); err != nil {
		return err
	}
	for _, f := range etcFiles {
		if err := file(f.name, 0o644, []byte(f.content)); err != nil {
			return err
		}
	}
	var list strings.Builder
	for _, m := range spec.Modules {
		data, err := m.content()
		if err != nil {
			return err
		}
		p := "lib/modules/" + m.Name + ".ko"
		if err := file(p, 0o644, data); err != nil {
			return err
		}
		list.WriteString("/" + p + "\n")
	}
	if err := file(strings.TrimPrefix(ModuleListPath, "/"), 0o644, []byte(list.String())); err != nil {
		return err
	}
	for _, a := range spec.Applets {
		a = strings.TrimPrefix(path.Clean("/"+a), "/")
		switch path.Dir(a) {
		case "bin", "sbin", "usr/bin", "usr/sbin":
		default:
			continue // e.g. "linuxrc": not wanted at the root
		}
		if seen[a] {
			continue
		}
		// newc stores a symlink's target as its data.
		target := "/bin/busybox"
		if err := add(&cpio.Header{Name: a, Mode: cpio.TypeSymlink | 0o777, Size: int64(len(target)), Links: 1}, []byte(target)); err != nil {
			return err
		}
	}
	if err := cw.Close(); err != nil {
		return fmt.Errorf("finish initramfs: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return nil
}

// checkStatic returns an error unless path is a statically linked ELF file.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("busybox at %s unusable: %w: run 'apt-get install busybox-static'", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox at %s is dynamically linked, the guest needs a static one: run 'apt-get install busybox-static'", path)
		}
	}
	return nil
}

// busyboxApplets returns the applet paths busybox reports, sorted.
func busyboxApplets(ctx context.Context, busybox string) ([]string, error) {
	out, err := exec.CommandContext(ctx, busybox, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list-full: %w: reinstall busybox-static", busybox, err)
	}
	var applets []string
	for _, l := range bytes.Split(out, []byte("\n")) {
		if s := strings.TrimSpace(string(l)); s != "" {
			applets = append(applets, s)
		}
	}
	if len(applets) == 0 {
		return nil, fmt.Errorf("%s --list-full listed no applets: reinstall busybox-static", busybox)
	}
	sort.Strings(applets)
	return applets, nil
}
