package rootfs

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/smolvm/smolvm/internal/wire"
)

// OCIOptions describe an OCI or Docker image to turn into a root disk.
// Exactly one of Ref and File is set.
type OCIOptions struct {
	CacheDir string
	// Ref is a registry reference (e.g. docker.io/library/debian:bookworm,
	// 127.0.0.1:5000/test:latest; loopback registries are reached over HTTP).
	Ref string
	// File is an OCI layout folder, an OCI layout tar or a `docker save`
	// tarball (optionally gzipped).
	File      string
	Platform  v1.Platform // default linux/amd64
	Size      int64       // bytes; 0 = what the files need plus room
	AgentPath string
	Progress  io.Writer
	// RemoteOptions are passed to the registry client (auth, transport).
	RemoteOptions []remote.Option
}

// ImportOCI returns the cached disk of an OCI image, building it when
// missing: the layers flattened (mutate.Extract, whiteouts honoured),
// unpacked as root, the agent injected, then mkfs.ext4 -d.
func ImportOCI(ctx context.Context, opts OCIOptions) (*Result, error) {
	t0 := time.Now()
	if (opts.Ref == "") == (opts.File == "") {
		return nil, errors.New("import: give either a reference or a file")
	}
	if opts.Platform.OS == "" {
		opts.Platform = v1.Platform{OS: "linux", Architecture: "amd64"}
	}
	prog := stepWriter{opts.Progress}
	agentSHA, err := HashFile(opts.AgentPath)
	if err != nil {
		return nil, fmt.Errorf("guest agent: %w", err)
	}
	var (
		img     v1.Image
		source  string
		cleanup = func() {}
	)
	if opts.Ref != "" {
		ref, err := name.ParseReference(opts.Ref)
		if err != nil {
			return nil, fmt.Errorf("image reference %q: %w", opts.Ref, err)
		}
		prog.printf("resolving %s…", ref.Name())
		ropts := append([]remote.Option{remote.WithContext(ctx), remote.WithPlatform(opts.Platform)}, opts.RemoteOptions...)
		if img, err = remote.Image(ref, ropts...); err != nil {
			return nil, fmt.Errorf("pull %s: %w", ref.Name(), err)
		}
		source = ref.Name()
	} else {
		abs, err := filepath.Abs(opts.File)
		if err != nil {
			return nil, err
		}
		if img, cleanup, err = imageFromFile(abs, opts.Platform); err != nil {
			return nil, fmt.Errorf("import %s: %w", opts.File, err)
		}
		source = "file:" + abs
	}
	defer cleanup()
	digest, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("image digest of %s: %w", source, err)
	}
	fp := fingerprint("oci", digest.String(), agentSHA, fmt.Sprint(opts.Size))
	if r, ok := cached(opts.CacheDir, fp); ok {
		r.Took = time.Since(t0)
		return r, nil
	}
	if err := needRoot("importing an image"); err != nil {
		return nil, err
	}
	if err := needTools("mkfs.ext4", "tar"); err != nil {
		return nil, err
	}
	unlock, err := lock(ctx, filepath.Join(cacheDir(opts.CacheDir), fp+".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if r, ok := cached(opts.CacheDir, fp); ok {
		r.Took = time.Since(t0)
		return r, nil
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image config of %s: %w", source, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("layers of %s: %w", source, err)
	}
	work, err := buildDir(opts.CacheDir)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	tree := filepath.Join(work, "tree")
	prog.printf("flattening %d layers of %s (%s)…", len(layers), source, digest)
	rc := mutate.Extract(img)
	err = untarFrom(ctx, "-", rc, tree)
	rc.Close()
	if err != nil {
		return nil, fmt.Errorf("flatten %s: %w", source, err)
	}
	imgCfg := ImageConfigOf(source, cfg)
	prog.printf("installing the agent at %s", AgentPath)
	if err := InjectAgent(tree, opts.AgentPath); err != nil {
		return nil, err
	}
	if err := writeImageConfig(tree, imgCfg); err != nil {
		return nil, err
	}
	prog.printf("writing the ext4 disk (mkfs.ext4 -d)…")
	out := filepath.Join(work, "rootfs.img")
	if err := MakeExt4(ctx, tree, out, opts.Size); err != nil {
		return nil, err
	}
	info := Info{Kind: "oci", Source: source, Digest: digest.String(), AgentSHA256: agentSHA, Builder: BuilderVersion,
		Built: time.Now().UTC(), BuildTime: time.Since(t0).Round(time.Millisecond).String()}
	if !imgCfg.Empty() {
		info.Config = imgCfg
	}
	r, err := commit(opts.CacheDir, fp, out, info)
	if err != nil {
		return nil, err
	}
	r.Took = time.Since(t0)
	prog.printf("imported in %s: %d MiB", r.Took.Round(time.Millisecond), r.Size/mib)
	return r, nil
}

