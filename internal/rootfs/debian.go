package rootfs

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// DebianOptions describe a Debian root disk.
type DebianOptions struct {
	CacheDir  string   // e.g. $SMOLVM_HOME/cache
	Suite     string   // e.g. bookworm
	Variant   string   // mmdebstrap variant: minbase (default) or apt
	Packages  []string // extra packages
	Script    string   // shell script run in the tree (chroot) after the packages
	Mirror    string   // "" = the host's Debian mirror (apt sources), else deb.debian.org
	Size      int64    // bytes; 0 = what the files need plus room
	AgentPath string   // static guest agent, installed at AgentPath
	Progress  io.Writer
}

// Fingerprint is the cache key of the options (with the agent's hash).
func (o DebianOptions) Fingerprint(agentSHA string) string {
	pk := append([]string(nil), o.Packages...)
	sort.Strings(pk)
	return fingerprint("debian", o.Suite, o.variant(), o.mirror(), strings.Join(pk, ","), o.Script, agentSHA, fmt.Sprint(o.Size))
}

func (o DebianOptions) variant() string {
	if o.Variant == "" {
		return "minbase"
	}
	return o.Variant
}

func (o DebianOptions) mirror() string {
	if o.Mirror != "" {
		return o.Mirror
	}
	return HostMirror()
}

// HostMirror is the Debian mirror of the host's apt sources (deb822
// .sources files or sources.list), or http://deb.debian.org/debian.
func HostMirror() string {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	files = append(files, "/etc/apt/sources.list")
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append(files, more...)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			var uri string
			switch {
			case strings.HasPrefix(line, "URIs:"):
				if fs := strings.Fields(strings.TrimPrefix(line, "URIs:")); len(fs) > 0 {
					uri = fs[0]
				}
			case strings.HasPrefix(line, "deb "):
				for _, f := range strings.Fields(line)[1:] {
					if strings.Contains(f, "://") {
						uri = f
						break
					}
				}
			}
			if uri != "" && !strings.Contains(uri, "security") && strings.HasSuffix(strings.TrimRight(uri, "/"), "/debian") {
				return strings.TrimRight(uri, "/")
			}
		}
	}
	return "http://deb.debian.org/debian"
}

