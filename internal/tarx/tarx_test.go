package tarx

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/fuzzseed"
)

// The host's rules (a guest's archive) and the agent's (a caller's).
var (
	strict = Options{}
	follow = func(rootPath string) Options {
		return Options{StripSlash: true, FollowLinks: true, RootPath: rootPath, KeepSetID: true, AllowSparse: true}
	}
)

type ent = fuzzseed.Entry

func extract(t testing.TB, dir string, data []byte, o Options) (Stats, error) {
	t.Helper()
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	return Extract(bytes.NewReader(data), root, o)
}

// Every escape is refused under both rules, and nothing outside the target
// changes.
func TestExtractRefusesEscapes(t *testing.T) {
	cases := map[string][]ent{
		"dotdot":              {{Name: "../evil", Type: tar.TypeReg, Body: "x"}},
		"nested dotdot":       {{Name: "a/../../evil", Type: tar.TypeReg, Body: "x"}},
		"symlink dir out":     {{Name: "l", Type: tar.TypeSymlink, Link: "../../outside"}, {Name: "l/evil", Type: tar.TypeReg, Body: "x"}},
		"symlink to root":     {{Name: "l", Type: tar.TypeSymlink, Link: "/"}, {Name: "l/evil", Type: tar.TypeReg, Body: "x"}},
		"symlink dotdot":      {{Name: "l", Type: tar.TypeSymlink, Link: ".."}, {Name: "l/evil", Type: tar.TypeReg, Body: "x"}},
		"hardlink out":        {{Name: "h", Type: tar.TypeLink, Link: "../../outside/secret"}},
		"hardlink to a dir":   {{Name: "d/", Type: tar.TypeDir}, {Name: "h", Type: tar.TypeLink, Link: "d"}},
		"hardlink to missing": {{Name: "h", Type: tar.TypeLink, Link: "nothing"}},
		"name too long":       {{Name: strings.Repeat("n/", MaxNameLen) + "x", Type: tar.TypeReg, Body: "x"}},
	}
	for name, entries := range cases {
		for _, mode := range []string{"strict", "follow"} {
			t.Run(name+"/"+mode, func(t *testing.T) {
				base, target := fuzzseed.TarTree(t)
				o := strict
				if mode == "follow" {
					o = follow(target)
				}
				_, err := extract(t, target, fuzzseed.Tar(entries...), o)
				var e *Error
				if !errors.As(err, &e) || e.Kind != Refused || !strings.HasPrefix(err.Error(), "refusing archive entry") {
					t.Errorf("extract: %v, want a refusal", err)
				}
				fuzzseed.CheckTarTree(t, base, mode == "follow")
			})
		}
	}
}

// The rules that differ: absolute names, writes through a symlink that
// stays inside, setuid bits, sparse files.
func TestExtractRules(t *testing.T) {
	throughLink := fuzzseed.Tar(
		ent{Name: "real/", Type: tar.TypeDir, Mode: 0o755},
		ent{Name: "rel", Type: tar.TypeSymlink, Link: "real"},
		ent{Name: "rel/a", Type: tar.TypeReg, Body: "a"},
	)
	t.Run("absolute", func(t *testing.T) {
		data := fuzzseed.Tar(ent{Name: "/abs/x", Type: tar.TypeReg, Body: "x"})
		dir := t.TempDir()
		if _, err := extract(t, dir, data, strict); err == nil || !strings.Contains(err.Error(), "absolute path") {
			t.Errorf("strict: %v, want an absolute path refused", err)
		}
		if _, err := extract(t, dir, data, follow(dir)); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(dir, "abs/x")); err != nil || string(b) != "x" {
			t.Errorf("follow: abs/x = %q, %v", b, err)
		}
	})
	t.Run("through a symlink inside", func(t *testing.T) {
		dir := t.TempDir()
		if _, err := extract(t, dir, throughLink, strict); err == nil || !strings.Contains(err.Error(), "through the symlink rel") {
			t.Errorf("strict: %v, want the write through a symlink refused", err)
		}
		dir = t.TempDir()
		if _, err := extract(t, dir, throughLink, follow(dir)); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(dir, "real/a")); err != nil || string(b) != "a" {
			t.Errorf("follow: real/a = %q, %v", b, err)
		}
	})
	t.Run("absolute symlink inside", func(t *testing.T) {
		dir := t.TempDir()
		data := fuzzseed.Tar(
			ent{Name: "real/", Type: tar.TypeDir, Mode: 0o755},
			ent{Name: "abs", Type: tar.TypeSymlink, Link: filepath.Join(dir, "real")},
			ent{Name: "abs/a", Type: tar.TypeReg, Body: "a"},
		)
		if _, err := extract(t, dir, data, follow(dir)); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(dir, "real/a")); err != nil || string(b) != "a" {
			t.Errorf("real/a = %q, %v", b, err)
		}
	})
	t.Run("setuid", func(t *testing.T) {
		data := fuzzseed.Tar(ent{Name: "f", Type: tar.TypeReg, Body: "x", Mode: 0o6755}, ent{Name: "d/", Type: tar.TypeDir, Mode: 0o1777})
		for _, keep := range []bool{false, true} {
			dir := t.TempDir()
			if _, err := extract(t, dir, data, Options{KeepSetID: keep}); err != nil {
				t.Fatal(err)
			}
			want := fs.FileMode(0o755)
			if keep {
				want |= fs.ModeSetuid | fs.ModeSetgid
			}
			if fi, err := os.Stat(filepath.Join(dir, "f")); err != nil || fi.Mode() != want {
				t.Errorf("KeepSetID %v: mode %v, %v; want %v", keep, fi.Mode(), err, want)
			}
			if fi, err := os.Stat(filepath.Join(dir, "d")); err != nil || fi.Mode() != fs.ModeDir|fs.ModeSticky|0o777 {
				t.Errorf("directory mode %v, %v; want the sticky bit kept", fi.Mode(), err)
			}
		}
	})
	t.Run("sparse", func(t *testing.T) {
		base, target := fuzzseed.TarTree(t)
		_, err := extract(t, target, fuzzseed.SparseBomb(64<<20), strict)
		if err == nil || !strings.Contains(err.Error(), "a sparse file") {
			t.Errorf("strict: %v, want the sparse file refused", err)
		}
		fuzzseed.CheckTarTree(t, base, false)
	})
}