// ImageConfigOf takes the run config of an OCI image's config file.
func ImageConfigOf(source string, cf *v1.ConfigFile) *wire.ImageConfig {
	c := &wire.ImageConfig{Image: source}
	if cf == nil {
		return c
	}
	oc := cf.Config
	c.Env = slices.Clone(oc.Env)
	c.WorkingDir = oc.WorkingDir
	c.User = oc.User
	c.Entrypoint = slices.Clone(oc.Entrypoint)
	c.Cmd = slices.Clone(oc.Cmd)
	for p := range oc.ExposedPorts {
		c.ExposedPorts = append(c.ExposedPorts, p)
	}
	slices.Sort(c.ExposedPorts)
	return c
}

// writeImageConfig stores the run config in the tree, where the agent
// reads it; a config that changes nothing is not written.
func writeImageConfig(tree string, c *wire.ImageConfig) error {
	if c.Empty() {
		return nil
	}
	data, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	p := filepath.Join(tree, wire.ImageConfigPath)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("write the image config: %w", err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		return fmt.Errorf("write the image config: %w", err)
	}
	return nil
}

// imageFromFile opens an OCI layout folder, an OCI layout tar or a docker
// save tarball.
func imageFromFile(path string, plat v1.Platform) (v1.Image, func(), error) {
	noop := func() {}
	st, err := os.Stat(path)
	if err != nil {
		return nil, noop, err
	}
	if st.IsDir() {
		img, err := imageFromLayout(path, plat)
		return img, noop, err
	}
	names, err := tarNames(path)
	if err != nil {
		return nil, noop, fmt.Errorf("not an OCI layout or docker save tarball: %w", err)
	}
	switch {
	case names["manifest.json"]:
		img, err := tarball.Image(func() (io.ReadCloser, error) { return openMaybeGzip(path) }, nil)
		if err != nil {
			return nil, noop, fmt.Errorf("docker save tarball: %w", err)
		}
		return img, noop, nil
	case names["oci-layout"] && names["index.json"]:
		dir, err := os.MkdirTemp("", "smolvm-oci-")
		if err != nil {
			return nil, noop, err
		}
		cleanup := func() { os.RemoveAll(dir) }
		if err := unpackPlain(path, dir); err != nil {
			cleanup()
			return nil, noop, err
		}
		img, err := imageFromLayout(dir, plat)
		if err != nil {
			cleanup()
			return nil, noop, err
		}
		return img, cleanup, nil
	}
	return nil, noop, errors.New("tarball has neither manifest.json (docker save) nor oci-layout + index.json (OCI layout)")
}

func imageFromLayout(dir string, plat v1.Platform) (v1.Image, error) {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("OCI layout: %w", err)
	}
	return pickImage(idx, plat, 0)
}

// pickImage finds the image for plat in an index (recursing into nested
// indexes); a lone image without platform is taken as is.
func pickImage(idx v1.ImageIndex, plat v1.Platform, depth int) (v1.Image, error) {
	if depth > 4 {
		return nil, errors.New("image indexes nested too deeply")
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var candidates []v1.Descriptor
	for _, d := range m.Manifests {
		if d.Platform != nil && (d.Platform.OS != plat.OS || d.Platform.Architecture != plat.Architecture) {
			continue
		}
		if d.Platform != nil && d.Platform.OS == "unknown" { // attestations
			continue
		}
		candidates = append(candidates, d)
	}
	for _, d := range candidates {
		if d.MediaType.IsImage() {
			return idx.Image(d.Digest)
		}
	}
	for _, d := range candidates {
		if d.MediaType.IsIndex() {
			sub, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, err
			}
			if img, err := pickImage(sub, plat, depth+1); err == nil {
				return img, nil
			}
		}
	}
	return nil, fmt.Errorf("no image for %s/%s in the index", plat.OS, plat.Architecture)
}

func openMaybeGzip(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	br := bufio.NewReader(f)
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			f.Close()
			return nil, err
		}
		return struct {
			io.Reader
			io.Closer
		}{zr, f}, nil
	}
	return struct {
		io.Reader
		io.Closer
	}{br, f}, nil
}

// tarNames lists the top-level file names of a tar file.
func tarNames(path string) (map[string]bool, error) {
	rc, err := openMaybeGzip(path)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	names := map[string]bool{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		names[strings.TrimPrefix(filepath.Clean("/"+h.Name), "/")] = true
	}
	if len(names) == 0 {
		return nil, errors.New("empty tar file")
	}
	return names, nil
}

// unpackPlain unpacks the regular files and folders of a tar file (an OCI
// layout) into dir, refusing paths that leave it.
func unpackPlain(path, dir string) error {
	rc, err := openMaybeGzip(path)
	if err != nil {
		return err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read OCI layout tar: %w", err)
		}
		rel := filepath.Clean("/" + h.Name)
		dst := filepath.Join(dir, rel)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, tr); err != nil {
				f.Close()
				return fmt.Errorf("read OCI layout tar: %w", err)
			}
			if err := f.Close(); err != nil {
				return err
			}
		}
	}
}
