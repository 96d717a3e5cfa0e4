package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ulikunitz/xz"
)

// DefaultModules are the kernel modules the guest asks for, by module name.
// Their dependencies are added automatically. Modules that are built into the
// kernel or missing from it are skipped.
var DefaultModules = []string{
	"virtio_mmio",                // virtio-mmio transport (QEMU -M microvm, Firecracker)
	"virtio_pci",                 // virtio-pci transport (QEMU q35/pc)
	"virtio_console",             // virtio-serial ports (control channel)
	"virtio_blk",                 // disks
	"virtio_net",                 // network
	"virtio_rng",                 // entropy
	"vmw_vsock_virtio_transport", // vsock
	"ext4",                       // root and data disks
	"overlay",                    // writable layers over read-only images
	"virtiofs",                   // host folders (Config.Mounts), with fuse
}

// moduleName normalizes a module file name or path to a module name:
// "kernel/drivers/char/hw_random/virtio-rng.ko.xz" becomes "virtio_rng".
func moduleName(p string) string {
	b := filepath.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// loadOrder returns roots and their transitive dependencies ordered so that
// every module comes after all of its dependencies. deps reports the direct
// dependencies of a module. The result is deterministic for a given input.
func loadOrder(roots []string, deps func(string) ([]string, error)) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(name string, path []string) error
	visit = func(name string, path []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(path, " -> "), name)
		}
		state[name] = visiting
		ds, err := deps(name)
		if err != nil {
			return err
		}
		for _, d := range ds {
			if err := visit(d, append(path, name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, name)
		return nil
	}
	for _, r := range roots {
		if err := visit(r, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// parseModulesDep parses depmod's modules.dep ("path.ko: dep.ko dep2.ko")
// into a map from module name to the names of its direct and indirect
// dependencies (depmod lists the whole closure) and a map from name to path.
func parseModulesDep(r io.Reader) (deps map[string][]string, paths map[string]string, err error) {
	deps = map[string][]string{}
	paths = map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(text, ":")
		if !ok {
			return nil, nil, fmt.Errorf("modules.dep line %d: missing ':' in %q", line, text)
		}
		name := moduleName(mod)
		paths[name] = strings.TrimSpace(mod)
		var ds []string
		for _, f := range strings.Fields(rest) {
			ds = append(ds, moduleName(f))
		}
		deps[name] = ds
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return deps, paths, nil
}

// moduleTree indexes a kernel module tree such as /lib/modules/<version>.
type moduleTree struct {
	dir     string
	paths   map[string]string   // module name -> absolute file path
	builtin map[string]bool     // names listed in modules.builtin
	depmod  map[string][]string // from modules.dep, when present
	cache   map[string][]byte   // decompressed module contents
}

func openModuleTree(dir string) (*moduleTree, error) {
	t := &moduleTree{dir: dir, paths: map[string]string{}, builtin: map[string]bool{}, cache: map[string][]byte{}}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && isModuleFile(d.Name()) {
			if _, dup := t.paths[moduleName(p)]; !dup {
				t.paths[moduleName(p)] = p
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan kernel modules in %s: %w", dir, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			t.builtin[moduleName(l)] = true
		}
	}
	if f, err := os.Open(filepath.Join(dir, "modules.dep")); err == nil {
		deps, _, perr := parseModulesDep(f)
		f.Close()
		if perr != nil {
			return nil, perr
		}
		t.depmod = deps
	}
	return t, nil
}

func isModuleFile(name string) bool {
	for _, ext := range []string{".ko", ".ko.xz", ".ko.gz"} {
		if strings.HasSuffix(name, ext) {
			return true
		}
	}
	return false
}

// content returns the decompressed module file.
func (t *moduleTree) content(name string) ([]byte, error) {
	if b, ok := t.cache[name]; ok {
		return b, nil
	}
	p := t.paths[name]
	raw, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", name, err)
	}
	var r io.Reader
	switch {
	case strings.HasSuffix(p, ".xz"):
		r, err = xz.NewReader(bytes.NewReader(raw))
	case strings.HasSuffix(p, ".gz"):
		r, err = gzip.NewReader(bytes.NewReader(raw))
	}
	if err != nil {
		return nil, fmt.Errorf("decompress module %s: %w", p, err)
	}
	if r != nil {
		if raw, err = io.ReadAll(r); err != nil {
			return nil, fmt.Errorf("decompress module %s: %w", p, err)
		}
	}
	t.cache[name] = raw
	return raw, nil
}

// deps returns the direct dependencies of a module from modules.dep when the
// tree has one, else from the "depends=" entry of the module's .modinfo
// section (Debian's packages ship no modules.dep; depmod makes it on install).
func (t *moduleTree) deps(name string) ([]string, error) {
	if t.depmod != nil {
		if ds, ok := t.depmod[name]; ok {
			return ds, nil
		}
	}
	b, err := t.content(name)
	if err != nil {
		return nil, err
	}
	info, err := modinfo(b)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", name, err)
	}
	var ds []string
	for _, d := range strings.Split(info["depends"], ",") {
		if d = strings.TrimSpace(d); d != "" {
			ds = append(ds, moduleName(d))
		}
	}
	sort.Strings(ds)
	return ds, nil
}

// modinfo parses the key=value strings in an ELF module's .modinfo section.
func modinfo(ko []byte) (map[string]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("not an ELF kernel module: %w", err)
	}
	defer f.Close()
	s := f.Section(".modinfo")
	if s == nil {
		return nil, fmt.Errorf("no .modinfo section")
	}
	data, err := s.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo: %w", err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			if _, seen := info[k]; !seen {
				info[k] = v
			}
		}
	}
	return info, nil
}

// selectModules resolves wanted into an ordered list of modules present in the
// tree. Built-in and missing modules are skipped with a debug log.
func (t *moduleTree) selectModules(wanted []string, log *slog.Logger) ([]string, error) {
	var roots []string
	for _, w := range wanted {
		name := moduleName(w)
		switch {
		case t.paths[name] != "":
			roots = append(roots, name)
		case t.builtin[name]:
			log.Debug("kernel module is built in", "module", name)
		default:
			log.Debug("kernel module not in kernel package, skipped", "module", name)
		}
	}
	return loadOrder(roots, func(name string) ([]string, error) {
		ds, err := t.deps(name)
		if err != nil {
			return nil, err
		}
		var present []string
		for _, d := range ds {
			if t.paths[d] != "" {
				present = append(present, d)
			} else if !t.builtin[d] {
				log.Debug("dependency of kernel module not found, skipped", "module", name, "dependency", d)
			}
		}
		return present, nil
	})
}