// BuildDebian returns the cached disk for opts, building it when missing:
// mmdebstrap (as root) into a scratch folder, the agent installed, then
// mkfs.ext4 -d. Progress lines go to opts.Progress.
func BuildDebian(ctx context.Context, opts DebianOptions) (*Result, error) {
	t0 := time.Now()
	if opts.Suite == "" {
		opts.Suite = "bookworm"
	}
	for _, p := range opts.Packages {
		if p == "" || strings.ContainsAny(p, " ,'\"\\$;") {
			return nil, fmt.Errorf("bad package name %q", p)
		}
	}
	agentSHA, err := HashFile(opts.AgentPath)
	if err != nil {
		return nil, fmt.Errorf("guest agent: %w", err)
	}
	fp := opts.Fingerprint(agentSHA)
	if r, ok := cached(opts.CacheDir, fp); ok {
		r.Took = time.Since(t0)
		return r, nil
	}
	if err := needRoot("building a Debian image"); err != nil {
		return nil, err
	}
	if err := needTools("mmdebstrap", "mkfs.ext4"); err != nil {
		return nil, err
	}
	unlock, err := lock(ctx, filepath.Join(cacheDir(opts.CacheDir), fp+".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if r, ok := cached(opts.CacheDir, fp); ok { // built while we waited
		r.Took = time.Since(t0)
		return r, nil
	}
	prog := stepWriter{opts.Progress}
	work, err := buildDir(opts.CacheDir)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	tree := filepath.Join(work, "tree")
	mirror := opts.mirror()
	base, err := debianBase(ctx, opts, mirror, work, prog)
	if err != nil {
		return nil, err
	}
	prog.printf("unpacking the Debian tree…")
	if err := untar(ctx, base, tree); err != nil {
		return nil, err
	}
	prog.printf("installing the agent at %s", AgentPath)
	if err := InjectAgent(tree, opts.AgentPath); err != nil {
		return nil, err
	}
	// The guest is a sandbox, not a networked host: no fstab mounts, an
	// empty machine-id filled at first boot is not needed.
	_ = os.WriteFile(filepath.Join(tree, "etc", "hostname"), []byte("smolvm\n"), 0o644)
	prog.printf("writing the ext4 disk (mkfs.ext4 -d)…")
	img := filepath.Join(work, "rootfs.img")
	if err := MakeExt4(ctx, tree, img, opts.Size); err != nil {
		return nil, err
	}
	sum, err := HashFile(img)
	if err != nil {
		return nil, err
	}
	info := Info{Kind: "debian", Source: "debian:" + opts.Suite, Digest: "sha256:" + sum, Suite: opts.Suite, Variant: opts.variant(),
		Mirror: mirror, Packages: opts.Packages, Script: opts.Script, AgentSHA256: agentSHA, Builder: BuilderVersion,
		Built: time.Now().UTC(), BuildTime: time.Since(t0).Round(time.Second).String()}
	r, err := commit(opts.CacheDir, fp, img, info)
	if err != nil {
		return nil, err
	}
	r.Took = time.Since(t0)
	prog.printf("built in %s: %d MiB", r.Took.Round(time.Second), r.Size/mib)
	return r, nil
}

// tailBuffer keeps the last lines written to it, for error messages.
type tailBuffer struct{ b []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > 4096 {
		t.b = t.b[len(t.b)-4096:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return strings.TrimSpace(string(t.b)) }

// debianBase returns the mmdebstrap tarball of the packages, cached
// without the agent (cache/rootfs/debian-<fingerprint>.tar): a new agent
// then only costs an unpack and a mkfs, not a new bootstrap.
func debianBase(ctx context.Context, opts DebianOptions, mirror, work string, prog stepWriter) (string, error) {
	pk := append([]string(nil), opts.Packages...)
	sort.Strings(pk)
	fp := fingerprint("debian-base", opts.Suite, opts.variant(), mirror, strings.Join(pk, ","), opts.Script)
	out := filepath.Join(cacheDir(opts.CacheDir), "debian-"+fp+".tar")
	if _, err := os.Stat(out); err == nil {
		prog.printf("reusing the cached Debian tree %s", filepath.Base(out))
		return out, nil
	}
	// force-unsafe-io: dpkg skips its fsync per file, the slowest part of
	// a bootstrap on a busy host (the tree is thrown away on a crash anyway).
	args := []string{"--mode=root", "--variant=" + opts.variant(), "--format=tar",
		`--aptopt=APT::Install-Recommends "false"`, "--dpkgopt=force-unsafe-io",
		"--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
		"--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/locale/*",
		"--dpkgopt=path-exclude=/usr/share/info/*",
	}
	if len(opts.Packages) > 0 {
		args = append(args, "--include="+strings.Join(opts.Packages, ","))
	}
	if strings.TrimSpace(opts.Script) != "" {
		script := filepath.Join(work, "script.sh")
		if err := os.WriteFile(script, []byte(opts.Script), 0o644); err != nil {
			return "", err
		}
		args = append(args, fmt.Sprintf(`--customize-hook=cp '%s' "$1/tmp/smolvm-build.sh" && chroot "$1" /bin/sh -e /tmp/smolvm-build.sh && rm -f "$1/tmp/smolvm-build.sh"`, script))
	}
	tmp := filepath.Join(work, "debian.tar")
	args = append(args, opts.Suite, tmp, mirror)
	prog.printf("building Debian %s (%s) from %s with %d extra packages (mmdebstrap)…", opts.Suite, opts.variant(), mirror, len(opts.Packages))
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	var tail tailBuffer
	if opts.Progress != nil {
		cmd.Stdout = io.MultiWriter(opts.Progress, &tail)
		cmd.Stderr = io.MultiWriter(opts.Progress, &tail)
	} else {
		cmd.Stdout, cmd.Stderr = &tail, &tail
	}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("mmdebstrap %s: %w\n%s", opts.Suite, err, tail.String())
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	return out, nil
}

// untar unpacks a tar file (or stdin when src is "-") into dir keeping
// owners, modes, device nodes and extended attributes.
func untar(ctx context.Context, src, dir string) error {
	return untarFrom(ctx, src, nil, dir)
}

func untarFrom(ctx context.Context, src string, r io.Reader, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "tar", "-x", "-p", "--same-owner", "--numeric-owner",
		"--xattrs", "--xattrs-include=*", "-f", src, "-C", dir)
	cmd.Stdin = r
	var tail tailBuffer
	cmd.Stdout, cmd.Stderr = &tail, &tail
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("unpack: tar: %w: %s", err, tail.String())
	}
	return nil
}