// A tree extracts whole: files, modes, symlinks stored not followed, hard
// links, devices skipped; a symlink in the way of a file is replaced, not
// followed; a directory in the way is a Conflict.
func TestExtractTree(t *testing.T) {
	base, target := fuzzseed.TarTree(t)
	if err := os.Symlink("../outside/"+fuzzseed.Secret, filepath.Join(target, "f")); err != nil {
		t.Fatal(err)
	}
	data := fuzzseed.Tar(
		ent{Name: "f", Type: tar.TypeReg, Body: "new", Mode: 0o600},
		ent{Name: "d/", Type: tar.TypeDir, Mode: 0o750},
		ent{Name: "d/l", Type: tar.TypeSymlink, Link: "../../outside"},
		ent{Name: "d/h", Type: tar.TypeLink, Link: "f"},
		ent{Name: "d/fifo", Type: tar.TypeFifo},
	)
	st, err := extract(t, target, data, strict)
	if err != nil {
		t.Fatal(err)
	}
	if st.Entries != 4 || st.Bytes != 3 {
		t.Errorf("stats %+v, want 4 entries and 3 bytes", st)
	}
	fuzzseed.CheckTarTree(t, base, false)
	if b, err := os.ReadFile(filepath.Join(target, "d/h")); err != nil || string(b) != "new" {
		t.Errorf("d/h = %q, %v", b, err)
	}
	if l, err := os.Readlink(filepath.Join(target, "d/l")); err != nil || l != "../../outside" {
		t.Errorf("d/l -> %q, %v", l, err)
	}
	if _, err := os.Lstat(filepath.Join(target, "d/fifo")); !os.IsNotExist(err) {
		t.Errorf("the FIFO was made: %v", err)
	}
	_, err = extract(t, target, fuzzseed.Tar(ent{Name: "d", Type: tar.TypeReg, Body: "x"}), strict)
	var e *Error
	if !errors.As(err, &e) || e.Kind != Conflict || e.Path != "d" {
		t.Errorf("a file over a directory: %v, want a Conflict", err)
	}
}

// The bounds and the stream's errors: too many entries are refused; bytes
// that are no tar are a BadStream; the transport's own error comes back as
// it is.
func TestExtractBoundsAndStream(t *testing.T) {
	dir := t.TempDir()
	many := fuzzseed.Tar(ent{Name: "a", Type: tar.TypeReg}, ent{Name: "b", Type: tar.TypeReg}, ent{Name: "c", Type: tar.TypeReg})
	if _, err := extract(t, dir, many, Options{MaxEntries: 2}); err == nil || !strings.Contains(err.Error(), "more than 2 entries") {
		t.Errorf("3 entries with MaxEntries 2: %v", err)
	}
	var e *Error
	if _, err := extract(t, dir, []byte(strings.Repeat("garbage ", 100)), strict); !errors.As(err, &e) || e.Kind != BadStream {
		t.Errorf("garbage: %v, want a BadStream", err)
	}
	transport := errors.New("the transport broke")
	data := fuzzseed.Tar(ent{Name: "big", Type: tar.TypeReg, Body: strings.Repeat("x", 10000)})
	r := io.MultiReader(bytes.NewReader(data[:1024]), &failReader{transport})
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	_, err = Extract(r, root, Options{PassThrough: func(err error) bool { return errors.Is(err, transport) }})
	if !errors.Is(err, transport) || errors.As(err, &e) {
		t.Errorf("a transport error mid-file: %v, want it as it is", err)
	}
}

type failReader struct{ err error }

func (r *failReader) Read([]byte) (int, error) { return 0, r.err }

// FuzzExtract extracts arbitrary bytes under the host's rules (a guest's
// archive) next to a folder it must not touch: nothing is written outside
// the target, and no file gets a setuid or setgid bit.
func FuzzExtract(f *testing.F) {
	for _, b := range fuzzseed.Tars() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		base, target := fuzzseed.TarTree(t)
		_, _ = extract(t, target, data, strict)
		fuzzseed.CheckTarTree(t, base, false)
	})
}

// FuzzExtractFollow extracts arbitrary bytes under the agent's rules
// (absolute names taken relative, symlinks inside followed, setuid kept):
// nothing is written outside the target.
func FuzzExtractFollow(f *testing.F) {
	for _, b := range fuzzseed.Tars() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		base, target := fuzzseed.TarTree(t)
		o := follow(target)
		o.AllowSparse = false // holes written as zeros: as much as the bytes claim
		_, _ = extract(t, target, data, o)
		fuzzseed.CheckTarTree(t, base, true)
	})
}
