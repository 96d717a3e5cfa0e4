package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

// Problem is something the host lacks.
type Problem struct {
	Missing string // the command or file, e.g. "qemu-system-x86_64"
	Package string // the Debian package providing it, e.g. "qemu-system-x86"
	Detail  string // why it matters or what is wrong
	// Optional problems matter only for disk images (image build/import)
	// and the bench's SSH comparison.
	Optional bool
}

func (p Problem) String() string {
	s := p.Missing + ": " + p.Detail
	if p.Package != "" {
		s += " (Debian package " + p.Package + ")"
	}
	return s
}

// hostTools are the commands smolvm needs, with the Debian package of each.
// Optional ones are needed only for disk images and the bench.
var hostTools = []struct {
	cmd, pkg, why string
	optional      bool
}{
	{"qemu-system-x86_64", "qemu-system-x86", "runs the microVMs", false},
	{"qemu-img", "qemu-utils", "creates copy-on-write disks", false},
	{"apt-get", "apt", "downloads the default kernel", false},
	{"dpkg-deb", "dpkg", "unpacks the default kernel", false},
	{"mkfs.ext4", "e2fsprogs", "writes disk images (smolvm image build/pull/import)", true},
	{"mmdebstrap", "mmdebstrap", "builds Debian disk images (smolvm image build)", true},
	{"dropbear", "dropbear-bin", "is the SSH server of smolvm bench's SSH comparison", true},
}

// lookPath is exec.LookPath that also searches the sbin folders, which are
// missing from the PATH of non-root users on Debian.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := d + "/" + name
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w", name, exec.ErrNotFound)
}

// CheckHost reports what the host lacks to build images and run guests.
func CheckHost(ctx context.Context) []Problem {
	var probs []Problem
	for _, t := range hostTools {
		if _, err := lookPath(t.cmd); err != nil {
			probs = append(probs, Problem{Missing: t.cmd, Package: t.pkg, Detail: "not found; it " + t.why, Optional: t.optional})
		}
	}
	if _, err := os.Stat(DefaultBusybox); err != nil {
		probs = append(probs, Problem{Missing: DefaultBusybox, Package: "busybox-static", Detail: "not found; the guest's shell and tools come from it"})
	} else if err := checkStatic(DefaultBusybox); err != nil {
		probs = append(probs, Problem{Missing: DefaultBusybox, Package: "busybox-static", Detail: "not statically linked; the guest needs a static busybox"})
	}
	return probs
}

// missingPackages returns the Debian packages that fix probs, without repeats.
func missingPackages(probs []Problem) []string {
	var pkgs []string
	seen := map[string]bool{}
	for _, p := range probs {
		if p.Package != "" && !seen[p.Package] {
			seen[p.Package] = true
			pkgs = append(pkgs, p.Package)
		}
	}
	return pkgs
}

// InstallHostPackages installs the Debian packages CheckHost asks for. As
// root on a host with apt-get it runs apt-get install (and apt-get update
// when apt does not know a package); otherwise it returns an error that says
// what to install. Output of apt goes to out (nil = discarded).
func InstallHostPackages(ctx context.Context, out io.Writer) error {
	if out == nil {
		out = io.Discard
	}
	probs := CheckHost(ctx)
	pkgs := missingPackages(probs)
	if len(pkgs) == 0 {
		return nil
	}
	cmdline := "apt-get install -y --no-install-recommends " + strings.Join(pkgs, " ")
	_, aptErr := lookPath("apt-get")
	if aptErr != nil {
		return fmt.Errorf("host is missing %s and has no apt-get: install QEMU (qemu-system-x86_64, qemu-img) and a statically linked busybox at %s with your package manager", describe(probs), DefaultBusybox)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("host is missing %s: run 'sudo %s'", describe(probs), cmdline)
	}
	args := append([]string{"install", "-y", "--no-install-recommends"}, pkgs...)
	err := runApt(ctx, out, args...)
	if err != nil && errors.Is(err, errUnknownPackage) {
		if uerr := runApt(ctx, out, "update"); uerr != nil {
			return fmt.Errorf("apt-get update: %w: check the apt sources, then run '%s'", uerr, cmdline)
		}
		err = runApt(ctx, out, args...)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", cmdline, err)
	}
	if left := CheckHost(ctx); len(left) > 0 {
		return fmt.Errorf("still missing after installing packages: %s", describe(left))
	}
	return nil
}

var errUnknownPackage = errors.New("apt does not know a package")

func runApt(ctx context.Context, out io.Writer, args ...string) error {
	var buf bytes.Buffer
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	cmd.Stdout = io.MultiWriter(out, &buf)
	cmd.Stderr = io.MultiWriter(out, &buf)
	if err := cmd.Run(); err != nil {
		if bytes.Contains(buf.Bytes(), []byte("Unable to locate package")) || bytes.Contains(buf.Bytes(), []byte("has no installation candidate")) {
			return fmt.Errorf("%w: %v", errUnknownPackage, err)
		}
		return fmt.Errorf("%w: %s", err, tail(buf.Bytes()))
	}
	return nil
}

func describe(probs []Problem) string {
	var s []string
	for _, p := range probs {
		s = append(s, p.Missing)
	}
	return strings.Join(s, ", ")
}
